"""pytest-benchmark suite. Run with ``pytest bench --benchmark-json OUT.json``;
every result carries the device, versions and commit in ``extra_info``."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from adaptok.benchmarking import environment  # noqa: E402
from adaptok.info import default_device  # noqa: E402

DEVICE = default_device()
ON_GPU = DEVICE.type == "cuda"


def _steady_allocator() -> str:
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


ALLOCATOR = "the device's caching allocator" if ON_GPU else _steady_allocator()


@pytest.fixture
def bench(benchmark):
    """``benchmark`` that synchronizes the GPU around each call and records
    the environment. One untimed call first compiles what needs compiling."""
    benchmark.extra_info.update(environment(DEVICE), host_allocator=ALLOCATOR)

    def run(fn):
        fn()
        if ON_GPU:
            torch.cuda.synchronize()

        def call():
            fn()
            if ON_GPU:
                torch.cuda.synchronize()
        return benchmark(call)

    return run
