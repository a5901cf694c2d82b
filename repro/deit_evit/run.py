"""Reproduce, at small scale, DeiT at 14x14 (P14) and 7x7 (P7) tokens and
EViT at keep rate 0.7 (fine-tuned from P14, and trained from scratch with
EViT's keep-rate warm-up), on animal-mnist; then evaluate every model on
the held-out split and write the table and the plot.

    python repro/deit_evit/run.py                 # every seed of config.json (resumes what is done)
    python repro/deit_evit/run.py --seeds 0       # one seed
    python repro/deit_evit/run.py --report        # only rebuild results/ from the finished runs

Checkpoints and logs go to ``--runs`` (default ``runs/deit_evit``, outside
git); results to ``repro/deit_evit/results``, and the final P14 and P7
weights of each seed to ``repro/deit_evit/checkpoints`` (1.3 MB each). Nothing is chosen on the
validation split: hyperparameters are fixed in config.json, the last epoch
is the one reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import torch

import adaptok
from adaptok import data as lab_data
from adaptok.evaluate import evaluate, plot
from adaptok.train import TrainConfig, create_model, train

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {"p14": "DeiT 14x14 (P14)", "p7": "DeiT 7x7 (P7)", "evit_ft": "EViT 0.7, fine-tuned from P14",
         "evit_scratch": "EViT 0.7, from scratch", "p14_evit_untrained": "P14 + EViT 0.7, no training",
         "p14_at7": "P14 run at grid 7, no training",
         "evit_ft_keep1": "EViT fine-tuned from P14, run at keep 1.0 (control)"}


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_config(cfg: dict, name: str, seed: int, runs: str) -> dict:
    fields = {**cfg["base"], **cfg["runs"][name], "seed": seed, "out": os.path.join(runs, f"{name}-s{seed}")}
    if fields.get("init") in cfg["runs"]:  # another run's final checkpoint
        fields["init"] = os.path.join(runs, f"{fields['init']}-s{seed}", "last.pth")
    return fields


def finished(fields: dict) -> bool:
    """Whether ``out/last.pth`` holds the last epoch of exactly this run."""
    path = os.path.join(fields["out"], "last.pth")
    if not os.path.exists(path):
        return False
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    want = json.loads(json.dumps({**dataclasses.asdict(TrainConfig(**fields))}))
    have = json.loads(json.dumps(ckpt["config"]))
    same = all(have.get(k) == v for k, v in want.items() if k not in ("resume", "out", "eval_every"))
    return same and ckpt["epoch"] == fields["epochs"]


def timed_train(fields: dict) -> None:
    """Train the run unless it is finished, adding its seconds to ``out/train_seconds``."""
    if finished(fields):
        return
    print(f"=== {fields['out']}", flush=True)
    t0 = time.time()
    train(fields, progress=False)
    with open(os.path.join(fields["out"], "train_seconds"), "a") as f:
        f.write(f"{time.time() - t0:.1f}\n")


def load_config(path: str) -> tuple[dict, dict]:
    """A study's config.json and the recipe config its ``base_from`` names."""
    with open(path) as f:
        cfg = json.load(f)
    with open(os.path.join(os.path.dirname(path), cfg["base_from"])) as f:
        return cfg, json.load(f)


def run_fields(cfg: dict, base: dict, name: str, seed: int, runs: str) -> dict:
    """The TrainConfig fields of run ``name`` of a study built on ``base``'s recipe."""
    return {**base["base"], **cfg["runs"][name], "seed": seed, "out": os.path.join(runs, f"{name}-s{seed}")}


def train_seconds(out: str):
    """The training seconds ``timed_train`` recorded in ``out`` (None: none)."""
    path = os.path.join(out, "train_seconds")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return sum(float(x) for x in f.read().split())


def evaluate_run(path: str, loader, *, keep_rate="trained", prune_layers=None, grid=None, npz=None) -> dict:
    model = create_model(checkpoint=path)
    if keep_rate != "trained":
        model.set_pruning(keep_rate, prune_layers)
    grid = grid if grid is not None else model.adaptok_method.get("grid")
    point = evaluate(model, loader, grid=grid, npz=npz, amp=False)
    point.update(keep_rate=model.keep_rate, grid=grid or 14)
    return point


def evaluate_seed(cfg: dict, seed: int, runs: str, results: str) -> dict:
    """Every model of one seed on the validation split; per-image logits to npz."""
    loader = lab_data.create_loader("animal-mnist", "val", 256, 28, 1, training=False)
    out = {}
    ck = {n: os.path.join(runs, f"{n}-s{seed}", "last.pth") for n in cfg["runs"]}
    npz = lambda n: os.path.join(results, "logits", f"{n}-s{seed}.npz")  # noqa: E731
    for name in cfg["runs"]:
        if os.path.exists(ck[name]) and finished(run_config(cfg, name, seed, runs)):
            out[name] = evaluate_run(ck[name], loader, npz=npz(name))
    if "p14" in out:
        out["p14_evit_untrained"] = evaluate_run(ck["p14"], loader, keep_rate=0.7,  # EViT's layers, untrained
                                                 prune_layers=cfg["runs"]["evit_ft"]["method_args"]["prune_layers"])
        out["p14_at7"] = evaluate_run(ck["p14"], loader, grid=7)
    if "evit_ft" in out:
        out["evit_ft_sweep"] = [evaluate_run(ck["evit_ft"], loader, keep_rate=k) for k in cfg["sweep"]]
        if 1.0 in cfg["sweep"]:  # the control: the same fine-tuned weights, nothing pruned
            out["evit_ft_keep1"] = out["evit_ft_sweep"][cfg["sweep"].index(1.0)]
    for name, r in out.items():
        print(f"seed {seed} {name}: {json.dumps(r)}", flush=True)
    return out


def export_weights(cfg: dict, runs: str, out: str, names=("p14", "p7")) -> None:
    """The final P14 and P7 of every finished seed as small lab checkpoints
    (weights, config, method; no optimizer state) that
    ``adaptok.train.create_model(checkpoint=...)`` and ``adaptok-eval`` load."""
    os.makedirs(out, exist_ok=True)
    for seed in cfg["seeds"]:
        for name in names:
            fields = run_config(cfg, name, seed, runs)
            if finished(fields):
                export_checkpoint(os.path.join(fields["out"], "last.pth"), os.path.join(out, f"{name}-s{seed}.pth"))


def export_checkpoint(last: str, dest: str) -> None:
    """A run's ``last.pth`` without its optimizer state, as a small lab
    checkpoint that ``create_model(checkpoint=...)`` and ``adaptok-eval`` load."""
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    keep = {k: ckpt[k] for k in ("config", "method", "num_classes", "epoch", "records", "state_dict")}
    torch.save(keep, dest)


def report(cfg: dict, per_seed: dict, results: str, train_s: dict) -> None:
    import numpy as np

    rows, series = [], []
    for name in ("p14", "p7", "evit_ft", "evit_ft_keep1", "evit_scratch", "p14_evit_untrained", "p14_at7"):
        pts = [per_seed[s][name] for s in sorted(per_seed) if name in per_seed[s]]
        if not pts:
            continue
        top = np.array([p["top1"] for p in pts])
        gm = pts[0]["gmacs"]
        seeds = [s for s in sorted(per_seed) if name in per_seed[s]]
        rows.append((name, top, gm, seeds, np.median([p["images_per_s"] for p in pts]),
                     [train_s.get((name, s)) for s in seeds]))
        series.append({"name": NAMES[name], "points": [{"gmacs": gm, "top1": float(top.mean()),
                                                         "top1_std": float(top.std(ddof=1)) if len(top) > 1 else 0.0}]})
    sweeps = [per_seed[s]["evit_ft_sweep"] for s in sorted(per_seed) if "evit_ft_sweep" in per_seed[s]]
    if sweeps:
        pts = []
        for i, k in enumerate(cfg["sweep"]):
            top = np.array([sw[i]["top1"] for sw in sweeps])
            pts.append({"gmacs": sweeps[0][i]["gmacs"], "top1": float(top.mean()), "label": f"{k:g}",
                        "top1_std": float(top.std(ddof=1)) if len(top) > 1 else 0.0})
        series.append({"name": "EViT fine-tuned at 0.7, evaluated at keep 0.5-1.0", "points": pts})
    plot(series, os.path.join(results, "accuracy_vs_gmacs.png"),
         title="animal-mnist val (2,000 images), 6-block ViT width 64")
    base = {r[0]: r for r in rows}
    lines = ["| model | top-1 % (mean ± sample std over seeds) | per seed | GMACs / image | Δ top-1 vs P14 | MACs saved vs P14 "
             "| eval images/s (CPU, fp32, bs 256) | train time / run (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, top, gm, seeds, ips, ts in rows:
        ref = base.get("p14")
        delta = f"{top.mean() - ref[1].mean():+.2f}" if ref is not None and name != "p14" else "–"
        saved = f"{100 * (1 - gm / ref[2]):.1f} %" if ref is not None and name != "p14" else "–"
        per = ", ".join(f"s{s}: {t:.2f}" for s, t in zip(seeds, top))
        tt = ", ".join(f"{t:.0f}" for t in ts if t is not None) or "–"
        spread = f" ± {top.std(ddof=1):.2f}" if len(top) > 1 else ""
        lines.append(f"| {NAMES[name]} | {top.mean():.2f}{spread} | {per} | {gm:.4f} | {delta} | {saved} "
                     f"| {ips:.0f} | {tt} |")
    meta = {"commit": commit(), "torch": torch.__version__, "adaptok": adaptok.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seeds": sorted(per_seed),
            "config": cfg}
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n\n")
        f.write(f"commit {meta['commit']}, torch {meta['torch']}, {meta['machine']}, seeds {meta['seeds']}.\n")
    with open(os.path.join(results, "results.json"), "w") as f:
        json.dump({"meta": meta, "per_seed": per_seed, "train_seconds": {f"{k[0]}-s{k[1]}": v for k, v in
                                                                         train_s.items()}}, f, indent=1)
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "config.json"))
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--runs", default="runs/deit_evit")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--checkpoints", default=os.path.join(HERE, "checkpoints"),
                   help="where the final P14 and P7 weights go")
    p.add_argument("--report", action="store_true", help="only evaluate finished runs and write results")
    p.add_argument("--only", nargs="+", help="train only these runs")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    seeds = args.seeds if args.seeds is not None else cfg["seeds"]
    os.makedirs(args.results, exist_ok=True)
    if not args.report:
        for seed in seeds:
            for name in cfg["runs"]:
                if args.only and name not in args.only:
                    continue
                timed_train(run_config(cfg, name, seed, args.runs))
    per_seed, train_s = {}, {}
    for seed in sorted(set(cfg["seeds"]) | set(seeds)):
        r = evaluate_seed(cfg, seed, args.runs, args.results)
        if r:
            per_seed[seed] = r
        for name in cfg["runs"]:
            path = os.path.join(args.runs, f"{name}-s{seed}", "train_seconds")
            if os.path.exists(path):
                with open(path) as f:
                    train_s[(name, seed)] = sum(float(x) for x in f.read().split())
    if per_seed:
        report(cfg, per_seed, args.results, train_s)
        export_weights(cfg, args.runs, args.checkpoints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
