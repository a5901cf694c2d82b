"""Timing and provenance shared by ``adaptok-bench`` and the ``bench/``
suite: one call timed (CUDA events on a GPU), medians and spread, the
allocator setting, the environment every result records, and the machine
ceilings (peaks, attention work)."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

import adaptok
from adaptok.devices import device_name, extension_status, package_version


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``: CUDA events on a GPU, ``perf_counter``
    on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarize(samples: list[float]) -> dict:
    """Median and spread (interquartile range) of timing samples, in seconds."""
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "q1_s": q[0], "q3_s": q[2], "n": len(samples)}


def steady_allocator() -> str:
    """CPU runs: make glibc reuse freed memory (no mmap for large blocks, no
    trimming). Otherwise whether a provider's large temporaries come from
    fresh pages (a page fault per 4 KiB) depends on glibc's adaptive mmap
    threshold, i.e. on which benchmarks ran before: measured 4.9 ms against
    13.5 ms for the same EViT ops. Every provider runs under the same
    setting, the steady state of a long-running process."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default (not glibc)"
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**30):
        return "glibc, mmap off, trim off"
    return "default (mallopt failed)"


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """Device, versions and commit, recorded with every result."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "adaptok": adaptok.__version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "extension": extension_status(),
        "threads": torch.get_num_threads(),
    }


# Dense (no sparsity) fp16/bf16 tensor-core rate in TFLOP/s and memory
# bandwidth in GB/s, from the vendor datasheets, keyed by a substring of
# torch.cuda.get_device_name(); the first match wins.
PEAKS = (
    ("H200", 989.0, 4800.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100", 989.0, 3350.0),  # SXM (HBM3)
)


def peaks(device_name: str):
    """``(tflops, gbps)`` of a known GPU, else ``None``."""
    for key, tflops, gbps in PEAKS:
        if key in device_name:
            return tflops, gbps
    return None


def attention_work(lengths, heads: int, head_dim: int, element_size: int, *, backward: bool = False,
                   cls: bool = False) -> dict:
    """Useful FLOPs and the fewest bytes of variable-length attention.

    Forward: ``Q K^T`` and ``P V``, ``4 H D sum(N^2)`` FLOPs; reads q, k, v
    and writes out (``4 T H D`` elements) plus fp32 lse (and cls) ``[H, T]``.
    Backward adds ``dV``, ``dP``, ``dQ``, ``dK`` (2.5x the forward FLOPs, no
    recomputation counted), reads q, k, v, out, dout, lse and writes dq, dk,
    dv. The two floors of a time are ``flops / peak rate`` and ``bytes /
    bandwidth``.
    """
    total = sum(lengths)
    flops = 4 * heads * head_dim * sum(n * n for n in lengths)
    stats = 4 * heads * total
    nbytes = 4 * total * heads * head_dim * element_size + stats * (2 if cls else 1)
    if backward:
        flops = flops * 7 // 2
        nbytes += 8 * total * heads * head_dim * element_size + 2 * stats
    return {"flops": flops, "bytes": nbytes}


def write_report(rep: dict, out: str, name: str) -> str:
    """Write a benchmark's report ``rep`` as JSON to ``out/name``; returns
    the path."""
    import json

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(rep, f, indent=1)
    return path
