"""pytest-benchmark suite. Run with ``pytest bench --benchmark-json OUT.json``;
every result carries the device, versions and commit in ``extra_info``."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from adaptok.bench.timing import environment, steady_allocator  # noqa: E402
from adaptok.devices import default_device  # noqa: E402

DEVICE = default_device()
ON_GPU = DEVICE.type == "cuda"


ALLOCATOR = "the device's caching allocator" if ON_GPU else steady_allocator()


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
