"""The lab's shared plot: every small-scale reproduction's accuracy against
the GMACs it spent per image, on animal-mnist val, seed 0, from the
results each ``repro/*/run.py`` wrote (nothing is re-evaluated).

    python repro/plot.py        # writes repro/accuracy_vs_gmacs.png
"""
from __future__ import annotations

import json
import os
import sys

from adaptok.evaluate import plot

HERE = os.path.dirname(os.path.abspath(__file__))


def read(study: str):
    path = os.path.join(HERE, study, "results", "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def series(seed: str = "0") -> list:
    out = []
    deit = read("deit_evit")
    if deit:
        d = deit["per_seed"][seed]
        out += [{"name": "DeiT 14x14 (P14)", "points": [d["p14"]]}, {"name": "DeiT 7x7 (P7)", "points": [d["p7"]]},
                {"name": "EViT fine-tuned, keep 0.5-1.0", "points": d["evit_ft_sweep"]}]
    revit = read("revit")
    if revit:
        out.append({"name": "ReViT, per length", "points": list(revit["per_length"]["revit"].values())})
        if "sweep" in revit:
            out.append({"name": "ReViT + assigner (thresholds)", "points": revit["sweep"]["val"]})
    routing = read("routing")
    if routing:
        keep = ("P10", "oracle", "router", "cascade", "Euclidean")
        out += [s for s in routing["series"] if any(k in s["name"] for k in keep)]
    cf = read("cfvit")
    if cf and seed in cf["per_seed"]:
        r = cf["per_seed"][seed]["runs"]["cfvit"]
        out.append({"name": "CF-ViT, eta 0-1", "points": [{k: p[k] for k in ("gmacs", "top1")} for p in r["curve"]]})
        live = r.get("operating", {}).get("half", {}).get("val")
        if live:
            out.append({"name": "CF-ViT, live at the eta where half of train exits", "points": [live]})
    return out


def main() -> int:
    path = os.path.join(HERE, "accuracy_vs_gmacs.png")
    plot(series(), path, title="animal-mnist val, seed 0 (the oracle and the sweep read the labels)")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
