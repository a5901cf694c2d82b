"""Reproduce the seed paper's routing study at small scale on animal-mnist:
P7 and P14 from ``repro/deit_evit``, the paper's three confidence metrics,
the threshold sweep and the oracle (both read the labels: upper bounds), a
trained router that sends each image to one model, and a DVT-style
early-exit cascade over 7x7, 10x10 and 14x14 models.

    python repro/routing/run.py              # trains what is missing (resumes), then evaluates and reports
    python repro/routing/run.py --report     # only evaluates finished runs and rewrites results/

Checkpoints and logs go to ``--runs`` (default ``runs/routing``, outside
git); results to ``repro/routing/results``, and the P10 and router weights
to ``repro/routing/checkpoints``.

What is chosen where:

- the router is trained on the training split's labels (P7 right -> 7,
  else 14); its operating point (a threshold) is picked on the training
  split;
- the cascade's exit thresholds are picked for each GMACs budget on
  held-out images, as DVT does. The lab's models were trained on the whole
  training split, so the held-out images are half of val: the thresholds
  picked on the even-numbered val images are reported on the odd-numbered
  ones and the other way round (two-fold cross-fitting), so that every
  reported point is on images its thresholds never saw, and the curve
  covers the whole val split like every other curve here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "deit_evit"))

import adaptok  # noqa: E402
from adaptok import data as lab_data  # noqa: E402
from adaptok import routing  # noqa: E402
from adaptok.evaluate import evaluate, plot  # noqa: E402
from adaptok.models.routed import Cascade, RoutedModel  # noqa: E402
from adaptok.train import create_model  # noqa: E402
from run import commit, finished, load_config, run_fields, timed_train, train_seconds  # noqa: E402  (repro/deit_evit/run.py)

DEIT = os.path.join(HERE, "..", "deit_evit")
def router_fields(cfg: dict, seed: int, runs: str, labels: str) -> dict:
    return {**cfg["router"], "data": "animal-mnist", "targets": labels, "seed": seed,
            "out": os.path.join(runs, f"router-s{seed}")}


def loader(split: str):
    """The split in its fixed order with evaluation transforms."""
    return lab_data.create_loader("animal-mnist", split, 256, 28, 1, training=False)


def tensors(split: str) -> tuple:
    xs, ys = zip(*loader(split))
    return torch.cat(xs), torch.cat(ys)


def batches(images: torch.Tensor, labels: torch.Tensor, size: int = 256) -> list:
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(images), size)]


def model_paths(cfg: dict, seed: int, runs: str, base: dict) -> dict:
    """``{grid: checkpoint}``: P7 and P14 from repro/deit_evit, P10 trained here."""
    paths = {int(g): os.path.join(DEIT, "checkpoints", f"{name}-s{seed}.pth") for g, name in cfg["models"].items()}
    p10 = run_fields(cfg, base, "p10", seed, runs)
    if finished(p10):
        paths[10] = os.path.join(p10["out"], "last.pth")
    return paths


def prepare(cfg: dict, base: dict, seed: int, runs: str, report_only: bool) -> tuple:
    """Train P10, write the router's labels, train the router; returns
    ``(model paths, labels path, router fields)``."""
    if not report_only:
        timed_train(run_fields(cfg, base, "p10", seed, runs))
    paths = model_paths(cfg, seed, runs, base)
    labels_path = os.path.join(runs, f"labels-s{seed}.pt")
    if not os.path.exists(labels_path):
        pair = {g: create_model(checkpoint=paths[g]).eval() for g in (7, 14)}
        routing.save_labels(labels_path, (7, 14), routing.route_labels(pair, loader("train")),
                            routing.route_labels(pair, loader("val")))
    fields = router_fields(cfg, seed, runs, labels_path)
    if not report_only:
        timed_train(fields)
    return paths, labels_path, fields


NAMES = {7: "P7 (DeiT 7x7)", 10: "P10 (DeiT 10x10)", 14: "P14 (DeiT 14x14)"}
METRIC_NAMES = {"euclidean": "Euclidean distance", "manhattan": "Manhattan distance", "cosine": "cosine similarity"}


def per_model(paths: dict, val: tuple, results: str) -> tuple:
    """Each model alone on val, live: ``({grid: point}, {grid: logits}, {grid: model})``."""
    import numpy as np

    points, logits, models = {}, {}, {}
    for g, path in sorted(paths.items()):
        models[g] = create_model(checkpoint=path).eval()
        npz = os.path.join(results, "logits", f"p{g}-val.npz")
        points[g] = evaluate(models[g], batches(*val), grid=g, amp=False, npz=npz)
        logits[g] = torch.from_numpy(np.load(npz)["logits"])
        print(f"{NAMES[g]}: top-1 {points[g]['top1']:.2f}, {points[g]['gmacs']:.4f} GMACs", flush=True)
    return points, logits, models


def cross_fitted_cascade(conf, correct, stage_macs, budget: float) -> dict:
    """Thresholds picked on one half of the images, applied to the other,
    both ways; the outcome on every image."""
    n = conf.shape[0]
    folds = (torch.arange(0, n, 2), torch.arange(1, n, 2))
    right = torch.zeros(n, dtype=torch.bool)
    spent = torch.zeros(n, dtype=torch.float64)
    exits = torch.zeros(n, dtype=torch.int64)
    picked = []
    for a, b in ((0, 1), (1, 0)):
        pick = routing.cascade_thresholds(conf[folds[a]], correct[folds[a]], stage_macs[folds[a]], budget)
        r, m, e = routing.cascade_outcome(conf[folds[b]], correct[folds[b]], stage_macs[folds[b]],
                                          torch.tensor(pick["thresholds"], dtype=torch.float64))
        right[folds[b]], spent[folds[b]], exits[folds[b]] = r[0], m[0], e[0]
        picked.append(pick["thresholds"])
    return {"budget": budget, "top1": 100.0 * float(right.double().mean()), "gmacs": float(spent.mean()) / 1e9,
            "thresholds_even_to_odd": picked[0], "thresholds_odd_to_even": picked[1],
            "reach": routing.stage_fractions(exits, conf.shape[1]), "folds": folds, "label": f"{budget:g}"}


def live_cascade(models: dict, grids: tuple, val: tuple, point: dict) -> dict:
    """The cascade run for real (early exit) on each half with the
    thresholds picked on the other; top-1, GMACs as executed, images/s."""
    images, labels = val
    right = spent = seconds = 0.0
    for fold, key in ((point["folds"][1], "thresholds_even_to_odd"), (point["folds"][0], "thresholds_odd_to_even")):
        cascade = Cascade({g: models[g] for g in grids}, point[key])
        q = evaluate(cascade, batches(images[fold], labels[fold]), amp=False)
        right += q["top1"] * q["images"] / 100.0
        spent += q["gmacs"] * q["images"]
        seconds += q["images"] / q["images_per_s"]
    n = len(labels)
    return {"top1": 100.0 * right / n, "gmacs": spent / n, "images_per_s": n / seconds}


def analyse(cfg: dict, base: dict, seed: int, args, paths: dict, labels_path: str, rfields: dict) -> dict:
    val = tensors("val")
    labels = val[1]
    points, logits, models = per_model(paths, val, args.results)
    stage_cost = {g: float(points[g]["gmacs"]) * 1e9 for g in points}
    out = {"models": {str(g): points[g] for g in points}, "train_seconds": {}}
    if 10 in paths:
        out["train_seconds"]["p10"] = train_seconds(os.path.dirname(paths[10]))

    # --- the paper's metrics (Fig. 3) and the sweep on P7's metric (Fig. 1): they read the labels
    conf = {g: routing.confidence(logits[g], labels) for g in (7, 14)}
    correct = {g: logits[g].argmax(-1) == labels for g in logits}
    pair_correct = torch.stack([correct[7], correct[14]], 1)
    pair_macs = torch.tensor([stage_cost[7], stage_cost[14]], dtype=torch.float64)
    out["sweeps"] = {}
    for metric, side in routing.METRICS.items():
        score = conf[7][metric]
        out["sweeps"][metric] = routing.sweep(score, pair_correct, pair_macs,
                                              routing.thresholds_across(score, cfg["metric_step"]), side)
    out["metric_stats"] = {f"p{g}": {metric: {kind: {"mean": float(v[mask].mean()), "count": int(mask.sum())}
                                              for kind, mask in (("correct", correct[g]), ("wrong", ~correct[g]))}
                                     for metric, v in conf[g].items()} for g in (7, 14)}
    orc = routing.oracle([logits[7], logits[14]], labels, pair_macs)
    out["oracle"] = {k: v for k, v in orc.items() if k != "choice"}
    if 10 in logits:
        orc3 = routing.oracle([logits[7], logits[10], logits[14]], labels,
                              torch.tensor([stage_cost[g] for g in (7, 10, 14)], dtype=torch.float64))
        out["oracle_3"] = {k: v for k, v in orc3.items() if k != "choice"}
    # the partition that sends a random share to P7: what a rule that knows nothing reaches
    out["random_line"] = [{"cheap_share": 100.0 * f, "top1": f * points[7]["top1"] + (1 - f) * points[14]["top1"],
                           "gmacs": f * points[7]["gmacs"] + (1 - f) * points[14]["gmacs"]}
                          for f in (0.0, 0.25, 0.5, 0.75, 1.0)]

    # --- the router, live: router, partition, each model on its own images, logits in input order
    if finished(rfields):
        router = routing.Router.from_checkpoint(os.path.join(rfields["out"], "last.pth"))
        routed = RoutedModel({7: models[7], 14: models[14]}, router)
        saved = torch.load(labels_path, weights_only=True)
        with open(os.path.join(rfields["out"], "log.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        prior = float(saved["val"].double().mean())
        out["router"] = {"model": cfg["router"]["model"], "model_kwargs": cfg["router"]["model_kwargs"],
                         "macs": router.macs(), "p7_macs": int(stage_cost[7]),
                         "params": sum(q.numel() for q in router.parameters()),
                         "val_top1_on_labels": last.get("val_top1"), "val_loss": last.get("val_loss"),
                         "label_entropy_val": float(-(prior * torch.log(torch.tensor(prior))
                                                      + (1 - prior) * torch.log(torch.tensor(1 - prior)))),
                         "labels_p7_share": {s: 100.0 * float((saved[s] == 0).double().mean())
                                             for s in ("train", "val")}}
        out["train_seconds"]["router"] = train_seconds(rfields["out"])
        train = tensors("train")
        out["router_sweep"] = {}
        for split, data in (("train", train), ("val", val)):
            pts = []
            for t in cfg["router_thresholds"]:
                router.threshold = t
                q = evaluate(routed, batches(*data), amp=False)
                q.update(threshold=t, label=f"{t:g}")
                pts.append(q)
                print(f"router threshold {t:g} on {split}: top-1 {q['top1']:.2f}, {q['gmacs']:.4f} GMACs", flush=True)
            out["router_sweep"][split] = pts
        best = max(q["top1"] for q in out["router_sweep"]["train"])
        pick = min((q for q in out["router_sweep"]["train"] if q["top1"] >= best - 1.0), key=lambda q: q["gmacs"])
        out["operating_point"] = {"threshold": pick["threshold"], "train": pick,
                                  "val": next(q for q in out["router_sweep"]["val"]
                                              if q["threshold"] == pick["threshold"])}
        keep = torch.load(os.path.join(rfields["out"], "last.pth"), weights_only=True)
        torch.save({k: keep[k] for k in ("config", "method", "num_classes", "classes", "epoch", "records",
                                          "state_dict")}, os.path.join(args.checkpoints, f"router-s{seed}.pth"))

    # --- the cascade: thresholds per budget picked on held-out halves, then run for real
    if 10 in logits:
        grids = (7, 10, 14)
        probs = torch.stack([logits[g].double().softmax(-1).amax(-1) for g in grids], 1)
        corr = torch.stack([correct[g] for g in grids], 1)
        smacs = torch.tensor([stage_cost[g] for g in grids], dtype=torch.float64).expand(len(labels), 3)
        out["cascade"] = []
        for budget in cfg["cascade_budgets"]:
            q = cross_fitted_cascade(probs, corr, smacs, budget)
            q["live"] = live_cascade(models, grids, val, q)
            q.pop("folds")
            out["cascade"].append(q)
            print(f"cascade budget {budget:g}: top-1 {q['top1']:.2f} ({q['live']['top1']:.2f} live), "
                  f"{q['gmacs']:.4f} GMACs, reach {[round(r, 1) for r in q['reach']]}", flush=True)
        # a curve across the cost range: one threshold on both exits (no choice made; from saved logits,
        # which the live runs above match)
        etas = [i / 20 for i in range(21)]
        right, spent, exits = routing.cascade_outcome(probs, corr, smacs, torch.tensor(etas, dtype=torch.float64)
                                                      .unsqueeze(1).expand(-1, 2))
        out["cascade_sweep"] = [{"threshold": e, "top1": 100.0 * float(right[i].double().mean()),
                                 "gmacs": float(spent[i].mean()) / 1e9, "reach": routing.stage_fractions(exits[i], 3),
                                 "label": f"{e:g}" if i % 4 == 0 else ""} for i, e in enumerate(etas)]
        keep = torch.load(paths[10], weights_only=True)
        torch.save({k: keep[k] for k in ("config", "method", "num_classes", "epoch", "records", "state_dict")},
                   os.path.join(args.checkpoints, f"p10-s{seed}.pth"))
    figures(conf, correct, out, args.results, seed)
    return out


def figures(conf: dict, correct: dict, out: dict, results: str, seed: int) -> None:
    """The paper's Fig. 3 (metric distributions) and Fig. 2 (stages reached)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for row, g in enumerate((7, 14)):
        for col, metric in enumerate(routing.METRICS):
            ax = axes[row, col]
            v = conf[g][metric]
            bins = torch.linspace(float(v.min()), float(v.max()), 31).tolist()
            ax.hist(v[correct[g]].numpy(), bins=bins, alpha=0.6, label=f"correct ({int(correct[g].sum())})")
            ax.hist(v[~correct[g]].numpy(), bins=bins, alpha=0.6, label=f"wrong ({int((~correct[g]).sum())})")
            ax.set_title(f"{NAMES[g]}: {METRIC_NAMES[metric]}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(f"softmax vs one-hot label on animal-mnist val (reads the labels), seed {seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "metric_distributions.png"), dpi=130)
    plt.close(fig)
    if "cascade" in out:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        width = 0.8 / 3
        xs = range(len(out["cascade"]))
        for s, g in enumerate((7, 10, 14)):
            ax.bar([x + (s - 1) * width for x in xs], [q["reach"][s] for q in out["cascade"]], width,
                   label=f"stage {s + 1} ({g}x{g})")
        ax.set_xticks(list(xs), [f"{q['gmacs']:.3f}" for q in out["cascade"]], fontsize=8)
        ax.set_xlabel("GMACs per image spent (budgets of config.json)")
        ax.set_ylabel("images reaching the stage (%)")
        ax.set_title("Early-exit cascade: share of images reaching each stage", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(results, "cascade_stages.png"), dpi=130)
        plt.close(fig)


def series(out: dict) -> list:
    """This study's curves and points for accuracy-vs-GMACs plots."""
    s = [{"name": NAMES[int(g)] + ", alone", "points": [p]} for g, p in out["models"].items()]
    s.append({"name": "P7/P14 oracle (reads the labels)", "points": [out["oracle"]]})
    for metric, pts in out["sweeps"].items():
        s.append({"name": f"P7/P14 sweep on P7's {METRIC_NAMES[metric]} (reads the labels)", "points": pts,
                  "marker": ""})
    if "router_sweep" in out:
        s.append({"name": "routed P7/P14 + router (thresholds)", "points": out["router_sweep"]["val"]})
    if "cascade" in out:
        s.append({"name": "cascade 7/10/14, early exit (budgets)",
                  "points": [q["live"] for q in out["cascade"]]})
        s.append({"name": "cascade 7/10/14, one threshold on both exits", "points": out["cascade_sweep"]})
    return s


def at_gmacs(points: list, gmacs: float) -> float:
    """Top-1 of a curve at ``gmacs``, linearly interpolated between its two
    nearest points (None outside its range)."""
    pts = sorted(points, key=lambda q: q["gmacs"])
    for a, b in zip(pts, pts[1:]):
        if a["gmacs"] <= gmacs <= b["gmacs"]:
            w = 0.0 if b["gmacs"] == a["gmacs"] else (gmacs - a["gmacs"]) / (b["gmacs"] - a["gmacs"])
            return a["top1"] + w * (b["top1"] - a["top1"])
    return None


def recovery(out: dict) -> dict:
    """At the oracle's GMACs: the top-1 of a random partition (a rule that
    knows nothing), of the router, and of the oracle; the router's share of
    the oracle's gain over the random partition."""
    g = out["oracle"]["gmacs"]
    rand = at_gmacs(out["random_line"], g)
    got = {"gmacs": g, "random": rand, "oracle": out["oracle"]["top1"],
           "best_sweep": max(max(q["top1"] for q in pts) for pts in out["sweeps"].values())}
    if "router_sweep" in out:
        got["router"] = at_gmacs(out["router_sweep"]["val"], g)
        got["router_best"] = max(q["top1"] for q in out["router_sweep"]["val"])
        got["recovered"] = (got["router"] - rand) / (got["oracle"] - rand)
    return got


def report(cfg: dict, out: dict, results: str, seed: int, evaluated_at: Optional[str] = None) -> None:
    with open(os.path.join(DEIT, "results", "results.json")) as f:
        deit = json.load(f)["per_seed"][str(seed)]
    extra = [{"name": "EViT fine-tuned, keep 0.5-1.0", "points": deit["evit_ft_sweep"]}]
    plot(series(out) + extra, os.path.join(results, "accuracy_vs_gmacs.png"),
         title=f"animal-mnist val (2,000 images), 6-block ViT width 64, seed {seed}")
    m = out["models"]
    lines = ["| model or rule | top-1 % | GMACs / image | images/s (CPU, fp32, bs 256) |", "|---|---|---|---|"]
    for g, p in m.items():
        lines.append(f"| {NAMES[int(g)]} alone | {p['top1']:.2f} | {p['gmacs']:.4f} | {p['images_per_s']:.0f} |")
    o = out["oracle"]
    lines.append(f"| P7/P14 oracle (reads the labels; {o['shares'][0]:.1f} % to P7) | {o['top1']:.2f} | "
                 f"{o['gmacs']:.4f} | – |")
    if "oracle_3" in out:
        o = out["oracle_3"]
        lines.append(f"| P7/P10/P14 oracle (reads the labels) | {o['top1']:.2f} | {o['gmacs']:.4f} | – |")
    for metric, pts in out["sweeps"].items():
        b = max(pts, key=lambda q: (q["top1"], -q["gmacs"]))
        lines.append(f"| best of the sweep on P7's {METRIC_NAMES[metric]} (reads the labels; t = "
                     f"{b['threshold']:.2f}, {b['cheap_share']:.1f} % to P7) | {b['top1']:.2f} | {b['gmacs']:.4f} | – |")
    if "operating_point" in out:
        op = out["operating_point"]
        v = op["val"]
        lines.append(f"| routed P7/P14 + router, threshold {op['threshold']:g} picked on train | {v['top1']:.2f} | "
                     f"{v['gmacs']:.4f} | {v['images_per_s']:.0f} |")
    for q in out.get("cascade", []):
        lv = q["live"]
        lines.append(f"| cascade 7/10/14, budget {q['budget']:g} (thresholds from the other half of val) | "
                     f"{lv['top1']:.2f} | {lv['gmacs']:.4f} | {lv['images_per_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    text += ("\nThe images/s column is each evaluation's own timing, one after another on a shared CPU: for "
             "orientation only. The interleaved, comparable speeds are in bench/results/routing-bench-cpu.md.\n")
    out["recovery"] = rec = recovery(out)
    text += (f"\nAt the oracle's {rec['gmacs']:.4f} GMACs: a random partition gives {rec['random']:.2f} %, the "
             + (f"router {rec['router']:.2f} %, " if "router" in rec else "")
             + f"the oracle {rec['oracle']:.2f} %"
             + (f"; the router recovers {100 * rec['recovered']:.0f} % of the oracle's gain over the random "
                f"partition" if "router" in rec else "") + ".\n")
    if "router_sweep" in out:
        r = out["router"]
        text += (f"\nRouter: {r['model']} {r['model_kwargs']}, {r['macs'] / 1e6:.2f} MMACs "
                 f"({100.0 * r['macs'] / r['p7_macs']:.1f} % of P7's), {r['params']:,} parameters. Labels: P7 right on "
                 f"{r['labels_p7_share']['train']:.1f} % of train and {r['labels_p7_share']['val']:.1f} % of val "
                 f"images. Its val loss on the labels: {r['val_loss']:.3f} (the label prior's entropy: "
                 f"{r['label_entropy_val']:.3f}).\n\n| router threshold | top-1 % (val) | GMACs | images/s | "
                 f"top-1 % (train) |\n|---|---|---|---|---|\n")
        for q, t in zip(out["router_sweep"]["val"], out["router_sweep"]["train"]):
            text += (f"| {q['threshold']:g} | {q['top1']:.2f} | {q['gmacs']:.4f} | {q['images_per_s']:.0f} | "
                     f"{t['top1']:.2f} |\n")
    if "cascade" in out:
        text += ("\nCascade, share of images reaching each stage (the paper's Fig. 2), and agreement of the "
                 "offline outcome with the live run:\n\n| budget | stage 1 (7x7) % | stage 2 (10x10) % | "
                 "stage 3 (14x14) % | top-1 offline | top-1 live |\n|---|---|---|---|---|---|\n")
        for q in out["cascade"]:
            text += (f"| {q['budget']:g} | " + " | ".join(f"{r:.1f}" for r in q["reach"]) +
                     f" | {q['top1']:.2f} | {q['live']['top1']:.2f} |\n")
    meta = {"commit": evaluated_at or commit(), "torch": torch.__version__, "adaptok": adaptok.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seed": seed, "config": cfg}
    if "cascade_sweep" in out:
        text += ("\nCascade with one threshold on both exits (every value, no choice; from the saved logits):\n\n"
                 "| threshold | top-1 % | GMACs | reach stage 2 % | reach stage 3 % |\n|---|---|---|---|---|\n")
        for q in out["cascade_sweep"][::2]:
            text += (f"| {q['threshold']:g} | {q['top1']:.2f} | {q['gmacs']:.4f} | {q['reach'][1]:.1f} | "
                     f"{q['reach'][2]:.1f} |\n")
    text += f"\ncommit {meta['commit']}, torch {meta['torch']}, {meta['machine']}, seed {seed}.\n"
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(results, "results.json"), "w") as f:
        json.dump({"meta": meta, **out, "series": series(out)}, f, indent=1)
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "config.json"))
    p.add_argument("--runs", default="runs/routing")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--checkpoints", default=os.path.join(HERE, "checkpoints"))
    p.add_argument("--report", action="store_true", help="only evaluate finished runs and write results")
    p.add_argument("--prepare", action="store_true", help="only train (P10, labels, router)")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and tables from results.json")
    args = p.parse_args(argv)
    cfg, base = load_config(args.config)
    seed = cfg["seeds"][0]
    if args.replot:
        with open(os.path.join(args.results, "results.json")) as f:
            saved = json.load(f)
        report(cfg, {k: v for k, v in saved.items() if k not in ("meta", "series")}, args.results, seed,
               saved["meta"]["commit"])
        return 0
    os.makedirs(os.path.join(args.results, "logits"), exist_ok=True)
    os.makedirs(args.checkpoints, exist_ok=True)
    paths, labels_path, rfields = prepare(cfg, base, seed, args.runs, args.report)
    if args.prepare:
        return 0
    out = analyse(cfg, base, seed, args, paths, labels_path, rfields)
    report(cfg, out, args.results, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
