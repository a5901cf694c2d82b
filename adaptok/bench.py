"""``adaptok-bench`` (or ``python -m adaptok.bench``): runs adaptok's ragged
batching on whatever device exists and compares every backend side by side.

The batch is a 50/50 mix of 7x7 and 14x14 images (50 and 197 tokens with the
CLS token), 384 channels, as DeiT-S sees it: 256 images in bfloat16 on a GPU,
64 in float32 on the CPU. Each op runs on every backend that can serve it, next
to the per-sequence Python loop a user would write without adaptok and a plain
copy of the same bytes (the bandwidth ceiling). Prints a table and writes
``ragged.json`` (device, versions, commit, medians) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch.nn.utils.rnn import pad_sequence

import adaptok
from adaptok.backends import REGISTRY
from adaptok.benchmarking import environment, summarize, time_fn
from adaptok.info import default_device


def make_batch(batch: int, channels: int, device, dtype, short: int = 50, long: int = 197):
    """A RaggedBatch alternating ``short``- and ``long``-token sequences."""
    g = torch.Generator().manual_seed(0)
    lengths = [short if i % 2 == 0 else long for i in range(batch)]
    return adaptok.RaggedBatch.from_list([torch.randn(n, channels, generator=g).to(device, dtype) for n in lengths])


def cases(rb: adaptok.RaggedBatch):
    """``(op, args, bytes moved, python-loop baseline)`` for each ragged op."""
    lengths = list(rb.lengths)
    row = rb.values[0].numel() * rb.values.element_size()
    padded = rb.to_padded()
    idx = list(range(1, rb.batch_size, 2))
    sub = rb.index_select(idx)
    idx_dev = torch.tensor(idx, device=rb.device)
    return [
        ("pack", (padded, rb.cu_seqlens, rb.total_tokens), 2 * rb.total_tokens * row,
         lambda: torch.cat([padded[b, :n] for b, n in enumerate(lengths)])),
        ("unpack", (rb.values, rb.cu_seqlens, rb.max_seqlen, 0.0), (rb.total_tokens + padded.shape[0] * padded.shape[1]) * row,
         lambda: pad_sequence(rb.values.split(lengths), batch_first=True)),
        ("cls_tokens", (rb.values, rb.cu_seqlens), 2 * rb.batch_size * row,
         lambda: torch.stack([s[0] for s in rb.values.split(lengths)])),
        ("select_sequences", (rb.values, rb.cu_seqlens, idx_dev, sub.cu_seqlens, sub.total_tokens), 2 * sub.total_tokens * row,
         lambda: torch.cat([rb.values.split(lengths)[i] for i in idx])),
    ]


def run(device: torch.device, dtype: torch.dtype, batch: int, channels: int, repeats: int) -> dict:
    rb = make_batch(batch, channels, device, dtype)
    results = []
    for name, args, nbytes, loop in cases(rb):
        op = REGISTRY[name]
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        # The ceiling: one copy of the same bytes into a new tensor (every op
        # allocates its output too).
        providers = {"python loop": loop, "copy (ceiling)": src.clone}
        for b, reason in op.reasons(*args).items():
            if reason is None and not (b == "triton" and device.type == "cpu"):
                providers[b] = lambda fn=op.impls[b].fn: fn(*args)
        for provider, fn in providers.items():
            stats = summarize(time_fn(fn, device, repeats=repeats, min_time=0.2))
            results.append({"op": name, "provider": provider, "bytes": nbytes,
                            "gb_per_s": nbytes / stats["median_s"] / 1e9, **stats})
    return {"environment": environment(device), "batch": batch, "channels": channels,
            "dtype": str(dtype).replace("torch.", ""), "mix": "50/50 of 50 and 197 tokens", "results": results}


def table(report: dict) -> str:
    lines = [f"{report['environment']['device']} | {report['batch']} images, {report['mix']}, "
             f"C={report['channels']}, {report['dtype']} | median of >= 20 runs",
             f"{'op':17s} {'provider':15s} {'time (us)':>10s} {'GB/s':>8s} {'vs loop':>8s} {'% of copy':>9s}"]
    by_op: dict = {}
    for r in report["results"]:
        by_op.setdefault(r["op"], {})[r["provider"]] = r
    for op, rows in by_op.items():
        loop, copy = rows["python loop"]["median_s"], rows["copy (ceiling)"]["median_s"]
        for provider, r in rows.items():
            lines.append(f"{op:17s} {provider:15s} {r['median_s'] * 1e6:10.1f} {r['gb_per_s']:8.1f} "
                         f"{loop / r['median_s']:7.2f}x {100 * copy / r['median_s']:8.0f}%")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="adaptok-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None, help="images (default: 256 on a GPU, 64 on the CPU)")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench-out", help="folder for ragged.json (default: bench-out)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    batch = args.batch or (256 if gpu else 64)
    report = run(device, dtype, batch, args.channels, args.repeats)
    print(table(report))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ragged.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
