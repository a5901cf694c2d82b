"""ReViT's speed (``python -m adaptok.bench.revit``): training images per
second of the one-pass step against the paper's Algorithm 1 loop, and
inference end to end (assigner, resize, packing and reordering inside the
timed call) against what users run without adaptok, in one run.

Inference variants, each at the batch size:

- ``timm 14x14``: the plain timm model at its own grid (DeiT);
- ``ReViT + assigner, packed``: the assigner, then one packed ReViT pass
  over the batch's grids (``--mix``);
- ``ReViT packed``: the same pass without the assigner;
- ``separate timm batches + assigner``: the assigner, then one timm call per
  grid (the models resampled per grid beforehand);
- ``padded timm + assigner``: the assigner, then one timm call on the batch
  padded to its longest sequence with a key mask;
- ``ReViT + assigner at g``, one per grid, timed at batch size 1 too: the
  batch-size-1 latency of the mix is their mix-weighted sum, per round.

With random weights the assigner's choice means nothing, so the grids of a
batch are ``--mix`` (shares per grid, spread through the batch) while the
assigner still runs on every image and its cost counts: the speed of the
pass follows from the grids, and a trained assigner's grids are what
``repro/revit`` measures. Rounds interleave the variants and every other
round runs them in reverse; medians, quartiles and per-round paired ratios
are reported. Writes ``revit-bench.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Optional

import torch

from adaptok.bench import baselines
from adaptok.bench.e2e import Variant, measure, paired, target_lines
from adaptok.bench.timing import environment, summarize, synchronize, time_once, write_report
from adaptok.cost import macs
from adaptok.devices import cpu_has_bf16, default_device


def parse_mix(text: str) -> dict:
    """``"14:0.25,10:0.25,7:0.5"`` -> ``{14: 0.25, 10: 0.25, 7: 0.5}``."""
    try:
        mix = {int(g): float(p) for g, p in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mix must look like 14:0.25,10:0.25,7:0.5, got {text!r}") from None
    if any(p < 0 for p in mix.values()) or abs(sum(mix.values()) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"--mix shares must be >= 0 and sum to 1, got {text!r}")
    return mix


def spread(mix: dict, batch: int) -> list:
    """A grid per image with ``mix``'s shares (largest remainder), spread
    through the batch so that packing has to regroup them."""
    counts = {g: int(p * batch) for g, p in mix.items()}
    for g in sorted(mix, key=lambda g: mix[g] * batch - counts[g], reverse=True)[:batch - sum(counts.values())]:
        counts[g] += 1
    out, left = [], dict(counts)
    while len(out) < batch:
        for g in sorted(left):
            if left[g]:
                out.append(g)
                left[g] -= 1
    return out


def build_models(args, device, dtype):
    import timm

    from adaptok.models import revit

    torch.manual_seed(0)
    base = timm.create_model(args.model, **args.model_kwargs)
    model = revit.convert(copy.deepcopy(base), args.grids).to(device, dtype)
    channels = model.patch_embed.proj.in_channels
    side = args.assigner_size or int(base.patch_embed.img_size[0])
    assigner = revit.TokenLengthAssigner(timm.create_model(args.assigner, num_classes=len(args.grids),
                                                           in_chans=channels), args.grids, side)
    return base.to(device, dtype).eval(), model, assigner.to(device, dtype).eval()


def inference(args, device, dtype, base, model, assigner) -> dict:
    model = model.eval()
    model.set_assigner(assigner)
    grids = sorted(args.mix, reverse=True)
    size = tuple(base.patch_embed.img_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, base.patch_embed.proj.in_channels, *size, generator=g).to(device, dtype)
    grid = spread(args.mix, args.batch)
    grid_t = torch.tensor(grid)
    separate = baselines.SeparateBatches(base, grids)
    padded = baselines.PaddedMixedGrid(base, grids)
    a_macs = assigner.macs()
    mix_macs = sum(p * macs(model, g) for g, p in args.mix.items())
    timm_mix = sum(p * macs(base, g) for g, p in args.mix.items())
    conv = base.patch_embed.proj.weight.numel()
    top = max(grids)
    padded_macs = macs(base, top) - sum(p * (top ** 2 - g ** 2) * conv for g, p in args.mix.items())
    one = x[:1]

    def with_assigner(fn):
        def run(images, grids):
            assigner(images)  # its decision is replaced by the mix (random weights); its cost is not
            return fn(images, grids)
        return run

    packed_a = with_assigner(lambda images, grids: model(images, grid=grids))
    separate_a = with_assigner(separate)
    padded_a = with_assigner(padded)
    variants = [
        Variant("timm 14x14", "timm", lambda: base(x), lambda: base(one), args.batch, 1, macs(base)),
        Variant("ReViT + assigner, packed", "adaptok", lambda: packed_a(x, grid_t), lambda: packed_a(one, [top]),
                args.batch, 1, mix_macs + a_macs),
        Variant("ReViT packed", "adaptok", lambda: model(x, grid=grid_t), lambda: model(one, grid=top), args.batch, 1,
                mix_macs),
        Variant("separate timm batches + assigner", "baseline", lambda: separate_a(x, grid),
                lambda: separate_a(one, [top]), args.batch, 1, timm_mix + a_macs),
        Variant("padded timm + assigner", "baseline", lambda: padded_a(x, grid), lambda: padded_a(one, [top]),
                args.batch, 1, padded_macs + a_macs),
    ]
    for s in grids:
        variants.append(Variant(f"ReViT + assigner at {s}", "adaptok", (lambda s=s: packed_a(x, [s] * len(x))),
                                (lambda s=s: packed_a(one, [s])), args.batch, 1, macs(model, s) + a_macs))
    samples = measure(variants, device, args.repeats, args.warmup, progress=False)
    results = {}
    for v in variants:
        b, s = summarize(samples[(v.name, "batch")]), summarize(samples[(v.name, "single")])
        results[v.name] = {"images_per_s": v.images / b["median_s"], "batch": b, "single_ms": 1e3 * s["median_s"],
                           "single": s, "gmacs_per_image": v.macs / 1e9}
    # Batch size 1 over the mix: per round, the mix-weighted latency of the grids against timm's.
    rounds = len(samples[("timm 14x14", "single")])
    weighted = [sum(p * samples[(f"ReViT + assigner at {s}", "single")][r] for s, p in args.mix.items())
                for r in range(rounds)]
    rate = {k: r["images_per_s"] for k, r in results.items()}
    mac_ratio = macs(base) / (mix_macs + a_macs)
    checks = [
        ("packed mixed pass vs separate timm batches (images/s ratio)",
         rate["ReViT + assigner, packed"] / rate["separate timm batches + assigner"], 1.0, True),
        ("packed mixed pass vs padding (images/s ratio)",
         rate["ReViT + assigner, packed"] / rate["padded timm + assigner"], 1.0, True),
        ("end-to-end speed-up over timm 14x14 / its MAC ratio",
         rate["ReViT + assigner, packed"] / rate["timm 14x14"] / mac_ratio, 0.9, True),
        ("batch size 1: mix-weighted ReViT + assigner latency / timm 14x14 (paired)",
         paired(weighted, samples[("timm 14x14", "single")])["median"], 1.0, False),
    ]
    return {"grid_mix": {str(k): v for k, v in args.mix.items()}, "batch": args.batch, "results": results,
            "mac_ratio": mac_ratio, "speedup_over_timm": rate["ReViT + assigner, packed"] / rate["timm 14x14"],
            "single_weighted": paired(weighted, samples[("timm 14x14", "single")]),
            "single_at_largest_vs_timm": paired(samples[(f"ReViT + assigner at {top}", "single")],
                                                samples[("timm 14x14", "single")]),
            "targets": [{"target": t, "measured": m, "goal": goal, "higher": hi, "met": m >= goal if hi else m <= goal}
                        for t, m, goal, hi in checks]}


def training(args, device, dtype, model) -> dict:
    """Images per second of one optimizer step: one packed pass against
    Algorithm 1's loop, alternating per round (first one untimed each)."""
    from adaptok.models import revit

    model.set_assigner(None)  # training runs the ViT only
    model = model.train()
    model.distilled_training = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(2)
    size = tuple(model.patch_embed.img_size)
    x = torch.randn(args.train_batch, model.patch_embed.proj.in_channels, *size, generator=g).to(device, dtype)
    y = torch.randint(0, model.num_classes, (args.train_batch,), generator=g).to(device)

    def one_pass():
        opt.zero_grad(set_to_none=True)
        revit.loss(model, x, y, criterion).backward()
        opt.step()

    def algorithm1():
        opt.zero_grad(set_to_none=True)
        revit.algorithm1_backward(model, x, y, criterion)
        opt.step()

    steps = {"one packed pass": one_pass, "Algorithm 1 (a pass per length)": algorithm1}
    samples = {k: [] for k in steps}
    for r in range(args.warmup + args.train_repeats):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            if r < args.warmup:
                steps[name]()
                synchronize(device)
            else:
                samples[name].append(time_once(steps[name], device))
    names = list(steps)
    return {"batch": args.train_batch, "results": {k: {"images_per_s": args.train_batch / summarize(v)["median_s"],
                                                         "step": summarize(v)} for k, v in samples.items()},
            "paired_time_ratio_one_pass_over_algorithm1": paired(samples[names[0]], samples[names[1]])}


def table(rep: dict) -> str:
    env = rep["environment"]
    inf = rep["inference"]
    lines = [f"ReViT {rep['model']} grids {rep['grids']}, assigner {rep['assigner']} at {rep['assigner_size']} px, on "
             f"{env['device']}, {rep['dtype']}, torch {env['torch']}, adaptok {env['commit'][:12]}",
             f"inference: batch {inf['batch']}, grid mix {inf['grid_mix']}, medians of {rep['repeats']} rounds "
             f"(batch size 1: {10 * rep['repeats']})",
             f"{'variant':38s} {'images/s':>9s} {'IQR %':>6s} {'GMACs/img':>9s} {'bs1 ms':>8s}"]
    for name, r in inf["results"].items():
        b = r["batch"]
        iqr = 100 * (b["q3_s"] - b["q1_s"]) / b["median_s"]
        lines.append(f"{name:38s} {r['images_per_s']:9.1f} {iqr:6.1f} {r['gmacs_per_image']:9.3f} "
                     f"{r['single_ms']:8.2f}")
    sw, sl = inf["single_weighted"], inf["single_at_largest_vs_timm"]
    lines.append(f"batch size 1, paired per round: mix-weighted / timm {sw['median']:.3f} ({sw['q1']:.3f}-"
                 f"{sw['q3']:.3f}); at the largest grid / timm {sl['median']:.3f} ({sl['q1']:.3f}-{sl['q3']:.3f})")
    lines.append(f"speed-up over timm {inf['speedup_over_timm']:.2f}x, MAC ratio {inf['mac_ratio']:.2f}x")
    tr = rep["training"]
    lines.append(f"training step, batch {tr['batch']} (medians of {rep['train_repeats']}):")
    for name, r in tr["results"].items():
        s = r["step"]
        lines.append(f"  {name:34s} {r['images_per_s']:8.1f} images/s (step {s['median_s']:.3f} s, IQR "
                     f"{s['q1_s']:.3f}-{s['q3_s']:.3f})")
    pr = tr["paired_time_ratio_one_pass_over_algorithm1"]
    lines.append(f"  one-pass / Algorithm 1 step time, paired: {pr['median']:.3f} ({pr['q1']:.3f}-{pr['q3']:.3f})")
    return "\n".join(lines + target_lines(inf["targets"]))


def main(argv: Optional[list] = None) -> None:
    from adaptok.train.cli import key_value

    p = argparse.ArgumentParser(prog="python -m adaptok.bench.revit", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT (default: DeiT-S, random weights)")
    p.add_argument("--model-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--grids", default="14,10,7", help="ReViT's grids (default 14,10,7)")
    p.add_argument("--mix", type=parse_mix, default=None,
                   help="share of each grid in a batch (default: repro/revit's assigner on val at its operating "
                        "point, rounded: 14:0.2,10:0.3,7:0.5)")
    p.add_argument("--assigner", default="mobilenetv3_small_050", help="timm classifier (default as repro/revit)")
    p.add_argument("--assigner-size", type=int, default=None, help="assigner input side (default: the ViT's)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=None, help="inference batch (default: 256 on a GPU, 32 on the CPU)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: 128 GPU, 32 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20 GPU, 5 CPU; bs1 gets 10x)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed training rounds (default: --repeats)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    from adaptok.models.revit import check_grids

    args.model_kwargs = dict(args.model_arg)
    args.grids = check_grids([int(g) for g in args.grids.split(",")])
    args.mix = args.mix or {14: 0.2, 10: 0.3, 7: 0.5}
    if set(args.mix) - set(args.grids):
        p.error(f"--mix names grids {sorted(set(args.mix) - set(args.grids))} that are not in --grids {args.grids}")
    device = torch.device(args.device) if args.device else default_device()
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu or cpu_has_bf16() else torch.float32)
    args.batch = args.batch or (256 if gpu else 32)
    args.train_batch = args.train_batch or (128 if gpu else 32)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.train_repeats = args.train_repeats or args.repeats
    base, model, assigner = build_models(args, device, dtype)
    args.assigner_size = assigner.img_size
    rep = {"environment": environment(device), "model": args.model, "model_kwargs": args.model_kwargs,
           "grids": list(args.grids), "assigner": args.assigner, "assigner_size": args.assigner_size,
           "dtype": str(dtype).replace("torch.", ""), "repeats": args.repeats, "train_repeats": args.train_repeats}
    rep["inference"] = inference(args, device, dtype, base, model, assigner)
    rep["training"] = training(args, device, dtype, model)
    print(table(rep))
    print(f"wrote {write_report(rep, args.out, 'revit-bench.json')}")


if __name__ == "__main__":
    sys.exit(main())
