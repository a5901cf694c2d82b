"""Turn pytest-benchmark json from ``bench/`` into markdown tables.

Usage: ``python bench/report.py RESULTS.json [--peak-tflops X --peak-gbps Y]``

For every group (op, mode, shape): each provider's median time and
interquartile range, its rate in TFLOP/s and GB/s (from the ``flops`` and
``bytes`` recorded with each result), the two floors (FLOPs over the peak
tensor-core rate, bytes over the memory bandwidth; taken from
``adaptok.bench.timing.PEAKS`` for known GPUs, or given on the command line),
and its speed relative to the fastest provider that is not adaptok.
"""
import argparse
import json
import sys
from collections import defaultdict

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from adaptok.bench.timing import peaks  # noqa: E402


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data["benchmarks"]


def is_adaptok(extra):
    """Whether a result is adaptok's (its ``family``, else its provider name)."""
    return extra.get("family", "adaptok" if extra["provider"].startswith("adaptok") else "other") == "adaptok"


def table(rows, peak):
    """Markdown lines for one group's rows."""
    rows = sorted(rows, key=lambda r: r["stats"]["median"])
    others = [r for r in rows if not is_adaptok(r["extra_info"]) and not r["extra_info"].get("interpreted")]
    best_other = others[0] if others else None
    head = "| provider | median ms | IQR ms | TFLOP/s | GB/s |"
    rule = "|---|---:|---:|---:|---:|"
    if peak:
        head += " compute floor ms | memory floor ms | median / floor |"
        rule += "---:|---:|---:|"
    if best_other:
        head += f" speed vs {best_other['extra_info']['provider']} |"
        rule += "---:|"
    lines = [head, rule]
    for r in rows:
        s, e = r["stats"], r["extra_info"]
        median = s["median"]
        name = e["provider"] + (" (interpreter)" if e.get("interpreted") else "")
        cells = [name, f"{median * 1e3:.3f}", f"{s['iqr'] * 1e3:.3f}",
                 f"{e['flops'] / median / 1e12:.3g}", f"{e['bytes'] / median / 1e9:.3g}"]
        if peak:
            compute, memory = e["flops"] / (peak[0] * 1e12), e["bytes"] / (peak[1] * 1e9)
            cells += [f"{compute * 1e3:.4f}", f"{memory * 1e3:.4f}", f"{median / max(compute, memory):.1f}x"]
        if best_other:
            cells.append(f"{best_other['stats']['median'] / median:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cls_overhead(groups):
    """Extra cost of return_cls_attn per adaptok backend and group."""
    lines = []
    for group, rows in groups.items():
        by = {r["extra_info"]["provider"]: r["stats"]["median"] for r in rows if not r["extra_info"].get("interpreted")}
        for provider, median in by.items():
            plain = provider.removesuffix(" +cls_attn")
            if provider.endswith("+cls_attn") and plain in by:
                lines.append(f"- {group}, {plain}: return_cls_attn costs {100 * (median / by[plain] - 1):+.1f} %")
    return lines


def floor_ratios(groups):
    """Each adaptok backend's median over a ``floor`` provider's (a plain
    copy of the op's bytes) in the groups that have one."""
    lines = []
    for group, rows in groups.items():
        floors = [r for r in rows if r["extra_info"].get("family") == "floor"]
        if not floors:
            continue
        floor = floors[0]
        for r in rows:
            e = r["extra_info"]
            if is_adaptok(e) and not e.get("interpreted"):
                lines.append(f"- {group}, {e['provider']}: {r['stats']['median'] / floor['stats']['median']:.2f}x "
                             f"{floor['extra_info']['provider']}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--peak-tflops", type=float, help="peak rate for the compute floor (default: known GPUs)")
    parser.add_argument("--peak-gbps", type=float, help="memory bandwidth for the memory floor")
    args = parser.parse_args(argv)
    rows = [r for path in args.results for r in load(path) if "flops" in r.get("extra_info", {})]
    if not rows:
        sys.exit("no results with flops/bytes in extra_info")
    env = rows[0]["extra_info"]
    peak = (args.peak_tflops, args.peak_gbps) if args.peak_tflops and args.peak_gbps else peaks(env.get("device", ""))
    print(f"Device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, "
          f"adaptok {env.get('adaptok')} at {env.get('commit')}; {env.get('date')}")
    if peak:
        print(f"Floors from {peak[0]:.0f} TFLOP/s and {peak[1]:.0f} GB/s.")
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for group, members in groups.items():
        print(f"\n### {group}\n")
        print("\n".join(table(members, peak)))
    floor = floor_ratios(groups)
    if floor:
        print("\n### Against a plain copy of the op's bytes\n")
        print("\n".join(floor))
    overhead = cls_overhead(groups)
    if overhead:
        print("\n### Cost of return_cls_attn\n")
        print("\n".join(overhead))


if __name__ == "__main__":
    main()
