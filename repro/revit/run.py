"""Reproduce ReViT at small scale on animal-mnist: one ViT for 14x14, 10x10
and 7x7 tokens (and its ablations), its token-length labels, the
Token-Length Assigner and its threshold curve, against P14, P7 and EViT
from ``repro/deit_evit``.

    python repro/revit/run.py              # trains what is missing (resumes), then evaluates and reports
    python repro/revit/run.py --report     # only evaluates finished runs and rewrites results/

Checkpoints and logs go to ``--runs`` (default ``runs/revit``, outside git);
results to ``repro/revit/results`` and the final ReViT and assigner weights
to ``repro/revit/checkpoints``. Nothing is chosen on the validation split:
the recipe is repro/deit_evit's, and the one assigner threshold reported as
the operating point is picked on the training split.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "deit_evit"))

import adaptok  # noqa: E402
from adaptok import data as lab_data  # noqa: E402
from adaptok.evaluate import evaluate, plot  # noqa: E402
from adaptok.models import revit  # noqa: E402
from adaptok.train import create_model  # noqa: E402
from run import commit, finished, load_config, run_fields, timed_train, train_seconds  # noqa: E402  (repro/deit_evit/run.py)

NAMES = {"revit": "ReViT (TAL-LN, self-distillation)", "revit_no_sd": "ReViT without self-distillation",
         "revit_shared_ln": "ReViT with one shared LayerNorm", "revit_own_pe": "ReViT with a patch embedding per length"}


def assigner_fields(cfg: dict, seed: int, runs: str, labels: str) -> dict:
    return {**cfg["assigner"], "data": "animal-mnist", "targets": labels, "seed": seed,
            "out": os.path.join(runs, f"assigner-s{seed}")}


def loader(split: str):
    """The split in its fixed order with evaluation transforms (labels and
    sweeps need every image once, unaugmented)."""
    return lab_data.create_loader("animal-mnist", split, 256, 28, 1, training=False)


def per_length(path: str, results: str, name: str) -> dict:
    model = create_model(checkpoint=path)
    out = {}
    for g in model.revit_grids:
        p = evaluate(model, loader("val"), grid=g, amp=False,
                     npz=os.path.join(results, "logits", f"{name}-g{g}.npz"))
        out[str(g)] = p
        print(f"{name} at {g}x{g}: top-1 {p['top1']:.2f}, {p['gmacs']:.4f} GMACs", flush=True)
    return out


def sweep(model, split: str, thresholds) -> list:
    points = []
    for t in thresholds:
        model.assigner.threshold = t
        p = evaluate(model, loader(split), grid="auto", amp=False)
        p["threshold"] = t
        points.append(p)
        print(f"assigner threshold {t:g} on {split}: top-1 {p['top1']:.2f}, {p['gmacs']:.4f} GMACs", flush=True)
    return points


@torch.no_grad()
def oracle(model, split: str, labels: torch.Tensor) -> dict:
    """Every image at its own token-length label (an upper bound: it knows
    the answer)."""
    from adaptok.evaluate import images_macs

    correct, spent, seen = 0, 0, 0
    model.eval()
    for images, targets in loader(split):
        sides = labels[seen:seen + len(images)]
        correct += int((model(images, grid=sides).argmax(-1) == targets).sum())
        spent += int(images_macs(model, sides.tolist(), len(images)).sum())
        seen += len(images)
    return {"top1": 100.0 * correct / seen, "gmacs": spent / seen / 1e9, "images": seen}


def distribution(labels: torch.Tensor, grids) -> dict:
    return {str(g): round(100.0 * float((labels == g).double().mean()), 2) for g in grids}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "config.json"))
    p.add_argument("--runs", default="runs/revit")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--checkpoints", default=os.path.join(HERE, "checkpoints"))
    p.add_argument("--report", action="store_true", help="only evaluate finished runs and write results")
    p.add_argument("--only", nargs="+", help="train only these runs (and the assigner when 'revit' is done)")
    args = p.parse_args(argv)
    cfg, base = load_config(args.config)
    os.makedirs(os.path.join(args.results, "logits"), exist_ok=True)
    os.makedirs(args.checkpoints, exist_ok=True)
    seed = cfg["seeds"][0]
    if not args.report:
        for name in cfg["runs"]:
            if not args.only or name in args.only:
                timed_train(run_fields(cfg, base, name, seed, args.runs))

    out = {"per_length": {}, "train_seconds": {}}
    for name in cfg["runs"]:
        fields = run_fields(cfg, base, name, seed, args.runs)
        if finished(fields):
            out["per_length"][name] = per_length(os.path.join(fields["out"], "last.pth"), args.results, name)
            out["train_seconds"][name] = train_seconds(fields["out"])
    main_run = run_fields(cfg, base, "revit", seed, args.runs)
    if finished(main_run):
        ck = os.path.join(main_run["out"], "last.pth")
        model = create_model(checkpoint=ck).eval()
        grids = model.revit_grids
        labels_path = os.path.join(args.runs, f"labels-s{seed}.pt")
        if not os.path.exists(labels_path):
            train_labels = revit.token_length_labels(model, loader("train"))
            val_labels = revit.token_length_labels(model, loader("val"))
            revit.save_labels(labels_path, grids, train_labels, val_labels)
        saved = torch.load(labels_path, weights_only=True)
        ascending = saved["classes"]
        sides = {s: torch.tensor(ascending)[saved[s]] for s in ("train", "val")}
        out["labels"] = {s: distribution(sides[s], ascending) for s in sides}
        out["oracle"] = {s: oracle(model, s, sides[s]) for s in ("train", "val")}
        a_fields = assigner_fields(cfg, seed, args.runs, labels_path)
        if not args.report:
            timed_train(a_fields)
        if finished(a_fields):
            out["train_seconds"]["assigner"] = train_seconds(a_fields["out"])
            assigner = revit.TokenLengthAssigner.from_checkpoint(os.path.join(a_fields["out"], "last.pth"))
            model.set_assigner(assigner)
            with open(os.path.join(a_fields["out"], "log.jsonl")) as f:
                last = [json.loads(line) for line in f][-1]
            out["assigner"] = {"model": cfg["assigner"]["model"], "macs": assigner.macs(),
                               "params": sum(q.numel() for q in assigner.parameters()),
                               "val_top1_on_labels": last.get("val_top1")}
            out["sweep"] = {s: sweep(model, s, cfg["thresholds"]) for s in ("train", "val")}
            # The operating point, chosen on the training split: the cheapest threshold
            # whose training top-1 is within 1 point of the sweep's best.
            best = max(q["top1"] for q in out["sweep"]["train"])
            pick = min((q for q in out["sweep"]["train"] if q["top1"] >= best - 1.0), key=lambda q: q["gmacs"])
            out["operating_point"] = {"threshold": pick["threshold"], "train": pick,
                                      "val": next(q for q in out["sweep"]["val"]
                                                  if q["threshold"] == pick["threshold"])}
            torch.save({k: v for k, v in torch.load(os.path.join(a_fields["out"], "last.pth"),
                                                    weights_only=True).items()
                        if k in ("config", "method", "num_classes", "classes", "epoch", "records", "state_dict")},
                       os.path.join(args.checkpoints, f"assigner-s{seed}.pth"))
        keep = torch.load(ck, weights_only=True)
        torch.save({k: keep[k] for k in ("config", "method", "num_classes", "epoch", "records", "state_dict")},
                   os.path.join(args.checkpoints, f"revit-s{seed}.pth"))
    report(cfg, base, out, args.results, seed)
    return 0


def report(cfg: dict, base: dict, out: dict, results: str, seed: int) -> None:
    with open(os.path.join(HERE, "..", "deit_evit", "results", "results.json")) as f:
        deit = json.load(f)["per_seed"][str(seed)]
    series = [{"name": "DeiT 14x14 (P14), trained alone", "points": [deit["p14"]]},
              {"name": "DeiT 7x7 (P7), trained alone", "points": [deit["p7"]]},
              {"name": "EViT fine-tuned, keep 0.5-1.0", "points": deit["evit_ft_sweep"]}]
    for name, pts in out["per_length"].items():
        series.append({"name": f"{NAMES[name]}, per length", "points": list(pts.values())})
    if "sweep" in out:
        series.append({"name": "ReViT + assigner (thresholds)", "points": out["sweep"]["val"]})
    if "oracle" in out:
        series.append({"name": "ReViT + label oracle (upper bound)", "points": [out["oracle"]["val"]]})
    plot(series, os.path.join(results, "accuracy_vs_gmacs.png"),
         title=f"animal-mnist val (2,000 images), 6-block ViT width 64, seed {seed}")
    lines = ["| model | 14×14 top-1 % | 10×10 top-1 % | 7×7 top-1 % | train time (s) |", "|---|---|---|---|---|"]
    lines.append(f"| P14 / P7 trained alone (repro/deit_evit, seed {seed}) | {deit['p14']['top1']:.2f} | – | "
                 f"{deit['p7']['top1']:.2f} | – |")
    for name, pts in out["per_length"].items():
        cells = " | ".join(f"{pts[g]['top1']:.2f}" if g in pts else "–" for g in ("14", "10", "7"))
        lines.append(f"| {NAMES[name]} | {cells} | {out['train_seconds'].get(name) or 0:.0f} |")
    if "revit" in out["per_length"]:
        g = {k: v["gmacs"] for k, v in out["per_length"]["revit"].items()}
        lines.append(f"| GMACs per image (ReViT) | {g['14']:.4f} | {g['10']:.4f} | {g['7']:.4f} | |")
    text = "\n".join(lines) + "\n"
    if "labels" in out:
        text += "\nToken-length labels (share of images whose shortest correct length is each grid; 14 also " \
                "holds the images no length gets right):\n\n| split | " + " | ".join(
                    f"{g}×{g}" for g in out["labels"]["train"]) + " |\n|---|---|---|---|\n"
        for s, d in out["labels"].items():
            text += f"| {s} | " + " | ".join(f"{v:.1f} %" for v in d.values()) + " |\n"
    if "sweep" in out:
        text += ("\nReViT + assigner on val (threshold: the shortest grid the assigner is at least this sure "
                 "suffices):\n\n| threshold | top-1 % | GMACs | images/s (CPU, fp32, bs 256, assigner included) |\n"
                 "|---|---|---|---|\n")
        for q in out["sweep"]["val"]:
            text += f"| {q['threshold']:g} | {q['top1']:.2f} | {q['gmacs']:.4f} | {q['images_per_s']:.0f} |\n"
        op = out["operating_point"]
        text += (f"\nOperating point picked on the training split: threshold {op['threshold']:g} "
                 f"(train top-1 {op['train']['top1']:.2f}); on val: top-1 {op['val']['top1']:.2f} at "
                 f"{op['val']['gmacs']:.4f} GMACs.\n")
        text += (f"\nLabel oracle on val: top-1 {out['oracle']['val']['top1']:.2f} at "
                 f"{out['oracle']['val']['gmacs']:.4f} GMACs. Assigner: {out['assigner']['model']}, "
                 f"{out['assigner']['macs'] / 1e6:.2f} MMACs, {out['assigner']['params']:,} parameters.\n")
    meta = {"commit": commit(), "torch": torch.__version__, "adaptok": adaptok.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seed": seed, "config": cfg,
            "recipe": base["base"]}
    text += f"\ncommit {meta['commit']}, torch {meta['torch']}, {meta['machine']}, seed {seed}.\n"
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(results, "results.json"), "w") as f:
        json.dump({"meta": meta, **out}, f, indent=1)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
