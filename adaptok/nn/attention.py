"""Attention within each sequence of a packed ragged batch, with the class
attention EViT ranks tokens by as an optional side output, on the path
measured fastest for the batch's shape: one dense call per run of
equal-length sequences (SDPA, or explicit matmuls where
:func:`matmul_attention_pays`), or the varlen kernel
(:func:`adaptok.varlen_attention`) when lengths vary too much."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedModelError
from ..ops.varlen_attention import varlen_attention
from ..ragged import RaggedBatch

# A batch whose sequences fall into at most this many runs of equal length
# (a uniform batch is one run; packed grids are one run per grid) runs
# attention as one dense SDPA call per run; more runs take the varlen kernel.
# Measured on the CPU: SDPA on two [16, 6, N, 64] runs (N = 197, 50) took
# 16 ms against 25 ms for the varlen kernel over the same packed tokens.
MAX_DENSE_RUNS = 4


def runs(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal length as ``(first token, sequences, length)``."""
    runs, token = [], 0
    for n in lengths:
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([token, 1, n])
        token += n
    return [tuple(r) for r in runs]


def matmul_attention_pays(device: torch.device, dtype: torch.dtype, sequences: int, heads: int, n: int) -> bool:
    """Whether attention over ``sequences`` x ``heads`` rows of ``n`` tokens
    runs faster as explicit ``softmax((scale q) k^T) v`` matmuls than
    through SDPA.

    Measured on the CPU (2 cores, AVX-512 BF16, torch 2.14, head dim 64, 6
    heads, 20 paired calls; the table is in ``docs/vit.md``): in bf16 the
    matmuls take 0.36-0.8x SDPA's time for every batch at up to 140 tokens,
    0.54x for one image of 197 tokens and 0.97-1.09x for 8 to 64 images of
    197; inside DeiT-S at 32 images, SDPA's four 197-token blocks took 86 ms
    where the public EViT code's matmuls took about 30 ms (profiled), so the
    matmuls serve every ViT length (up to 256 tokens). In fp32 they gain at most 20 % in a narrow band and lose
    up to 2.8x just past it, so fp32 (and fp16, not measured) keep SDPA, as
    does CUDA (its fused kernels; no GPU measurement yet)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    return n <= MATMUL_ATTENTION_MAX_TOKENS or sequences * heads * n * n <= MATMUL_ATTENTION_MAX_SCORES


# The CPU bf16 matmul path (see matmul_attention_pays) serves sequences of up
# to this many tokens at any batch, and longer ones while the [b, H, n, n]
# score tensor holds at most MATMUL_ATTENTION_MAX_SCORES elements.
MATMUL_ATTENTION_MAX_TOKENS = 256
MATMUL_ATTENTION_MAX_SCORES = 1_000_000


def _dense_runs(q: Tensor, k: Tensor, v: Tensor, x: RaggedBatch, scale: float, dropout: float,
                need_cls: bool):
    """Attention over each run of equal-length sequences, on views of the
    packed ``q, k, v [T, H, D]``: SDPA, or explicit matmuls where
    :func:`matmul_attention_pays`. The CLS rows for ``need_cls`` cost
    ``O(N D)`` per head with SDPA and nothing more with the matmuls (their
    probabilities hold them). Returns ``out [T, H * D]`` and ``cls_attn [T]``
    (or None)."""
    T, H, D = q.shape
    spans = runs(x.lengths)
    out = None if len(spans) == 1 else q.new_empty((T, H, D))
    cls = []
    stat = torch.promote_types(q.dtype, torch.float32)
    for start, count, n in spans:
        qr, kr, vr = (t[start:start + count * n].view(count, n, H, D).transpose(1, 2) for t in (q, k, v))
        if matmul_attention_pays(q.device, q.dtype, count, H, n):
            # q is scaled first (exact for a power-of-2 scale: head dims 16, 64,
            # 256); the softmax computes in fp32 and rounds the probabilities
            # to bf16 for the P V matmul, the CLS rows are kept in fp32.
            scores = (qr * scale) @ kr.transpose(-1, -2)  # [count, H, n, n]
            if need_cls:
                cls.append(scores[:, :, 0].softmax(-1, dtype=stat).mean(1).reshape(count * n))
            probs = scores.softmax(-1)
            if dropout > 0:
                probs = F.dropout(probs, dropout)
            o = (probs @ vr).transpose(1, 2)
        else:
            o = F.scaled_dot_product_attention(qr, kr, vr, dropout_p=dropout, scale=scale).transpose(1, 2)
            if need_cls:
                autocast = torch.is_autocast_enabled(q.device.type)
                with torch.autocast(q.device.type, enabled=False) if autocast else contextlib.nullcontext():
                    scores = (qr[:, :, :1].to(stat) @ kr.to(stat).transpose(-1, -2)) * scale  # [count, H, 1, n]
                cls.append(scores.softmax(-1).mean(1).reshape(count * n))
        if out is None:
            out = o.reshape(T, H, D)
        else:  # one copy, as the single-run reshape makes
            out[start:start + count * n].view(count, n, H, D).copy_(o)
    cls_attn = (cls[0] if len(cls) == 1 else torch.cat(cls)) if need_cls else None
    return out.reshape(T, H * D), cls_attn


def packed_attention(q: Tensor, k: Tensor, v: Tensor, x: RaggedBatch, scale: float, dropout: float = 0.0,
                     need_cls: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Attention of packed ``q, k, v [T, H, D]`` within each sequence of
    ``x`` (its layout).

    Returns ``(out [T, H * D], cls_attn [T] or None)``: with ``need_cls``,
    for each token the head-mean probability with which its sequence's
    first token attends to it."""
    if len(runs(x.lengths)) <= MAX_DENSE_RUNS:
        return _dense_runs(q, k, v, x, scale, dropout, need_cls)
    if dropout > 0:
        raise UnsupportedModelError("attention dropout (attn_drop_rate > 0) is not supported in training on "
                                    "batches with many sequence lengths: the varlen kernel has no dropout")
    result = varlen_attention(q, k, v, x.cu_seqlens, x.max_seqlen, scale=scale, return_cls_attn=need_cls)
    out, cls_attn = result if need_cls else (result, None)
    return out.reshape(q.shape[0], -1), cls_attn
