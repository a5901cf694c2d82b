"""Routed models' speed (``python -m adaptok.bench.routing``): end-to-end
images per second of the trained lab models on real images, everything
inside the timed call (router, resize, partition, each model on its own
images, reordering), in one run:

- ``P14, timm``: the plain timm model with P14's weights (what users run
  without adaptok), and ``P14, adaptok`` (the same model patched);
- ``routed t=...``: :class:`adaptok.models.routed.RoutedModel` with the
  trained router at each ``--threshold``;
- ``cascade ~t=...``: the early-exit cascade over P7, P10 and P14 at the
  accuracy of that routed variant (the cheapest exit thresholds whose top-1
  on the benchmark images reaches the routed top-1, else the most accurate
  setting; both are reported).

The models are ``repro/deit_evit``'s P7 and P14 and ``repro/routing``'s P10
and router (``--p7`` ... to use others); the images are the first
``--batch`` of animal-mnist's val split, and at batch size 1 the first
``--single`` of them in turn, every variant on the same image in a round:
the routed latency is the mean over those images (whose routes differ), as
a stream of single images would see it. Rounds interleave the variants and
every other round runs them in reverse; medians and quartiles are
reported. Writes ``routing-bench.json`` to ``--out``.

``--model deit_small_patch16_224`` (any timm ViT) runs the same machinery
at the paper's scale on random weights: P7 and P14 are two models of that
architecture (P7 run at 7x7 tokens), the router is a 1-block ViT of width
32 on 7x7 patches, and the route is ``--mix`` (the share sent to P7) while
the router still runs on every image and its cost counts. With random
weights there is no accuracy to match, so the cascade (P7 then P14) is
set to send the same share on to P14 as the routed model does (its exit
threshold is that quantile of P7's confidence on the batch): the images
the routed model gives P14 pay for P7 and P14 in the cascade, which is the
paper's argument, measured.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import Optional

import torch

from adaptok.bench.e2e import Variant, measure, paired, target_lines
from adaptok.bench.timing import environment, summarize, write_report
from adaptok.devices import default_device

_REPRO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "repro")
DEFAULTS = {"p7": os.path.join(_REPRO, "deit_evit", "checkpoints", "p7-s0.pth"),
            "p10": os.path.join(_REPRO, "routing", "checkpoints", "p10-s0.pth"),
            "p14": os.path.join(_REPRO, "deit_evit", "checkpoints", "p14-s0.pth"),
            "router": os.path.join(_REPRO, "routing", "checkpoints", "router-s0.pth")}


def plain_timm(model):
    """An unpatched timm copy of a lab ViT (its class before adaptok.patch),
    with the same weights."""
    import timm

    cfg = model.adaptok_config
    plain = timm.create_model(cfg["model"], **{**cfg["model_kwargs"], "num_classes": model.num_classes})
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def load(args, device, dtype) -> tuple:
    from adaptok.routing import Router
    from adaptok.train import create_model

    for k in DEFAULTS:
        if not os.path.exists(getattr(args, k)):
            raise SystemExit(f"--{k} {getattr(args, k)!r} does not exist (the defaults are the repository's "
                             f"repro/ checkpoints; pass your own)")
    models = {g: create_model(checkpoint=getattr(args, f"p{g}")).eval().to(device, dtype) for g in (7, 10, 14)}
    router = Router.from_checkpoint(args.router).to(device, dtype)
    return models, router, plain_timm(models[14]).to(device, dtype)


def bench_images(args, device, dtype) -> tuple:
    from adaptok import data as lab_data

    xs, ys, n = [], [], 0
    for x, y in lab_data.create_loader("animal-mnist", "val", 256, 28, 1, training=False):
        xs.append(x)
        ys.append(y)
        n += len(x)
        if n >= args.batch:
            break
    return torch.cat(xs)[:args.batch].to(device, dtype), torch.cat(ys)[:args.batch].to(device)


def matched_cascade(stage_logits: dict, labels, grids, stage_macs, top1: float) -> dict:
    """The cheapest cascade thresholds whose top-1 on these images reaches
    ``top1`` (else the most accurate setting)."""
    from adaptok import routing

    conf = torch.stack([stage_logits[g].double().softmax(-1).amax(-1) for g in grids], 1).cpu()
    correct = torch.stack([stage_logits[g].argmax(-1) == labels for g in grids], 1).cpu()
    return routing.cascade_thresholds(conf, correct, torch.tensor(stage_macs, dtype=torch.float64), min_top1=top1)


def run(args, device, dtype) -> dict:
    from adaptok.cost import macs
    from adaptok.models.routed import Cascade, RoutedModel

    models, router, timm14 = load(args, device, dtype)
    x, y = bench_images(args, device, dtype)
    grids = (7, 10, 14)
    with torch.inference_mode():
        stage = {g: models[g](x, grid=g).float() for g in grids}
    stage_macs = [macs(models[g], g) for g in grids]
    variants = []
    info = {}
    singles = {}

    def single(fn):
        """A closure that runs ``fn`` on the next benchmark image each call."""
        state = {"i": 0}

        def call():
            i = state["i"] % args.single
            state["i"] += 1
            return fn(x[i:i + 1])
        return call

    p14_macs = macs(models[14])
    variants.append(Variant("P14, timm", "timm", lambda: timm14(x), single(timm14), len(x), 1, p14_macs))
    variants.append(Variant("P14, adaptok", "adaptok", lambda: models[14](x), single(models[14]), len(x), 1,
                            p14_macs))
    with torch.inference_mode():
        plain = timm14(x)
    info["P14, timm"] = {"top1": 100.0 * float((plain.argmax(-1) == y).double().mean()), "gmacs": p14_macs / 1e9}
    info["P14, adaptok"] = {"top1": 100.0 * float((stage[14].argmax(-1) == y).double().mean()),
                            "gmacs": p14_macs / 1e9}
    for t in args.threshold:
        r = copy.copy(router)
        r.threshold = t
        routed = RoutedModel({7: models[7], 14: models[14]}, r)
        with torch.inference_mode():
            logits, spent = routed.forward_with_macs(x)
            sides = routed.route(x)
        top1 = 100.0 * float((logits.argmax(-1) == y).double().mean())
        name = f"routed t={t:g}"
        info[name] = {"top1": top1, "gmacs": float(spent.double().mean()) / 1e9,
                      "share_p7": 100.0 * float((sides == 7).double().mean()), "threshold": t}
        variants.append(Variant(name, "adaptok", (lambda m=routed: m(x)), single(routed), len(x), 1,
                                float(spent.double().mean())))
        c = matched_cascade(stage, y, grids, stage_macs, top1)
        cascade = Cascade({g: models[g] for g in grids}, c["thresholds"])
        with torch.inference_mode():
            _, c_spent = cascade.forward_with_macs(x)
        cname = f"cascade ~t={t:g}"
        info[cname] = {**c, "gmacs": float(c_spent.double().mean()) / 1e9}
        variants.append(Variant(cname, "baseline", (lambda m=cascade: m(x)), single(cascade), len(x), 1,
                                float(c_spent.double().mean())))
        singles[name] = cname
    samples = measure(variants, device, args.repeats, args.warmup, progress=False)
    results = {}
    for v in variants:
        b, s = summarize(samples[(v.name, "batch")]), summarize(samples[(v.name, "single")])
        results[v.name] = {**info[v.name], "images_per_s": v.images / b["median_s"], "batch": b,
                           "single_ms_mean": 1e3 * statistics.fmean(samples[(v.name, "single")]), "single": s}
    base = "P14, timm"

    def bs1_ratio(name: str) -> dict:
        """Mean latency over each pass through the ``--single`` images,
        against P14's over the same images and rounds."""
        a, b = samples[(name, "single")], samples[(base, "single")]
        n = args.single
        blocks = [sum(a[i:i + n]) / sum(b[i:i + n]) for i in range(0, len(a) - n + 1, n)] or [sum(a) / sum(b)]
        q = statistics.quantiles(blocks, n=4) if len(blocks) > 1 else [blocks[0]] * 3
        return {"median": statistics.median(blocks), "q1": q[0], "q3": q[2], "blocks": len(blocks),
                "overall": sum(a) / sum(b)}

    rows = []
    for name, cname in singles.items():
        r, c = results[name], results[cname]
        ratio = p14_macs / (r["gmacs"] * 1e9)
        speedup = r["images_per_s"] / results[base]["images_per_s"]
        r["speedup_over_p14"], r["mac_ratio"] = speedup, ratio
        r["vs_cascade"] = r["images_per_s"] / c["images_per_s"]
        r["bs1_vs_p14"] = bs1_ratio(name)
        rows += [{"target": f"{name}: speed-up over P14 (timm) / its MAC ratio {ratio:.2f}x", "measured":
                  speedup / ratio, "goal": 0.9, "higher": True},
                 {"target": f"{name} vs the cascade at its accuracy (images/s ratio; top-1 {r['top1']:.1f} vs "
                  f"{c['top1']:.1f})", "measured": r["vs_cascade"], "goal": 1.0, "higher": True},
                 {"target": f"{name}: batch size 1 latency / P14 (timm), mean over {args.single} images",
                  "measured": r["bs1_vs_p14"]["median"], "goal": 1.0, "higher": False}]
    for t in rows:
        t["met"] = t["measured"] >= t["goal"] if t["higher"] else t["measured"] <= t["goal"]
    return {"results": results, "targets": rows}


def synthetic(args, device, dtype) -> dict:
    """The paper's scale on random weights (see the module docstring)."""
    import timm

    from adaptok.cost import macs
    from adaptok.models.routed import Cascade, RoutedModel
    from adaptok.routing import Router

    torch.manual_seed(0)
    timm14 = timm.create_model(args.model, **args.model_kwargs).eval().to(device, dtype)
    p14 = copy.deepcopy(timm14)
    p7 = timm.create_model(args.model, **args.model_kwargs).eval().to(device, dtype)
    side = int(timm14.patch_embed.img_size[0])
    chans = int(timm14.patch_embed.proj.in_channels)
    net = timm.create_model("vit_tiny_patch16_224", img_size=side, patch_size=side // 7, in_chans=chans,
                            embed_dim=32, depth=1, num_heads=1, num_classes=2)
    router = Router(net.eval().to(device, dtype), (7, 14), side)
    routed = RoutedModel({7: p7, 14: p14}, router)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, chans, side, side, generator=g).to(device, dtype)
    n7 = round(args.mix * args.batch)
    route = torch.tensor([7] * n7 + [14] * (args.batch - n7))[torch.randperm(args.batch, generator=g)]
    # On the device, as the router's decision is: reading it back is part of the cost.
    route, one7, one14 = route.to(device), torch.tensor([7], device=device), torch.tensor([14], device=device)

    def routed_call(images, r):
        router.assign(images)  # its decision is replaced by the mix (random weights); its cost is not
        return routed(images, route=r)

    with torch.inference_mode():
        conf = p7(x, grid=7).float().softmax(-1).amax(-1)
    from adaptok.routing import NEVER

    threshold = (0.0 if args.mix == 1 else NEVER if args.mix == 0 else
                 float(torch.quantile(conf.double(), 1 - args.mix)))
    cascade = Cascade({7: p7, 14: p14}, [threshold])
    with torch.inference_mode():
        _, exits = cascade(x, return_exits=True)
    m7, m14, mr = macs(p7, 7), macs(p14, 14), router.macs()
    routed_macs = (n7 * m7 + (args.batch - n7) * m14) / args.batch + mr
    cascade_macs = m7 + float((exits == 1).double().mean()) * m14
    one = x[:1]
    variants = [
        Variant("P14, timm", "timm", lambda: timm14(x), lambda: timm14(one), len(x), 1, m14),
        Variant(f"routed {args.mix:g} to P7", "adaptok", lambda: routed_call(x, route), lambda: routed_call(one, one7),
                len(x), 1, routed_macs),
        Variant("routed, bs1 at 14", "adaptok", lambda: routed_call(x, route), lambda: routed_call(one, one14),
                len(x), 1, routed_macs),
        Variant("cascade 7 -> 14", "baseline", lambda: cascade(x), lambda: cascade(one), len(x), 1, cascade_macs),
    ]
    samples = measure(variants, device, args.repeats, args.warmup, progress=False)
    results = {}
    for v in variants:
        b, s1 = summarize(samples[(v.name, "batch")]), summarize(samples[(v.name, "single")])
        results[v.name] = {"images_per_s": v.images / b["median_s"], "batch": b, "single": s1,
                           "single_ms_mean": 1e3 * statistics.fmean(samples[(v.name, "single")]),
                           "gmacs": v.macs / 1e9, "top1": None}
    name = f"routed {args.mix:g} to P7"
    results["routed, bs1 at 14"]["note"] = "batch column repeats the routed batch; bs1 is an image routed to P14"
    base = samples[("P14, timm", "single")]
    weighted = [args.mix * a + (1 - args.mix) * b for a, b in zip(samples[(name, "single")],
                                                                   samples[("routed, bs1 at 14", "single")])]
    ratio = m14 / routed_macs
    speedup = results[name]["images_per_s"] / results["P14, timm"]["images_per_s"]
    bs1 = paired(weighted, base)
    results[name].update(speedup_over_p14=speedup, mac_ratio=ratio, share_p7=100.0 * args.mix,
                         vs_cascade=results[name]["images_per_s"] / results["cascade 7 -> 14"]["images_per_s"],
                         bs1_vs_p14=bs1)
    rows = [{"target": f"{name}: speed-up over P14 (timm) / its MAC ratio {ratio:.2f}x", "measured": speedup / ratio,
             "goal": 0.9, "higher": True},
            {"target": f"{name} vs the cascade sending the same share to P14 (images/s ratio)",
             "measured": results[name]["vs_cascade"], "goal": 1.0, "higher": True},
            {"target": f"{name}: batch size 1, mix-weighted latency / P14 (timm), paired", "measured": bs1["median"],
             "goal": 1.0, "higher": False}]
    for t in rows:
        t["met"] = t["measured"] >= t["goal"] if t["higher"] else t["measured"] <= t["goal"]
    return {"results": results, "targets": rows, "cascade_threshold": threshold,
            "cascade_share_to_p14": 100.0 * float((exits == 1).double().mean())}


def table(rep: dict) -> str:
    env = rep["environment"]
    what = (f"{rep['model']} on random weights, route mix {rep['mix']:g} to P7" if rep.get("model") else
            "the P7/P10/P14 cascade (lab models, animal-mnist val)")
    lines = [f"routed P7/P14 and {what}, on {env['device']}, "
             f"{rep['dtype']}, torch {env['torch']}, adaptok {env['commit'][:12]}",
             f"batch {rep['batch']}, medians of {rep['repeats']} rounds; batch size 1: "
             + (f"one image, {10 * rep['repeats']} calls" if rep.get("model") else
                f"mean over {rep['single']} images, {10 * rep['repeats']} calls"),
             f"{'variant':22s} {'images/s':>9s} {'IQR %':>6s} {'top-1 %':>8s} {'GMACs/img':>9s} {'bs1 ms':>7s}"]
    lines += [result_line(name, r, 22) for name, r in rep["results"].items()]
    for name, r in rep["results"].items():
        if "speedup_over_p14" in r:
            s = r["bs1_vs_p14"]
            lines.append(f"{name}: {r['share_p7']:.0f} % to P7; speed-up over P14 {r['speedup_over_p14']:.2f}x for a "
                         f"MAC ratio {r['mac_ratio']:.2f}x; vs cascade {r['vs_cascade']:.2f}x; bs1 / P14 "
                         f"{s['median']:.3f} ({s['q1']:.3f}-{s['q3']:.3f})")
    return "\n".join(lines + target_lines(rep["targets"]))


def family_parser(prog: str, doc: str, defaults: dict) -> argparse.ArgumentParser:
    """The arguments every model-family benchmark takes (``defaults``: the
    checkpoints, ``{name: path}``); each adds its own."""
    from adaptok.train.cli import key_value

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    for k, v in defaults.items():
        p.add_argument(f"--{k}", default=v, help=f"checkpoint (default: {os.path.relpath(v)})")
    p.add_argument("--model", default=None, help="a timm ViT on random weights instead of the lab models, e.g. "
                   "deit_small_patch16_224 (the paper's scale)")
    p.add_argument("--model-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 256)")
    p.add_argument("--single", type=int, default=16, help="images cycled through at batch size 1")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20 GPU, 7 CPU; bs1 gets 10x)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="bench-out")
    return p


def parse_family_args(p: argparse.ArgumentParser, argv, batch=lambda args, device: 256) -> tuple:
    """``(args, device, dtype)``, the shared arguments checked; ``batch(args,
    device)``: the default batch."""
    args = p.parse_args(argv)
    args.model_kwargs = dict(args.model_arg)
    device = torch.device(args.device) if args.device else default_device()
    args.batch = args.batch or batch(args, device)
    if args.batch < 1 or args.single < 1 or not 1 <= args.single <= args.batch:
        p.error("--batch and --single must be >= 1, and --single at most --batch")
    args.repeats = args.repeats or (20 if device.type == "cuda" else 7)
    return args, device, getattr(torch, args.dtype)


def result_line(name: str, r: dict, width: int, middle: str = "") -> str:
    """One variant's row: images/s, IQR, top-1, ``middle``, GMACs, bs1 ms."""
    b = r["batch"]
    iqr = 100 * (b["q3_s"] - b["q1_s"]) / b["median_s"]
    top1 = f"{r['top1']:8.2f}" if r.get("top1") is not None else f"{'-':>8s}"
    return (f"{name:{width}s} {r['images_per_s']:9.1f} {iqr:6.1f} {top1}{middle} {r['gmacs']:9.4f} "
            f"{r['single_ms_mean']:7.2f}")


def main(argv: Optional[list] = None) -> None:
    p = family_parser("python -m adaptok.bench.routing", __doc__, DEFAULTS)
    p.add_argument("--threshold", type=float, nargs="+", default=[0.0, 0.5],
                   help="router thresholds, one routed variant each (default: 0, repro/routing's operating point "
                        "picked on train, and 0.5)")
    p.add_argument("--mix", type=float, default=0.5, help="with --model: the share of images routed to P7")
    args, device, dtype = parse_family_args(p, argv)
    if not 0.0 <= args.mix <= 1.0:
        p.error(f"--mix must be in [0, 1], got {args.mix}")
    rep = {"environment": environment(device), "dtype": args.dtype, "batch": args.batch, "single": args.single,
           "repeats": args.repeats}
    if args.model:
        rep.update(model=args.model, model_kwargs=args.model_kwargs, mix=args.mix)
        rep.update(synthetic(args, device, dtype))
    else:
        rep["checkpoints"] = {k: os.path.relpath(getattr(args, k)) for k in DEFAULTS}
        rep.update(run(args, device, dtype))
    print(table(rep))
    print(f"wrote {write_report(rep, args.out, 'routing-bench.json')}")


if __name__ == "__main__":
    sys.exit(main())
