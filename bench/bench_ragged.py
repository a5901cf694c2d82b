"""Ragged-batch ops: every backend next to the per-sequence Python loop, on
a 50/50 mix of 50- and 197-token sequences (7x7 and 14x14 images with their
CLS token, C = 384): 256 images in bfloat16 on a GPU, 64 in float32 on the CPU."""
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

import adaptok
from adaptok.backends import BACKENDS, REGISTRY

from conftest import DEVICE, ON_GPU

BATCH, DTYPE = (256, torch.bfloat16) if ON_GPU else (64, torch.float32)


def make_batch(batch: int, channels: int, device, dtype, short: int = 50, long: int = 197):
    """A RaggedBatch alternating ``short``- and ``long``-token sequences."""
    g = torch.Generator().manual_seed(0)
    lengths = [short if i % 2 == 0 else long for i in range(batch)]
    return adaptok.RaggedBatch.from_list([torch.randn(n, channels, generator=g).to(device, dtype) for n in lengths])


def cases(rb: adaptok.RaggedBatch):
    """``{op: (args, python-loop baseline)}`` for each ragged op."""
    lengths = list(rb.lengths)
    padded = rb.to_padded()
    idx = list(range(1, rb.batch_size, 2))
    sub = rb.index_select(idx)
    idx_dev = torch.tensor(idx, device=rb.device)
    return {
        "pack": ((padded, rb.cu_seqlens, rb.total_tokens),
                 lambda: torch.cat([padded[b, :n] for b, n in enumerate(lengths)])),
        "unpack": ((rb.values, rb.cu_seqlens, rb.max_seqlen, 0.0),
                   lambda: pad_sequence(rb.values.split(lengths), batch_first=True)),
        "cls_tokens": ((rb.values, rb.cu_seqlens), lambda: torch.stack([s[0] for s in rb.values.split(lengths)])),
        "select_sequences": ((rb.values, rb.cu_seqlens, idx_dev, sub.cu_seqlens, sub.total_tokens),
                             lambda: torch.cat([rb.values.split(lengths)[i] for i in idx])),
    }


CASES = cases(make_batch(BATCH, 384, DEVICE, DTYPE))


@pytest.mark.parametrize("provider", ["python loop", *BACKENDS])
@pytest.mark.parametrize("op_name", list(CASES))
def bench_ragged(bench, op_name, provider):
    args, loop = CASES[op_name]
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
