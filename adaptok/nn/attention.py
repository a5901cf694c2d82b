"""Attention within each sequence of a packed ragged batch, with the class
attention EViT ranks tokens by as an optional side output, on the path
measured fastest for the batch's shape: one dense call per run of
equal-length sequences, in one of timm's two formulations (fused SDPA, or
explicit ``softmax((scale q) k^T) v`` matmuls, chosen per shape by
:func:`attention_path`), or the varlen kernel
(:func:`adaptok.varlen_attention`) when lengths vary too much.

Example::

    with adaptok.nn.attention.ATTENTION.force("sdpa"):   # or ADAPTOK_ATTENTION=sdpa
        logits = model(images)                             # no measured choice
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedModelError
from ..ops.varlen_attention import varlen_attention
from ..ragged import RaggedBatch
from ..tuning import Choice, bucket, measurable

# A batch whose sequences fall into at most this many runs of equal length
# (a uniform batch is one run; packed grids are one run per grid) runs
# attention as one dense call per run; more runs take the varlen kernel.
# Measured on the CPU: SDPA on two [16, 6, N, 64] runs (N = 197, 50) took
# 16 ms against 25 ms for the varlen kernel over the same packed tokens.
MAX_DENSE_RUNS = 4

# SDPA (timm's default) or timm's explicit matmuls, measured per shape in bf16
# on the CPU (ADAPTOK_ATTENTION=sdpa|matmul fixes it; see adaptok.tuning).
ATTENTION = Choice("attention", ("sdpa", "matmul"))

# The matmul formulation materializes [b, H, n, n] scores: it is a candidate
# for sequences of up to this many tokens at any batch, and for longer ones
# while the scores hold at most MATMUL_ATTENTION_MAX_SCORES elements.
MATMUL_ATTENTION_MAX_TOKENS = 256
MATMUL_ATTENTION_MAX_SCORES = 1_000_000


def attention_path(x: Tensor, dtype: torch.dtype, sequences: int, heads: int, n: int, head_dim: int,
                   need_cls: bool = False, dropout: float = 0.0) -> Optional[str]:
    """How a run of ``sequences`` x ``heads`` rows of ``n`` tokens (head
    dim ``head_dim``) computing in ``dtype`` attends: ``"sdpa"``,
    ``"matmul"``, or None (measure both on this call). ``x``: a tensor of
    the call (its device, and whether autograd records it); ``dropout``:
    the attention dropout.

    - ``ADAPTOK_ATTENTION`` / ``ATTENTION.force`` decide when set.
    - CUDA and every dtype but bf16 take SDPA (CUDA: its fused kernels;
      fp32: the matmuls gained at most 7-20 % in narrow bands and lost up
      to 2.8x just past them, and SDPA keeps parity mode exactly timm's
      default; fp16 on the CPU: not measured).
    - bf16 on the CPU is measured (:mod:`adaptok.tuning`), per sequence
      count rounded up to a power of 2, heads, tokens, head dim and
      ``need_cls``. PyTorch's CPU flash kernel is slow at some ViT shapes
      there (one 197-token image: SDPA 0.65 ms, the matmuls 0.43 ms) and
      fast at others (one 50-token image: 0.06-0.09 against 0.12-0.16 ms);
      which shapes differ by machine. Calls that cannot be timed (autograd,
      dropout, tracing, compiling, empty) take SDPA, timm's default: training
      draws the random numbers timm draws and keeps no ``[b, H, n, n]``
      probabilities for backward, and a compiled graph does not depend on
      what the process measured before.
    - Sequences over :data:`MATMUL_ATTENTION_MAX_TOKENS` tokens whose
      ``[b, H, n, n]`` scores would exceed
      :data:`MATMUL_ATTENTION_MAX_SCORES` elements take SDPA unless forced.
    """
    forced = ATTENTION.forced()
    if forced is not None:
        return forced
    if dtype is not torch.bfloat16 or x.device.type != "cpu":
        return "sdpa"
    if n > MATMUL_ATTENTION_MAX_TOKENS and sequences * heads * n * n > MATMUL_ATTENTION_MAX_SCORES:
        return "sdpa"
    if not measurable(x, dropout > 0):
        return ATTENTION.default
    return ATTENTION.get(_key(sequences, heads, n, head_dim, need_cls))  # None: measure on this call


def _key(sequences: int, heads: int, n: int, head_dim: int, need_cls: bool) -> tuple:
    return (bucket(sequences), heads, n, head_dim, bool(need_cls))


def _attend(path: str, q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float, need_cls: bool):
    """One dense run: ``q, k, v [b, H, n, D]`` -> ``(out [b, H, n, D],
    cls [b * n] fp32 or None)``.

    ``"matmul"`` is timm's explicit formulation (q scaled first, the softmax
    in the input dtype; the CLS rows from an fp32 softmax of the scores'
    first rows, so they cost nothing more). ``"sdpa"`` is timm's fused call;
    its CLS rows are recomputed in fp32 from q's first rows, ``O(n D)`` per
    head."""
    b, _, n, _ = q.shape
    stat = torch.promote_types(q.dtype, torch.float32)
    cls = None
    if path == "matmul":
        scores = (q * scale) @ k.transpose(-1, -2)  # [b, H, n, n]
        if need_cls:
            cls = scores[:, :, 0].softmax(-1, dtype=stat).mean(1).reshape(b * n)
        probs = scores.softmax(-1)
        if dropout > 0:
            probs = F.dropout(probs, dropout)
        return probs @ v, cls
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    if need_cls:
        autocast = torch.is_autocast_enabled(q.device.type)
        with torch.autocast(q.device.type, enabled=False) if autocast else contextlib.nullcontext():
            scores = (q[:, :, :1].to(stat) @ k.to(stat).transpose(-1, -2)) * scale  # [b, H, 1, n]
        cls = scores.softmax(-1).mean(1).reshape(b * n)
    return out, cls


def dense_attention(q: Tensor, k: Tensor, v: Tensor, spans: Sequence[tuple[int, int, int]], scale: float,
                    dropout: float = 0.0, need_cls: bool = False, path: Optional[str] = None):
    """Attention over each run of equal-length sequences, on views of the
    packed ``q, k, v [T, H, D]``; ``spans``: ``(first token, sequences,
    length)`` per run, covering all T tokens in order (:func:`runs`).
    Each run takes :func:`attention_path`'s choice for its shape, or
    ``path`` when the caller decided already.
    Returns ``out [T, H * D]`` and ``cls_attn [T]`` (fp32, or None)."""
    T, H, D = q.shape
    out = None if len(spans) == 1 else q.new_empty((T, H, D))
    cls = []
    for start, count, n in spans:
        qr, kr, vr = (t[start:start + count * n].view(count, n, H, D).transpose(1, 2) for t in (q, k, v))
        chosen = path or attention_path(q, q.dtype, count, H, n, D, need_cls, dropout)
        o, c = (_attend(chosen, qr, kr, vr, scale, dropout, need_cls) if chosen is not None else
                ATTENTION.measure(_key(count, H, n, D, need_cls),
                                  lambda p: _attend(p, qr, kr, vr, scale, 0.0, need_cls)))
        o = o.transpose(1, 2)
        cls.append(c)
        if out is None:
            out = o.reshape(T, H, D)
        else:  # one copy, as the single-run reshape makes
            out[start:start + count * n].view(count, n, H, D).copy_(o)
    cls_attn = (cls[0] if len(cls) == 1 else torch.cat(cls)) if need_cls else None
    return out.reshape(T, H * D), cls_attn


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


def packed_attention(q: Tensor, k: Tensor, v: Tensor, x: RaggedBatch, scale: float, dropout: float = 0.0,
                     need_cls: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Attention of packed ``q, k, v [T, H, D]`` within each sequence of
    ``x`` (its layout).

    Returns ``(out [T, H * D], cls_attn [T] or None)``: with ``need_cls``,
    for each token the head-mean probability with which its sequence's
    first token attends to it."""
    spans = runs(x.lengths)
    if len(spans) <= MAX_DENSE_RUNS:
        return dense_attention(q, k, v, spans, scale, dropout, need_cls)
    if dropout > 0:
        raise UnsupportedModelError("attention dropout (attn_drop_rate > 0) is not supported in training on "
                                    "batches with many sequence lengths: the varlen kernel has no dropout")
    result = varlen_attention(q, k, v, x.cu_seqlens, x.max_seqlen, scale=scale, return_cls_attn=need_cls)
    out, cls_attn = result if need_cls else (result, None)
    return out.reshape(q.shape[0], -1), cls_attn
