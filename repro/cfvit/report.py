"""Evaluate repro/cfvit's finished runs and write ``results/`` (called by
``run.py``; ``python repro/cfvit/run.py --report``).

Per seed, for the CF-ViT run (and the feature-reuse ablation where it ran):

- both passes on every image of val and of train (evaluation transforms):
  coarse and fine logits to ``results/logits/`` (npz);
- the eta curve on val from those outputs (:func:`adaptok.models.cfvit.eta_sweep`);
- three operating points picked on **train**: the lowest eta whose train
  top-1 reaches P14's (P14 of repro/deit_evit, same seed, evaluated on the
  same train images), the eta with the best train top-1, and the eta at
  which half the train images exit; each then run live on val (``adaptok.evaluate``: the early exit as it executes, GMACs
  as spent) and checked against the offline curve;
- the selection ablation (the paper's Table 4) on the same weights: the
  fine-pass top-1 on val when the patches to re-split are chosen by the
  global class attention, the last block's class attention, at random, or
  by the lowest global class attention;
- feature reuse on and off (Table 5): the two runs' coarse and fine top-1.

Nothing is picked on val. Plot: ``results/accuracy_vs_gmacs.png``.
"""
from __future__ import annotations

import json
import os
import platform
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "deit_evit"))

import adaptok  # noqa: E402
from adaptok import data as lab_data  # noqa: E402
from adaptok.evaluate import evaluate, plot  # noqa: E402
from adaptok.models.cfvit import confidence, eta_sweep, pick_eta  # noqa: E402
from adaptok.train import create_model  # noqa: E402
from run import commit, export_checkpoint, train_seconds  # noqa: E402  (repro/deit_evit/run.py)

NAMES = {"cfvit": "CF-ViT", "cfvit_no_reuse": "CF-ViT without feature reuse"}
RULES = {"best": "best top-1", "p14": "lowest eta reaching P14's top-1", "half": "half the images exit"}
SELECTIONS = {"global": "global class attention (CF-ViT)", "last": "last block's class attention",
              "random": "random patches", "negative": "lowest global class attention"}


def loader(split: str):
    """The split in its fixed order with evaluation transforms."""
    return lab_data.create_loader("animal-mnist", split, 256, 28, 1, training=False)


@torch.no_grad()
def stages(model, split: str) -> dict:
    """Coarse and fine logits ``[N, K]`` float32 and labels ``[N]`` of every image of ``split``."""
    model.eval()
    c, f, y = [], [], []
    for images, labels in loader(split):
        coarse, fine = model(images, stages=True)
        c.append(coarse.float())
        f.append(fine.float())
        y.append(labels)
    return {"coarse": torch.cat(c), "fine": torch.cat(f), "labels": torch.cat(y)}


def curve(out: dict, etas, macs) -> list:
    """The sweep's points; a point is labelled with its eta where it stands
    apart from the last labelled one (5 % of the GMACs range)."""
    s = eta_sweep(out["coarse"], out["fine"], out["labels"], etas, macs)
    pts = [{"eta": float(e), "top1": float(t), "gmacs": float(g), "exited": float(x)}
           for e, t, g, x in zip(s["eta"], s["top1"], s["gmacs"], s["exited"])]
    span, last = max(float(s["gmacs"].max() - s["gmacs"].min()), 1e-12), None
    for p in pts:
        if last is None or abs(p["gmacs"] - last) >= 0.05 * span:
            p["label"], last = f"{p['eta']:g}", p["gmacs"]
    return pts


def operating_points(train: dict, p14_train_top1: float) -> dict:
    """The etas picked on train: the most accurate, the lowest reaching
    P14's top-1, and the one at which half the images exit."""
    out = {"best": {**pick_eta(train["coarse"], train["fine"], train["labels"])}}
    reach = pick_eta(train["coarse"], train["fine"], train["labels"], p14_train_top1)
    out["p14"] = ({"eta": None, "note": "no eta reaches P14's train top-1"} if reach is None else reach)
    # Half the training images exit: a point inside the curve, where the live run really splits batches.
    conf = confidence(train["coarse"])
    half = float(conf.median())
    out["half"] = {"eta": half, "top1": float(eta_sweep(train["coarse"], train["fine"], train["labels"], [half],
                                                         (0, 0))["top1"][0])}
    for point in out.values():
        point["train_top1"] = point.pop("top1", None)
        point["p14_train_top1"] = p14_train_top1
    return out


def evaluate_seed(cfg: dict, runs: str, results: str, seed: int, finished) -> dict:
    out = {"seed": seed, "runs": {}, "meta_etas": cfg["etas"]}
    p14_path = os.path.join(HERE, "..", "deit_evit", "checkpoints", f"p14-s{seed}.pth")
    p14_train = (evaluate(create_model(checkpoint=p14_path), loader("train"), amp=False, warmup=0)["top1"]
                 if os.path.exists(p14_path) else None)
    for name in cfg["runs"]:
        if not finished(name, seed):
            continue
        path = os.path.join(runs, f"{name}-s{seed}", "last.pth")
        model = create_model(checkpoint=path).eval()
        macs = model.stage_macs()
        val, train = stages(model, "val"), stages(model, "train")
        np.savez_compressed(os.path.join(results, "logits", f"{name}-s{seed}.npz"),
                            **{k: v.numpy() for k, v in val.items()}, stage_macs=np.array(macs))
        r = {"stage_macs": list(macs), "train_seconds": train_seconds(os.path.dirname(path)),
             "coarse_top1": curve(val, [0.0], macs)[0]["top1"], "fine_top1": curve(val, [1.0], macs)[0]["top1"],
             "curve": curve(val, cfg["etas"], macs), "train_curve": curve(train, cfg["etas"], macs)}
        if p14_train is not None:
            r["operating"] = operating_points(train, p14_train)
            for point in r["operating"].values():
                if point.get("eta") is None:
                    continue
                model.configure(eta=point["eta"])
                live = evaluate(model, loader("val"), amp=False)
                c, f = macs
                live["exited"] = 100.0 * (c + f - live["gmacs"] * 1e9) / f  # from the MACs each image spent
                offline = curve(val, [point["eta"]], macs)[0]
                point.update(val=live, val_offline=offline)
                # The live run's fine pass sees only the images left (another batch shape), so a logit can
                # round differently; a near tie may then flip. More than that would be a bug.
                point["live_vs_offline"] = {"top1": live["top1"] - offline["top1"],
                                            "exited": live["exited"] - offline["exited"]}
                if abs(point["live_vs_offline"]["top1"]) > 0.2 or abs(point["live_vs_offline"]["exited"]) > 0.2:
                    raise AssertionError(f"{name}-s{seed}: the live run and the offline curve disagree: {point}")
                print(f"{name}-s{seed} eta {point['eta']:.4f}: live top-1 {live['top1']:.2f} at {live['gmacs']:.4f} "
                      f"GMACs ({live['exited']:.1f} % exited), offline {offline['top1']:.2f} at "
                      f"{offline['gmacs']:.4f}", flush=True)
            model.configure(eta=None)
        if name == "cfvit":
            r["selection"] = {}
            for sel, opts in cfg["selection_ablation"].items():
                m = create_model(checkpoint=path).eval()
                m.configure(**opts, eta=None)  # every image refined
                torch.manual_seed(seed)
                r["selection"][sel] = evaluate(m, loader("val"), amp=False, warmup=0)["top1"]
            export_checkpoint(path, os.path.join(HERE, "checkpoints", f"cfvit-s{seed}.pth"))
        out["runs"][name] = r
        print(f"{name}-s{seed}: coarse {r['coarse_top1']:.2f}, fine {r['fine_top1']:.2f}", flush=True)
    return out


def report(cfg: dict, base: dict, runs: str, finished) -> int:
    results = os.path.join(HERE, "results")
    os.makedirs(os.path.join(results, "logits"), exist_ok=True)
    os.makedirs(os.path.join(HERE, "checkpoints"), exist_ok=True)
    with open(os.path.join(HERE, "..", "deit_evit", "results", "results.json")) as f:
        deit = json.load(f)["per_seed"]
    per_seed = {}
    for seed in cfg["seeds"]:
        out = evaluate_seed(cfg, runs, results, seed, finished)
        if out["runs"]:
            per_seed[str(seed)] = out
    if not per_seed:
        print("no finished run to report", file=sys.stderr)
        return 1
    text = table(per_seed, deit)
    seed0 = per_seed[min(per_seed)]
    s = seed0["seed"]
    series = [{"name": "DeiT 14x14 (P14)", "points": [deit[str(s)]["p14"]]},
              {"name": "DeiT 7x7 (P7)", "points": [deit[str(s)]["p7"]]},
              {"name": "EViT fine-tuned, keep 0.5-1.0", "points": deit[str(s)]["evit_ft_sweep"]}]
    for name, r in seed0["runs"].items():
        series.append({"name": f"{NAMES[name]}, eta {cfg['etas'][0]:g}-{cfg['etas'][-1]:g}", "points": r["curve"]})
        shown = set()
        for key, point in r.get("operating", {}).items():
            if "val" in point and point["eta"] not in shown:  # one marker per distinct eta
                shown.add(point["eta"])
                series.append({"name": f"{NAMES[name]}, live at eta {point['eta']:.3f} ({RULES[key]}, on train)",
                               "points": [point["val"]]})
    plot(series, os.path.join(results, "accuracy_vs_gmacs.png"),
         title=f"animal-mnist val (2,000 images), 6-block ViT width 64, seed {s}")
    meta = {"commit": commit(), "torch": torch.__version__, "adaptok": adaptok.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seeds": sorted(per_seed), "config": cfg,
            "recipe": base["base"]}
    text += f"\ncommit {meta['commit']}, torch {meta['torch']}, {meta['machine']}, seeds {meta['seeds']}.\n"
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(results, "results.json"), "w") as f:
        json.dump({"meta": meta, "per_seed": per_seed}, f, indent=1)
    print(text)
    return 0


def table(per_seed: dict, deit: dict) -> str:
    lines = ["| seed | model | coarse top-1 % (7×7) | fine top-1 % (every image refined) | GMACs coarse / +fine | "
             "P14 top-1 % (GMACs) | P7 top-1 % | train time (s) |", "|---|---|---|---|---|---|---|---|"]
    for s, out in per_seed.items():
        d = deit.get(s, {})
        for name, r in out["runs"].items():
            c, f = r["stage_macs"]
            p14 = f"{d['p14']['top1']:.2f} ({d['p14']['gmacs']:.4f})" if "p14" in d else "–"
            p7 = f"{d['p7']['top1']:.2f}" if "p7" in d else "–"
            lines.append(f"| {s} | {NAMES[name]} | {r['coarse_top1']:.2f} | {r['fine_top1']:.2f} | {c / 1e9:.4f} / "
                         f"{f / 1e9:.4f} | {p14} | {p7} | {r['train_seconds'] or 0:.0f} |")
    text = "\n".join(lines) + "\n"
    text += ("\nOperating points (eta picked on the training split, then run live on val: exits as executed, "
             "GMACs as spent):\n\n| seed | model | rule | eta | train top-1 % | val top-1 % | val GMACs | exited on "
             "val % | P14 val top-1 % (GMACs) |\n|---|---|---|---|---|---|---|---|---|\n")
    for s, out in per_seed.items():
        d = deit.get(s, {})
        for name, r in out["runs"].items():
            for rule, p in r.get("operating", {}).items():
                what = RULES[rule]
                if p.get("eta") is None:
                    text += f"| {s} | {NAMES[name]} | {what} | none | – | – | – | – | – |\n"
                    continue
                text += (f"| {s} | {NAMES[name]} | {what} | {p['eta']:.4f} | {p['train_top1']:.2f} | "
                         f"{p['val']['top1']:.2f} | {p['val']['gmacs']:.4f} | {p['val']['exited']:.1f} | "
                         f"{d['p14']['top1']:.2f} ({d['p14']['gmacs']:.4f}) |\n")
    etas = next(iter(per_seed.values()))["meta_etas"]
    text += "\nThe eta curve on val (from saved outputs):\n\n| seed | eta | " + " | ".join(
        f"{e:g}" for e in etas) + " |\n"
    text += "|---|---|" + "---|" * len(etas) + "\n"
    for s, out in per_seed.items():
        for name, r in out["runs"].items():
            text += f"| {s} | {NAMES[name]} top-1 % | " + " | ".join(f"{p['top1']:.2f}" for p in r["curve"]) + " |\n"
            text += f"| {s} | GMACs | " + " | ".join(f"{p['gmacs']:.4f}" for p in r["curve"]) + " |\n"
            text += f"| {s} | exited % | " + " | ".join(f"{p['exited']:.1f}" for p in r["curve"]) + " |\n"
    text += ("\nWhich coarse patches are re-split (Table 4; the fine pass's top-1 % on val, every image refined, "
             "the same trained weights):\n\n| seed | " + " | ".join(SELECTIONS.values()) + " |\n|---|"
             + "---|" * len(SELECTIONS) + "\n")
    for s, out in per_seed.items():
        sel = out["runs"].get("cfvit", {}).get("selection")
        if sel:
            text += f"| {s} | " + " | ".join(f"{sel[k]:.2f}" for k in SELECTIONS) + " |\n"
    return text
