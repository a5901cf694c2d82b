"""Reproduce CF-ViT at small scale on animal-mnist: train it (and the
feature-reuse ablation) with repro/deit_evit's recipe, then evaluate on the
held-out split against P14 and P7 of repro/deit_evit.

    python repro/cfvit/run.py                     # trains what is missing (resumes), then reports
    python repro/cfvit/run.py --train cfvit --seeds 0   # one run only (no report)
    python repro/cfvit/run.py --report            # only evaluates finished runs and rewrites results/

Checkpoints and logs go to ``--runs`` (default ``runs/cfvit``, outside git);
results to ``repro/cfvit/results``.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "deit_evit"))

from run import finished, load_config, run_fields, timed_train  # noqa: E402  (repro/deit_evit/run.py)


def seeds_of(cfg: dict, name: str) -> list:
    return cfg["runs"][name].get("seeds", cfg["seeds"])


def fields_of(cfg: dict, base: dict, name: str, seed: int, runs: str) -> dict:
    f = run_fields(cfg, base, name, seed, runs)
    f.pop("seeds", None)
    return f


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/cfvit")
    p.add_argument("--train", nargs="*", help="train only these runs (no report)")
    p.add_argument("--seeds", type=int, nargs="*")
    p.add_argument("--report", action="store_true", help="only evaluate finished runs")
    a = p.parse_args(argv)
    cfg, base = load_config(os.path.join(HERE, "config.json"))
    names = a.train if a.train else list(cfg["runs"])
    if not a.report:
        for name in names:
            for seed in seeds_of(cfg, name):
                if a.seeds is None or seed in a.seeds:
                    timed_train(fields_of(cfg, base, name, seed, a.runs))
    if a.train:
        return 0
    from report import report  # noqa: E402  (repro/cfvit/report.py)

    return report(cfg, base, a.runs, finished=lambda n, s: finished(fields_of(cfg, base, n, s, a.runs)))


if __name__ == "__main__":
    sys.exit(main())
