"""Ragged-batch ops: every backend next to the per-sequence Python loop, on
the 50/50 mix of 50- and 197-token sequences (C = 384) that adaptok-bench
uses: 256 images in bfloat16 on a GPU, 64 in float32 on the CPU."""
import pytest
import torch

from adaptok.backends import BACKENDS, REGISTRY
from adaptok.bench import cases, make_batch

from conftest import DEVICE, ON_GPU

BATCH, DTYPE = (256, torch.bfloat16) if ON_GPU else (64, torch.float32)
CASES = {name: (args, nbytes, loop) for name, args, nbytes, loop in cases(make_batch(BATCH, 384, DEVICE, DTYPE))}


@pytest.mark.parametrize("provider", ["python loop", *BACKENDS])
@pytest.mark.parametrize("op_name", list(CASES))
def bench_ragged(bench, op_name, provider):
    args, nbytes, loop = CASES[op_name]
    if provider == "python loop":
        fn = loop
    else:
        op = REGISTRY[op_name]
        reason = op.why_not(provider, *args)
        if reason is None and provider == "triton" and not ON_GPU:
            reason = "the Triton interpreter is not a performance target"
        if reason is not None:
            pytest.skip(reason)
        fn = lambda: op.impls[provider].fn(*args)  # noqa: E731
    bench(fn)
