"""Accuracy against the compute each image really spent: :func:`evaluate`,
:func:`plot` and ``adaptok-eval``.

For every image, evaluation records its logits, its label and the
multiply-accumulates of what ran on it: its own grid and the keep rates the
model ran with, counted by :func:`adaptok.cost.macs` (a model that decides
per image what to run, such as a router or a cascade, reports its own count
through ``forward_with_macs(images, grid) -> (logits [B, K], macs [B])``,
e.g. a ReViT with ``grid="auto"``, its assigner included). It
reports top-1, the mean GMACs per image, and the images per second of the
model calls (data loading excluded), and can save everything per image to an
``.npz`` so that threshold sweeps run offline.

Example::

    adaptok-eval --checkpoint runs/p14/last.pth --data animal-mnist --out runs/p14/eval.json
    adaptok-eval --checkpoint runs/evit/last.pth --keep-rate 0.5 0.6 0.7 0.8 0.9 1.0 --name EViT --out evit.json
    adaptok-eval --checkpoint runs/revit/last.pth --assigner runs/assigner/last.pth --threshold 0 0.5 0.9
    adaptok-eval --plot results.png runs/p14/eval.json runs/p7/eval.json evit.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .cost import macs
from .devices import native_bf16
from .layout import host_grid


def images_macs(model: nn.Module, grid, batch: int) -> torch.Tensor:
    """``[batch]`` int64: the MACs of each image through a patched ViT at
    its grid (None: the model's; an int; or one per image) with the model's
    current keep rates."""
    sides = host_grid(grid, batch) if grid is not None else (None,) * batch
    per_side = {g: macs(model, g) for g in set(sides)}
    return torch.tensor([per_side[g] for g in sides], dtype=torch.int64)


def _run(model, images: torch.Tensor, grid) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(logits, macs [B] or None)``: None when the cost follows from the
    grid and keep rates (counted outside the timed region)."""
    if hasattr(model, "forward_with_macs"):
        return model.forward_with_macs(images, grid)
    return model(images, grid=grid), None


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, grid=None, device: Optional[str] = None, amp: Optional[bool] = None,
             npz: Optional[str] = None, warmup: int = 1) -> dict:
    """Evaluate ``model`` over ``loader`` of ``(images, labels)``.

    Args:
        model: a patched timm ViT (its ``keep_rate`` as set), or any module
            with ``forward_with_macs``.
        grid: the token grid of every image: None (the model's), an int,
            or what a model that picks a grid per image takes (a ReViT's
            ``"auto"``); such a model reports its cost through
            ``forward_with_macs``.
        amp: bf16 autocast (None: where the device computes bf16 natively).
        npz: write ``logits [N, K] float32``, ``labels [N]``, ``macs [N]``
            (per image) there.
        warmup: the first ``warmup`` batches run once untimed before their
            timed run (one-time costs: allocation, position tables).

    Returns:
        ``{"top1": %, "gmacs": mean per image, "gmacs_min", "gmacs_max",
        "images_per_s", "images", "precision", "device"}``.
    """
    dev = torch.device(device or next(model.parameters()).device)
    amp = native_bf16(dev) if amp is None else amp
    was = model.training
    model.eval().to(dev)
    logits, labels, costs = [], [], []
    seconds = 0.0
    timed = 0
    for b, (images, targets) in enumerate(loader):
        if images.shape[0] == 0:
            continue
        images = images.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if b < warmup:
                _run(model, images, grid)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            out, spent = _run(model, images, grid)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds += time.perf_counter() - t0
            timed += images.shape[0]
        if spent is None:
            spent = images_macs(model, grid, images.shape[0])
        logits.append(out.float().cpu())
        labels.append(targets.cpu())
        costs.append(spent.cpu())
    model.train(was)
    if not labels:
        raise ValueError("loader yielded no images")
    logits, labels, costs = torch.cat(logits), torch.cat(labels), torch.cat(costs)
    if npz is not None:
        os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
        np.savez_compressed(npz, logits=logits.numpy(), labels=labels.numpy(), macs=costs.numpy())
    g = costs.double() / 1e9
    return {"top1": 100.0 * float((logits.argmax(-1) == labels).double().mean()), "gmacs": float(g.mean()),
            "gmacs_min": float(g.min()), "gmacs_max": float(g.max()), "images_per_s": timed / seconds,
            "images": int(labels.numel()), "precision": "bf16 autocast" if amp else "fp32", "device": str(dev)}


# -------------------------------------------------------------------- plot


def plot(results: Sequence, path: str, title: str = "Accuracy against compute") -> None:
    """Top-1 against GMACs per image, the papers' axes: a point for each
    result with one point, a curve for each with several (a sweep).

    ``results``: dicts or paths of JSON files as :func:`main` writes them:
    ``{"name": str, "points": [{"gmacs", "top1", ...}], "seeds": optional}``.
    A point may carry ``top1_std`` (over seeds): drawn as an error bar;
    a point of a curve may carry ``label``: written next to it. ``"marker": ""`` draws a dense sweep
    as a line only. With many results the legend goes below the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = []
    for r in results:
        if not isinstance(r, dict):
            with open(r) as f:
                r = json.load(f)
        loaded.append(r)
    below = len(loaded) > 6
    fig, ax = plt.subplots(figsize=(6.4, 4.6 + (0.22 * len(loaded) if below else 0)))
    if len(loaded) > 10:  # the default cycle repeats after 10 colors
        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i) for i in range(0, 20, 2)] +
                          [plt.get_cmap("tab20")(i) for i in range(1, 20, 2)])
    for r in loaded:
        pts = sorted(r["points"], key=lambda p: p["gmacs"])
        x = [p["gmacs"] for p in pts]
        y = [p["top1"] for p in pts]
        err = [p.get("top1_std", 0.0) for p in pts]
        style = dict(marker=r.get("marker", "o"), capsize=3, label=r["name"])
        if len(pts) == 1:
            ax.errorbar(x, y, yerr=err if any(err) else None, linestyle="none", markersize=8, **style)
        else:
            ax.errorbar(x, y, yerr=err if any(err) else None, **style)
            for p in pts:
                if "label" in p:
                    ax.annotate(p["label"], (p["gmacs"], p["top1"]), textcoords="offset points", xytext=(4, -10),
                                fontsize=7)
    ax.set_xlabel("GMACs per image (as executed)")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if below:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


# --------------------------------------------------------------------- cli


def _parser() -> argparse.ArgumentParser:
    from .train.cli import key_value

    p = argparse.ArgumentParser(prog="adaptok-eval", description="Accuracy, GMACs as executed, and throughput.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("::")[1])
    p.add_argument("--checkpoint", help="a lab checkpoint (adaptok-train's last.pth) or any timm checkpoint")
    p.add_argument("--model", help="timm model name (default: the lab checkpoint's)")
    p.add_argument("--model-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    p.add_argument("--data", help="'animal-mnist' or an ImageFolder root (default: the checkpoint's, else "
                                   "animal-mnist)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--grid", type=int, help="token grid side of every image (default: as trained, else the model's)")
    p.add_argument("--keep-rate", type=float, nargs="+", help="EViT keep rates: one point each, a sweep (default: as trained)")
    p.add_argument("--prune-layers", type=int, nargs="+", help="EViT prune layers (default: the model's)")
    p.add_argument("--assigner", help="a ReViT's Token-Length Assigner checkpoint: every image at the grid it picks")
    p.add_argument("--threshold", type=float, nargs="+", help="with --assigner: its thresholds, one point each "
                   "(default 0.5)")
    p.add_argument("--eta", type=float, nargs="+", help="a CF-ViT's exit thresholds, one point each, run live "
                   "(default: as trained)")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    p.add_argument("--name", help="the run's name in the plot")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--npz", help="write per-image logits, labels and MACs here ({keep} is the keep rate)")
    p.add_argument("--plot", metavar="PNG", help="plot the result JSON files given as arguments instead")
    p.add_argument("results", nargs="*", help="with --plot: result JSON files")
    return p


def _keep_rate_points(model, args, loader, dev, grid) -> list:
    rates = args.keep_rate or [model.keep_rate]
    if args.npz and len(rates) > 1 and "{keep}" not in args.npz:
        raise ValueError("--npz needs '{keep}' in its path with several --keep-rate values (one file each)")
    if args.prune_layers and rates == [None]:
        raise ValueError("--prune-layers needs a keep rate (--keep-rate, or a checkpoint trained with one)")
    points = []
    for rate in rates:
        model.set_pruning(rate, args.prune_layers)
        npz = args.npz.format(keep=rate) if args.npz else None
        point = evaluate(model, loader, grid=grid, device=str(dev), amp=args.amp, npz=npz)
        point.update(keep_rate=rate, grid=grid or int(model.patch_embed.grid_size[0]))
        if len(rates) > 1:
            point["label"] = f"{rate:g}"
        points.append(point)
        print(json.dumps(point), flush=True)
    return points


def _assigner_points(model, args, loader, dev) -> list:
    from .models.revit import TokenLengthAssigner, is_revit

    if not is_revit(model):
        raise ValueError("--assigner needs a ReViT checkpoint (trained with --method revit)")
    if args.grid is not None or args.keep_rate:
        raise ValueError("--assigner picks the grids: it cannot be combined with --grid or --keep-rate")
    model.set_assigner(TokenLengthAssigner.from_checkpoint(args.assigner).to(dev))
    thresholds = args.threshold or [0.5]
    if args.npz and len(thresholds) > 1 and "{threshold}" not in args.npz:
        raise ValueError("--npz needs '{threshold}' in its path with several --threshold values (one file each)")
    points = []
    for t in thresholds:
        model.assigner.threshold = t
        npz = args.npz.format(threshold=t) if args.npz else None
        point = evaluate(model, loader, grid="auto", device=str(dev), amp=args.amp, npz=npz)
        point.update(threshold=t, grid="auto")
        if len(thresholds) > 1:
            point["label"] = f"{t:g}"
        points.append(point)
        print(json.dumps(point), flush=True)
    return points


def _eta_points(model, args, loader, dev) -> list:
    from .models.cfvit import is_cfvit

    if not is_cfvit(model):
        raise ValueError("--eta needs a CF-ViT checkpoint (trained with --method cfvit)")
    if args.grid is not None or args.keep_rate:
        raise ValueError("--eta: CF-ViT picks its own tokens; it cannot be combined with --grid or --keep-rate")
    if args.npz and len(args.eta) > 1 and "{eta}" not in args.npz:
        raise ValueError("--npz needs '{eta}' in its path with several --eta values (one file each)")
    points = []
    for eta in args.eta:
        model.configure(eta=eta)
        point = evaluate(model, loader, device=str(dev), amp=args.amp,
                         npz=args.npz.format(eta=eta) if args.npz else None)
        point.update(eta=eta)
        if len(args.eta) > 1:
            point["label"] = f"{eta:g}"
        points.append(point)
        print(json.dumps(point), flush=True)
    return points


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import data as lab_data
    from .train.loop import create_model

    args = _parser().parse_args(argv)
    if args.plot:
        if not args.results:
            print("adaptok-eval: --plot needs result JSON files", file=sys.stderr)
            return 2
        plot(args.results, args.plot)
        print(args.plot)
        return 0
    if args.results:
        print(f"adaptok-eval: unexpected arguments {args.results} (result files go with --plot)", file=sys.stderr)
        return 2
    try:
        model = create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, use_ema=args.ema,
                             **dict(args.model_arg))
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(dev)
        trained = model.adaptok_config  # evaluate with the training run's data and normalization
        data = args.data or trained.get("data") or lab_data.ANIMAL_MNIST
        loader = lab_data.create_loader(data, args.split, args.batch_size, int(model.patch_embed.img_size[0]),
                                        int(model.patch_embed.proj.in_channels), training=False,
                                        workers=args.workers, limit=args.limit,
                                        **lab_data.eval_settings(trained.get("aug", {})))
        grid = args.grid if args.grid is not None else model.adaptok_method.get("grid")  # as trained
        if args.assigner:
            points = _assigner_points(model, args, loader, dev)
        elif args.eta:
            points = _eta_points(model, args, loader, dev)
        else:
            points = _keep_rate_points(model, args, loader, dev, grid)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"adaptok-eval: {e}", file=sys.stderr)
        return 2
    result = {"name": args.name or os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint or "model"))),
              "checkpoint": args.checkpoint, "model": args.model, "data": data, "split": args.split,
              "points": points}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
