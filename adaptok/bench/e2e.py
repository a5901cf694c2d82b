"""``adaptok-bench`` (or ``python -m adaptok.bench``): end-to-end images per
second of a timm ViT (DeiT-S by default, random weights unless a checkpoint
is given) run with adaptok, next to what users run without it, in one run.

Variants, each at the batch size and at batch size 1:

- ``timm``: the unpatched model;
- ``timm, second copy``: the A/A control, a copy of the same model timed
  like every variant (its ratio to ``timm`` is what "the same work"
  measures as in the run);
- ``adaptok parity``: ``adaptok.patch(model)``, the same computation;
- ``EViT adaptok``: ``adaptok.patch(model, keep_rate=...)``;
- ``EViT public code``: the same EViT computed as its public code does
  (attention matrices materialized, topk/gather/complement);
- ``mix packed adaptok``: a batch mixing 7x7 and 14x14 images (``--mix`` of
  them 7x7) in one packed forward, ``model(images, grid=...)``;
- ``mix padded``: the same batch padded to 197 tokens with a key mask;
- ``mix 2 batches``: the same batch as one timm call per grid;
- ``grid 7 adaptok``: every image at the 7x7 grid, ``model(images, grid=7)``;
- ``timm at grid 7``: the same work as timm runs it, on images resized to
  112 pixels inside the call.

Resizing, packing and reordering are inside the timed calls. On the CPU the
memory allocator is left as it is (glibc maps fresh pages for tensors over
32 MiB, which costs large batches page faults); ``--steady-allocator`` makes
it reuse freed memory instead (:func:`adaptok.bench.timing.steady_allocator`).
The GPU runs
bfloat16 with 256 images (512 mixed); the CPU 32 images, in bfloat16 when it
computes bf16 natively (AVX-512 BF16 or AMX), else float32. The best of
1024^2, 2048^2 and 4096^2 matmuls in the same dtype (``a @ b``, and on the
CPU also oneDNN's prepacked matmul that adaptok's linear layers may take),
timed in the same run, is the machine's ceiling: each variant's share of it is ``2 * MACs * images/s``
over its FLOP/s. Prints a
table and the targets (at batch size 1, every adaptok variant against the
plain-PyTorch path doing the same work), and writes ``adaptok-bench.json`` (device, versions,
commit, every sample's median and spread) and ``adaptok-bench.png``
(images/second against GMACs per image) to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import adaptok
from adaptok import tuning
from adaptok.bench import baselines
from adaptok.bench.timing import environment, steady_allocator, summarize, synchronize, time_once, write_report
from adaptok.cost import macs
from adaptok.devices import cpu_has_bf16, default_device
from adaptok.layout import mixed_grids


# The A/A control: a second copy of the timm model, timed like every variant.
# Its ratio to timm shows what "the same work" measures as in this run.
CONTROL = "timm, second copy"


@dataclass
class Variant:
    """One way to run the model: ``batch()`` processes the benchmark batch,
    ``single()`` one image (the mixed variants: a batch of two, one 7x7 and
    one 14x14 image), ``macs`` per image."""

    name: str
    family: str
    batch: Callable[[], object]
    single: Callable[[], object]
    images: int
    single_images: int
    macs: float


def build(args, device: torch.device, dtype: torch.dtype) -> list[Variant]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    if args.checkpoint:
        timm.models.load_checkpoint(model, args.checkpoint)
    model = model.to(device, dtype).eval()
    native = model.patch_embed.grid_size[0]
    small = max(1, native // 2)
    parity = adaptok.patch(copy.deepcopy(model))
    evit = adaptok.patch(copy.deepcopy(model), keep_rate=args.keep_rate)
    separate = baselines.SeparateBatches(model, (small, native))
    padded = baselines.PaddedMixedGrid(model, (small, native))

    g = torch.Generator().manual_seed(1)
    size = tuple(model.patch_embed.img_size)
    x = torch.randn(args.batch, 3, *size, generator=g).to(device, dtype)
    xm = torch.randn(args.mix_batch, 3, *size, generator=g).to(device, dtype)
    grid = mixed_grids(args.mix_batch, args.mix, small, native)
    grid_t = torch.tensor(grid)
    one, two = x[:1], xm[:2]
    pair = [small, native]
    coarse = baselines.SeparateBatches(model, (small,))  # timm at the small grid's resolution, resize included
    conv = (native ** 2 - small ** 2) * parity.patch_embed.proj.weight.numel()
    mix_macs = args.mix * macs(parity, small) + (1 - args.mix) * macs(parity, native)
    # Padding runs a 7x7 image's blocks on 197 tokens; only its patch embedding is smaller.
    padded_macs = macs(parity, native) - args.mix * conv
    evit_macs, full_macs = macs(evit), macs(parity)
    kr = args.keep_rate

    def evit_public(x):
        return baselines.evit_public(model, x, keep_rate=kr)

    twin = copy.deepcopy(model)  # the A/A control: timm against itself, its weights elsewhere in memory
    if args.compile:
        model, twin, parity, evit, evit_public, padded = (torch.compile(f) for f in
                                                          (model, twin, parity, evit, evit_public, padded))
        for s in (separate, coarse):
            s.models = {k: torch.compile(m) for k, m in s.models.items()}
    return [
        Variant("timm", "timm", lambda: model(x), lambda: model(one), args.batch, 1, full_macs),
        Variant(CONTROL, "control", lambda: twin(x), lambda: twin(one), args.batch, 1, full_macs),
        Variant("adaptok parity", "adaptok", lambda: parity(x), lambda: parity(one), args.batch, 1, full_macs),
        Variant(f"EViT {kr} adaptok", "adaptok", lambda: evit(x), lambda: evit(one), args.batch, 1, evit_macs),
        Variant(f"EViT {kr} public code", "baseline", lambda: evit_public(x), lambda: evit_public(one), args.batch, 1,
                evit_macs),
        Variant("mix packed adaptok", "adaptok", lambda: parity(xm, grid=grid_t), lambda: parity(two, grid=pair),
                args.mix_batch, 2, mix_macs),
        Variant("mix padded", "baseline", lambda: padded(xm, grid), lambda: padded(two, pair), args.mix_batch, 2,
                padded_macs),
        Variant("mix 2 batches", "baseline", lambda: separate(xm, grid), lambda: separate(two, pair),
                args.mix_batch, 2, mix_macs),
        Variant(f"grid {small} adaptok", "adaptok", lambda: parity(x, grid=small), lambda: parity(one, grid=small),
                args.batch, 1, macs(parity, small)),
        Variant(f"timm at grid {small}", "baseline", lambda: coarse(x, [small] * len(x)),
                lambda: coarse(one, [small]), args.batch, 1, macs(parity, small)),
    ]


def measure(variants: list[Variant], device: torch.device, repeats: int, warmup: int, progress: bool,
            single_repeats: Optional[int] = None) -> dict:
    """Seconds per call of every variant, batch and single image, one sample
    per round. Rounds interleave the variants (one call each per round), so
    that a machine that speeds up or slows down during the run shifts them
    all, and every other round runs them in reverse order, so that no
    variant always follows the same one. The batch-size-1 calls are cheap:
    they get ``single_repeats`` rounds (default: ten per batch round)."""
    calls = [(v, mode) for mode in ("batch", "single") for v in variants]
    rounds = {"batch": repeats, "single": single_repeats or 10 * repeats}
    total = sum(warmup + rounds[mode] for _, mode in calls)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="call", desc="adaptok-bench", leave=False)
    samples: dict = {(v.name, mode): [] for v, mode in calls}
    with torch.inference_mode():
        for mode in ("batch", "single"):
            group = [v for v, m in calls if m == mode]
            for r in range(warmup + rounds[mode]):
                for v in (group if r % 2 == 0 else group[::-1]):
                    fn = v.batch if mode == "batch" else v.single
                    if r < warmup:
                        fn()
                        synchronize(device)
                    else:
                        samples[(v.name, mode)].append(time_once(fn, device))
                    if bar is not None:
                        bar.update()
    if bar is not None:
        bar.close()
    return samples


def matmul_rate(device: torch.device, dtype: torch.dtype, sizes=(1024, 2048, 4096), repeats: int = 5) -> dict:
    """FLOP/s of square matmuls in ``dtype`` (median of ``repeats`` calls per
    size and path), and their best: the machine's ceiling each variant is set
    against (``{"best": flops, "by_size": {n: best flops}, "by_path": {path:
    {n: flops}}}``). The paths: ``a @ b``, and on the CPU also oneDNN's
    matmul with ``b`` prepacked (:mod:`adaptok.nn.linear`), which adaptok's
    linear layers may take and which can beat ``a @ b``."""
    from ..nn.linear import _PACKABLE, LINEAR, AdaptiveLinear

    by_path: dict = {}
    with torch.inference_mode():
        for n in sizes:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            paths = {"matmul": lambda: a @ b}
            if device.type == "cpu" and dtype in _PACKABLE:
                layer = AdaptiveLinear(n, n, bias=False, device=device, dtype=dtype)
                layer.weight.data.copy_(b.t())

                def packed():
                    with LINEAR.force("packed"):
                        return layer(a)
                paths["prepacked"] = packed
            for path, fn in paths.items():
                for _ in range(2):
                    fn()
                synchronize(device)
                seconds = summarize([time_once(fn, device) for _ in range(repeats)])["median_s"]
                by_path.setdefault(path, {})[n] = 2 * n ** 3 / seconds
    by_size = {n: max(rates[n] for rates in by_path.values()) for n in sizes}
    return {"best": max(by_size.values()), "by_size": by_size, "by_path": by_path}


def report(args, device, dtype, variants: list[Variant], samples: dict, peak: float) -> dict:
    results = []
    for v in variants:
        batch, single = summarize(samples[(v.name, "batch")]), summarize(samples[(v.name, "single")])
        rate = v.images / batch["median_s"]
        results.append({"variant": v.name, "family": v.family, "images": v.images, "gmacs_per_image": v.macs / 1e9,
                        "batch": batch, "images_per_s": rate, "matmul_fraction": 2 * v.macs * rate / peak["best"],
                        "single": single, "single_ms_per_image": 1e3 * single["median_s"] / v.single_images,
                        "single_images": v.single_images})
    out = {"environment": {**environment(device), "host_allocator": args.allocator}, "model": args.model,
           "checkpoint": args.checkpoint, "dtype": str(dtype).replace("torch.", ""), "batch": args.batch,
           "mix_batch": args.mix_batch, "mix": args.mix, "keep_rate": args.keep_rate, "compile": args.compile, "repeats": args.repeats,
           "single_repeats": args.single_repeats,
           "matmul_tflops": peak["best"] / 1e12,
           "matmul_tflops_by_size": {str(n): f / 1e12 for n, f in peak["by_size"].items()},
           "matmul_tflops_by_path": {path: {str(n): f / 1e12 for n, f in rates.items()}
                                     for path, rates in peak["by_path"].items()}, "results": results}
    out["paired_single"] = {f"{a}/{b}": paired(samples[(a, "single")], samples[(b, "single")])
                            for a, b in single_pairs(variants)}
    if (CONTROL, "single") in samples:
        out["control_single"] = paired(samples[(CONTROL, "single")], samples[("timm", "single")])
    out["measured_choices"] = {name: {str(key): option for key, option in choices.items()}
                               for name, choices in tuning.measured().items() if choices}
    out["targets"] = targets(out, device.type == "cuda")
    return out


def single_pairs(variants) -> list[tuple[str, str]]:
    """(adaptok variant, the plain-PyTorch path doing the same work) at
    batch size 1."""
    names = [v.name for v in variants]
    evit = next(n for n in names if n.startswith("EViT") and n.endswith("adaptok"))
    small = next(n for n in names if n.startswith("grid "))
    return [("adaptok parity", "timm"), (evit, evit.replace("adaptok", "public code")),
            ("mix packed adaptok", "mix 2 batches"), (small, "timm at " + small.replace(" adaptok", ""))]


def paired(a: list[float], b: list[float]) -> dict:
    """Median, quartiles and a 95 % confidence interval of the median of
    the per-round ratios ``a[r] / b[r]`` (the two were timed in the same
    round, next to each other). The interval is distribution-free: the
    order statistics of ranks ``n/2 -+ 0.98 sqrt(n)`` (1-based, rounded
    outwards; the normal approximation of Binomial(n, 1/2)), the whole
    range for a few rounds."""
    ratios = [x / y for x, y in zip(a, b)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    ordered, n = sorted(ratios), len(ratios)
    half = 0.98 * math.sqrt(n)  # 1.96 standard deviations of Binomial(n, 1/2)
    lo, hi = max(0, math.floor(n / 2 - half) - 1), min(n - 1, math.ceil(1 + n / 2 + half) - 1)  # 0-based ranks
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "ci95": [ordered[lo], ordered[hi]], "n": n}


def targets(rep: dict, gpu: bool) -> list[dict]:
    """The issue's speed targets, with the measured ratio of each."""
    by = {r["variant"]: r for r in rep["results"]}
    kr = rep["keep_rate"]
    rate = {name: r["images_per_s"] for name, r in by.items()}
    lat = {name: r["single_ms_per_image"] for name, r in by.items()}
    evit, public = f"EViT {kr} adaptok", f"EViT {kr} public code"
    rows = []

    def add(what, value, goal, higher=True, ci=None):
        met = value >= goal if higher else value <= goal
        # A paired ratio whose 95 % interval holds the goal is a tie: not shown worse at this run's resolution.
        tie = not met and ci is not None and (ci[1] >= goal if higher else ci[0] <= goal)
        rows.append({"target": what, "measured": value, "goal": goal, "higher": higher, "met": met, "tie": tie,
                     **({"ci95": ci} if ci is not None else {})})

    if gpu:
        add("parity vs timm (images/s ratio)", rate["adaptok parity"] / rate["timm"], 1.0)
        add(f"EViT {kr} vs timm", rate[evit] / rate["timm"], 1.5)
        add(f"EViT {kr} vs its public code", rate[evit] / rate[public], 1.3)
        add("mix packed vs padded", rate["mix packed adaptok"] / rate["mix padded"], 1.6)
        add("mix packed time / 2 batches time", rate["mix 2 batches"] / rate["mix packed adaptok"], 1.05, higher=False)
        for name in ("adaptok parity", evit, "mix packed adaptok"):
            add(f"batch size 1: {name} latency / timm", lat[name] / lat["timm"], 1.0, higher=False)
    else:
        add(f"EViT {kr} vs timm", rate[evit] / rate["timm"], 1.6)
        add("mix packed vs the all-14x14 batch (timm)", rate["mix packed adaptok"] / rate["timm"], 1.7)
    # Batch size 1: every adaptok variant at least as fast as the plain-PyTorch path doing the same
    # work, as the median of the per-round latency ratios (paired in time): met when the median is at
    # most 1, a tie when above 1 with the 95 % interval of the median still reaching 1.
    for key, ratio in rep["paired_single"].items():
        name, peer = key.split("/")
        add(f"batch size 1: {name} latency / {peer} (paired)", ratio["median"], 1.0, higher=False, ci=ratio["ci95"])
    return rows


def table(rep: dict) -> str:
    env = rep["environment"]
    lines = [f"{rep['model']} on {env['device']}, {rep['dtype']}, batch {rep['batch']} "
             f"({rep['mix_batch']} mixed: {rep['mix']:.0%} 7x7), torch {env['torch']}, adaptok {env['commit'][:12]}"
             f"{', compiled' if rep['compile'] else ''}; medians of {rep['repeats']} rounds",
             f"matmul ceiling ({rep['dtype']}, best square matmul"
             + (f" of {' or '.join(rep['matmul_tflops_by_path'])}" if len(rep.get("matmul_tflops_by_path", {})) > 1
                else "") + ": "
             + ", ".join(f"{n}^2 {t * 1e3:.0f}" for n, t in rep["matmul_tflops_by_size"].items()) + " GFLOP/s)",
             f"{'variant':24s} {'images/s':>9s} {'IQR %':>6s} {'GMACs/img':>9s} {'vs timm':>8s} {'% matmul':>8s} "
             f"{'bs1 ms/img':>10s} {'bs1 IQR %':>9s} {'bs1 vs timm':>11s}"]
    base = next(r for r in rep["results"] if r["variant"] == "timm")
    for r in rep["results"]:
        b = r["batch"]
        iqr = 100 * (b["q3_s"] - b["q1_s"]) / b["median_s"]
        one = r["single"]
        iqr1 = 100 * (one["q3_s"] - one["q1_s"]) / one["median_s"]
        lines.append(f"{r['variant']:24s} {r['images_per_s']:9.1f} {iqr:6.1f} {r['gmacs_per_image']:9.2f} "
                     f"{r['images_per_s'] / base['images_per_s']:7.2f}x {100 * r['matmul_fraction']:7.1f}% "
                     f"{r['single_ms_per_image']:10.2f} {iqr1:9.1f} "
                     f"{base['single_ms_per_image'] / r['single_ms_per_image']:10.2f}x")
    lines.append(f"batch size 1, per-round latency ratios (median, IQR, 95 % CI of the median; "
                 f"{next(iter(rep['paired_single'].values()))['n']} rounds):")
    pairs = list(rep["paired_single"].items())
    if "control_single" in rep:
        pairs.append((f"{CONTROL}/timm (A/A control)", rep["control_single"]))
    for key, ratio in pairs:
        lo, hi = ratio["ci95"]
        lines.append(f"  {key:42s} {ratio['median']:.3f} ({ratio['q1']:.3f}-{ratio['q3']:.3f}; CI {lo:.3f}-{hi:.3f})")
    if rep.get("measured_choices"):
        lines.append("formulations chosen by measurement (adaptok.tuning):")
        for name, choices in rep["measured_choices"].items():
            lines += [f"  {name} {key}: {option}" for key, option in choices.items()]
    return "\n".join(lines + target_lines(rep["targets"]))


def target_lines(rows: list[dict]) -> list[str]:
    """``targets:`` and one line per target row (met or missed, measured, goal)."""
    def state(t):
        return "tie   " if t.get("tie") else "met   " if t["met"] else "MISSED"

    def ci(t):
        return f", 95 % CI {t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}" if "ci95" in t else ""

    legend = ["  (tie: above the goal, but the 95 % CI of the paired median reaches it: not shown slower)"]
    return ["targets:"] + [
        f"  {state(t)} {t['target']}: {t['measured']:.3f} ({'>=' if t['higher'] else '<='} {t['goal']}{ci(t)})"
        for t in rows] + (legend if any("ci95" in t for t in rows) else [])


def _place_labels(ax, points, labels, fontsize=8) -> list:
    """Annotate each point with its label where it overlaps no label placed
    before it (nor leaves the axes): the candidate offsets are tried in
    turn, right of the point first, then stacked above and below. Returns
    the labels' extents in display coordinates."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = []
    candidates = [(6, 3, "left"), (6, -11, "left"), (-6, 3, "right"), (-6, -11, "right")]
    candidates += [(dx, dy * k, ha) for k in range(2, 8) for dy in (7, -7) for dx, ha in ((6, "left"), (-6, "right"))]
    for (x, y), label in sorted(zip(points, labels), key=lambda p: -p[0][1]):
        best = None
        for dx, dy, ha in candidates:
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=fontsize)
            box = text.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in placed):
                best = (text, box)
                break
            text.remove()
        if best is None:  # nowhere free: the first candidate, with a leader line
            dx, dy, ha = candidates[0]
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy + 12 * len(placed)),
                               ha=ha, fontsize=fontsize, arrowprops={"arrowstyle": "-", "lw": 0.5})
            best = (text, text.get_window_extent(renderer))
        placed.append(best[1])
    return placed


def plot(rep: dict, path: str) -> list:
    """Images/second against GMACs per image, one labelled point per
    variant, saved to ``path``; returns the labels' extents (for tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"timm": "tab:gray", "adaptok": "tab:blue", "baseline": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    results = [r for r in rep["results"] if r["family"] in colors]  # not the A/A control
    points = [(r["gmacs_per_image"], r["images_per_s"]) for r in results]
    for r, (x, y) in zip(results, points):
        ax.scatter(x, y, color=colors[r["family"]], s=40)
    for family, color in colors.items():
        ax.scatter([], [], color=color, label=family)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.set_xlim(min(xs) - 0.25 * (max(xs) - min(xs) + 0.1), max(xs) + 0.45 * (max(xs) - min(xs) + 0.1))
    ax.set_ylim(0, max(ys) * 1.25)
    ax.set_xlabel("GMACs per image")
    mixed = f", mixed {rep['mix_batch']}" if rep["mix_batch"] != rep["batch"] else ""
    ax.set_ylabel(f"images / second (batch {rep['batch']}{mixed})")
    ax.set_title(f"{rep['model']}, {rep['environment']['device']}, {rep['dtype']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    boxes = _place_labels(ax, points, [r["variant"] for r in results])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return boxes


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="adaptok-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: DeiT-S)")
    parser.add_argument("--checkpoint", default=None, help="weights to load (default: random weights)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on a GPU and on a CPU with native bf16 (AVX-512 BF16, AMX), "
                        "else float32")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: 256 on a GPU, 32 on the CPU)")
    parser.add_argument("--mix-batch", type=int, default=None, help="images of the mixed batch (default: 512 on a GPU, "
                        "--batch on the CPU)")
    parser.add_argument("--mix", type=_fraction, default=0.5, help="fraction of 7x7 images in the mixed batch")
    parser.add_argument("--keep-rate", type=float, default=0.7, help="EViT keep rate (default 0.7)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models first")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds of the batch (default: 20 on a GPU, "
                        "5 on the CPU)")
    parser.add_argument("--single-repeats", type=int, default=None, help="timed rounds at batch size 1 (default: ten "
                        "per batch round on a GPU, 150 on the CPU, where the 95 %% interval of a paired median is then "
                        "about +-1 %%)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="bench-out", help="folder for the JSON and the plot (default: bench-out)")
    parser.add_argument("--steady-allocator", action="store_true",
                        help="CPU: make glibc reuse freed memory instead of mapping fresh pages for large tensors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is "
                        "not a terminal)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu or cpu_has_bf16() else torch.float32)
    args.batch = args.batch or (256 if gpu else 32)
    args.mix_batch = args.mix_batch or (512 if gpu else args.batch)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.single_repeats = args.single_repeats or (10 * args.repeats if gpu else 150)
    if not 0.0 < args.keep_rate <= 1.0:
        parser.error(f"--keep-rate must be in (0, 1], got {args.keep_rate}")
    args.allocator = ("the device's caching allocator" if gpu else
                      steady_allocator() if args.steady_allocator else "default")
    variants = build(args, device, dtype)
    peak = matmul_rate(device, dtype)
    progress = not args.no_progress and sys.stderr.isatty()  # no bar in logs
    samples = measure(variants, device, args.repeats, args.warmup, progress=progress,
                      single_repeats=args.single_repeats)
    rep = report(args, device, dtype, variants, samples, peak)
    print(table(rep))
    path = write_report(rep, args.out, "adaptok-bench.json")
    plot(rep, os.path.join(args.out, "adaptok-bench.png"))
    print(f"wrote {path} and adaptok-bench.png")


if __name__ == "__main__":
    main()
