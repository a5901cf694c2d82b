"""CF-ViT's speed (``python -m adaptok.bench.cfvit``): end-to-end images per
second, everything inside the timed call (resize, coarse pass, exit, fine
sequences, fine pass, reordering), in one run:

- ``P14, timm``: the plain timm model at 14x14 tokens (what users run
  without adaptok);
- ``CF-ViT eta=..., adaptok``: :class:`adaptok.models.cfvit.CFViT` at each
  exit threshold;
- ``CF-ViT eta=..., official``: the same weights through
  :func:`adaptok.bench.baselines.cfvit_official`, CF-ViT's official
  computation (N x N maps kept, argsort and index arithmetic, a
  boolean-masked dense sub-batch).

The default models are ``repro/cfvit``'s CF-ViT and ``repro/deit_evit``'s P14
(``--cfvit``, ``--p14`` to use others) on the first ``--batch`` images of
animal-mnist's val split. The thresholds are 0 (every image exits after the
coarse pass), 1 (none does: both passes for every image), ``~P14``: the
threshold ``repro/cfvit`` picked on the training split to reach P14's
training top-1, and ``half exit``: the one at which half its training images
exit (with other checkpoints, or without those results: on the benchmark
images, the lowest threshold whose top-1 reaches P14's, else the most
accurate one, and the median confidence). The report says which. At batch size 1 the first
``--single`` images are run in turn, every variant on the same image in a
round: the latency is the mean over those images, whose exits differ.

``--model deit_small_patch16_224`` (any timm ViT CF-ViT can convert) runs the
same at the paper's scale on random weights: the threshold is set so that
``--exit`` of the batch exits after the coarse pass (a quantile of the
coarse confidence), and there is no accuracy to match.

Rounds interleave the variants and every other round runs them in reverse;
medians and quartiles are reported. Writes ``cfvit-bench.json`` to
``--out``.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
from typing import Optional

import torch

from adaptok.bench.e2e import Variant, measure, paired, target_lines
from adaptok.bench.routing import bench_images, family_parser, parse_family_args, plain_timm, result_line
from adaptok.bench.timing import environment, summarize, write_report

_REPRO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "repro")
DEFAULTS = {"cfvit": os.path.join(_REPRO, "cfvit", "checkpoints", "cfvit-s0.pth"),
            "p14": os.path.join(_REPRO, "deit_evit", "checkpoints", "p14-s0.pth")}
RESULTS = os.path.join(_REPRO, "cfvit", "results", "results.json")


def operating_eta(path: str, rule: str, seed: int = 0) -> Optional[float]:
    """The eta ``repro/cfvit`` picked on the training split by ``rule``
    (``"p14"``: to reach P14's training top-1; ``"half"``: half the images
    exit), from its results.json, or None."""
    import json

    if not os.path.exists(path):
        return None
    with open(path) as f:
        runs = json.load(f)["per_seed"].get(str(seed), {}).get("runs", {})
    return runs.get("cfvit", {}).get("operating", {}).get(rule, {}).get("eta")


def _single(fn, x, n):
    """A closure that runs ``fn`` on the next of the first ``n`` images each call."""
    state = {"i": 0}

    def call():
        i = state["i"] % n
        state["i"] += 1
        return fn(x[i:i + 1])
    return call


def variants_for(model, timm14, x, etas, single: int, p14_macs: float):
    """The P14 variant and an adaptok and an official variant per threshold,
    with ``(name -> {eta, exited %, gmacs})``."""
    from adaptok.bench.baselines import cfvit_official

    out = [Variant("P14, timm", "timm", lambda: timm14(x), _single(timm14, x, single), len(x), 1, p14_macs)]
    info = {"P14, timm": {"gmacs": p14_macs / 1e9}}
    for label, eta in etas:
        m = copy.copy(model)
        m.eta = eta
        with torch.inference_mode():
            _, spent = m.forward_with_macs(x)
        exited = spent == m.stage_macs(x)[0]  # an image that exited spent the coarse pass only
        gm = float(spent.double().mean())
        for family, fn in (("adaptok", (lambda t, m=m: m(t))), ("baseline", (lambda t, e=eta: cfvit_official(model, t,
                                                                                                                e)))):
            name = f"CF-ViT eta={label}, {'adaptok' if family == 'adaptok' else 'official'}"
            out.append(Variant(name, family, (lambda f=fn: f(x)), _single(fn, x, single), len(x), 1, gm))
            info[name] = {"eta": eta, "exited_pct": 100.0 * float(exited.double().mean()), "gmacs": gm / 1e9}
    return out, info


def summarize_all(variants, samples, info, single: int, lab: bool) -> tuple[dict, list]:
    base = "P14, timm"
    results = {}
    for v in variants:
        b, s = summarize(samples[(v.name, "batch")]), summarize(samples[(v.name, "single")])
        results[v.name] = {**info[v.name], "images_per_s": v.images / b["median_s"], "batch": b,
                           "single_ms_mean": 1e3 * statistics.fmean(samples[(v.name, "single")]), "single": s}

    def bs1(name: str) -> dict:
        """Per pass through the ``single`` images, the mean latency over
        P14's over the same images and rounds (paired)."""
        a, b = samples[(name, "single")], samples[(base, "single")]
        sums = lambda t: [sum(t[i:i + single]) for i in range(0, len(t) - single + 1, single)]  # noqa: E731
        return paired(sums(a), sums(b))

    rows = []
    p14 = results[base]
    for name, r in results.items():
        if not name.endswith("adaptok"):
            continue
        official = results[name.replace("adaptok", "official")]
        r["vs_official"] = r["images_per_s"] / official["images_per_s"]
        r["speedup_over_p14"] = r["images_per_s"] / p14["images_per_s"]
        r["mac_ratio"] = p14["gmacs"] / r["gmacs"]
        r["bs1_vs_p14"] = bs1(name)
        r["bs1_vs_official"] = paired(samples[(name, "single")], samples[(name.replace("adaptok", "official"),
                                                                          "single")])
        label = name.split(",")[0]
        rows.append({"target": f"{label}: faster than the official path (images/s ratio)", "measured":
                     r["vs_official"], "goal": 1.0, "higher": True})
        rows.append({"target": f"{label}: batch size 1 faster than the official path (latency ratio, paired)",
                     "measured": r["bs1_vs_official"]["median"], "goal": 1.0, "higher": False})
        if r.get("matched") or not lab and r["exited_pct"] not in (0.0, 100.0):
            rows.append({"target": f"{label}: speed-up over P14 (timm) / its MAC ratio {r['mac_ratio']:.2f}x",
                         "measured": r["speedup_over_p14"] / r["mac_ratio"], "goal": 0.9, "higher": True})
            rows.append({"target": f"{label}: batch size 1 latency / P14 (timm), mean over {single} images",
                         "measured": r["bs1_vs_p14"]["median"], "goal": 1.0, "higher": False})
    for t in rows:
        t["met"] = t["measured"] >= t["goal"] if t["higher"] else t["measured"] <= t["goal"]
    return results, rows


def run(args, device, dtype) -> dict:
    """The lab models on real images (see the module docstring)."""
    from adaptok.cost import macs
    from adaptok.models.cfvit import confidence, exits, pick_eta
    from adaptok.train import create_model

    for k in DEFAULTS:
        if not os.path.exists(getattr(args, k)):
            raise SystemExit(f"--{k} {getattr(args, k)!r} does not exist (the defaults are the repository's "
                             f"repro/ checkpoints; pass your own)")
    model = create_model(checkpoint=args.cfvit).eval().to(device, dtype)
    p14 = create_model(checkpoint=args.p14).eval().to(device, dtype)
    timm14 = plain_timm(p14).to(device, dtype)
    x, y = bench_images(args, device, dtype)
    with torch.inference_mode():
        coarse, fine = (t.float() for t in model(x, stages=True))
        p14_top1 = 100.0 * float((timm14(x).argmax(-1) == y).double().mean())
    ours = args.cfvit == DEFAULTS["cfvit"]
    eta, half = (operating_eta(args.results, r) if ours else None for r in ("p14", "half"))
    picked = "on train by repro/cfvit"
    if eta is None or half is None:
        found = pick_eta(coarse, fine, y, p14_top1) or pick_eta(coarse, fine, y)
        eta, half, picked = found["eta"], float(confidence(coarse).median()), "on the benchmark images"
    tags: dict = {}  # a threshold picked twice runs once, under both names
    for e, tag in ((0.0, None), (eta, "~P14"), (half, "half exit"), (1.0, None)):
        tags.setdefault(e, [])
        if tag:
            tags[e].append(tag)
    etas = [(f"{e:.3g}" + (f" ({', '.join(t)})" if t else ""), e) for e, t in tags.items()]
    variants, info = variants_for(model, timm14, x, etas, args.single, macs(timm14))
    info["P14, timm"]["top1"] = p14_top1
    for name, r in info.items():
        if "eta" in r:
            logits = torch.where(exits(coarse, r["eta"])[:, None], coarse, fine)
            r["top1"] = 100.0 * float((logits.argmax(-1) == y).double().mean())
            r["matched"] = "~P14" in name
    samples = measure(variants, device, args.repeats, args.warmup, progress=False)
    results, rows = summarize_all(variants, samples, info, args.single, lab=True)
    return {"results": results, "targets": rows, "matched_eta": eta, "eta_picked": picked}


def synthetic(args, device, dtype) -> dict:
    """The paper's scale on random weights (see the module docstring)."""
    import timm

    from adaptok.cost import macs
    from adaptok.models import cfvit

    torch.manual_seed(0)
    timm14 = timm.create_model(args.model, **args.model_kwargs).eval().to(device, dtype)
    model = cfvit.convert(copy.deepcopy(timm14)).eval()
    side = int(timm14.patch_embed.img_size[0])
    chans = int(timm14.patch_embed.proj.in_channels)
    x = torch.randn(args.batch, chans, side, side, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.inference_mode():
        conf = cfvit.confidence(model(x, stages=True)[0])
    eta = (0.0 if args.exit == 1 else 1.0 if args.exit == 0 else float(torch.quantile(conf, 1 - args.exit)))
    variants, info = variants_for(model, timm14, x, [(f"{eta:.3g}", eta)], args.single, macs(timm14))
    for r in info.values():
        r["top1"] = None
    samples = measure(variants, device, args.repeats, args.warmup, progress=False)
    results, rows = summarize_all(variants, samples, info, args.single, lab=False)
    return {"results": results, "targets": rows, "eta": eta}


def table(rep: dict) -> str:
    env = rep["environment"]
    what = (f"{rep['model']} on random weights, {100 * rep['exit']:g} % exiting" if rep.get("model") else
            "lab models, animal-mnist val")
    lines = [f"CF-ViT ({what}) on {env['device']}, {rep['dtype']}, torch {env['torch']}, adaptok "
             f"{env['commit'][:12]}",
             f"batch {rep['batch']}, medians of {rep['repeats']} rounds; batch size 1: mean over {rep['single']} "
             f"images, {10 * rep['repeats']} calls",
             f"{'variant':36s} {'images/s':>9s} {'IQR %':>6s} {'top-1 %':>8s} {'exit %':>7s} {'GMACs/img':>9s} "
             f"{'bs1 ms':>7s}"]
    lines += [result_line(name, r, 36, f" {r['exited_pct']:7.1f}" if "exited_pct" in r else f" {'-':>7s}")
              for name, r in rep["results"].items()]
    for name, r in rep["results"].items():
        if "speedup_over_p14" in r:
            s = r["bs1_vs_p14"]
            lines.append(f"{name}: speed-up over P14 {r['speedup_over_p14']:.2f}x for a MAC ratio "
                         f"{r['mac_ratio']:.2f}x; vs official {r['vs_official']:.2f}x; bs1 / P14 {s['median']:.3f} "
                         f"({s['q1']:.3f}-{s['q3']:.3f})")
    return "\n".join(lines + target_lines(rep["targets"]))


def main(argv: Optional[list] = None) -> None:
    p = family_parser("python -m adaptok.bench.cfvit", __doc__, DEFAULTS)
    p.add_argument("--results", default=RESULTS, help="repro/cfvit's results.json: the eta it picked on train "
                   "to reach P14 (with the default checkpoint)")
    p.add_argument("--exit", type=float, default=0.5, help="with --model: the share of images exiting after the "
                   "coarse pass")
    args, device, dtype = parse_family_args(p, argv, batch=lambda a, d: 64 if a.model and d.type == "cpu" else 256)
    if not 0.0 <= args.exit <= 1.0:
        p.error(f"--exit must be in [0, 1], got {args.exit}")
    rep = {"environment": environment(device), "dtype": args.dtype, "batch": args.batch, "single": args.single,
           "repeats": args.repeats}
    if args.model:
        rep.update(model=args.model, model_kwargs=args.model_kwargs, exit=args.exit)
        rep.update(synthetic(args, device, dtype))
    else:
        rep["checkpoints"] = {k: os.path.relpath(getattr(args, k)) for k in DEFAULTS}
        rep.update(run(args, device, dtype))
    print(table(rep))
    print(f"wrote {write_report(rep, args.out, 'cfvit-bench.json')}")


if __name__ == "__main__":
    sys.exit(main())
