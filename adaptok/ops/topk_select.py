"""Top-k class-attention token selection with inattentive-token fusion (EViT's
token reorganization), for packed batches of sequences of any lengths.

Sequence b (``N_b`` tokens, its first one the CLS token) keeps its ``k_b``
most attended tokens and fuses the others into one token::

    [CLS, x_j1, x_j2, ..., x_jk, fused]      a_j1 >= a_j2 >= ... (descending)
    fused = sum over dropped j of a_j * x_j  (raw class attention as weights)

where ``a_j = cls_attn[j]`` and equal scores rank the lower index first, the
same on every backend. ``k_b = ceil(keep_rate * (N_b - 1))`` or given per
sequence. A sequence that drops nothing (``k_b = N_b - 1``) is returned
unchanged, in its own order and without a fused token; ``fuse=False`` drops
the fused token; ``renormalize=True`` divides it by the sum of its weights.

The op ``adaptok::topk_select`` is served by the backends of
:mod:`adaptok.backends`: ``cuda`` (``csrc/topk_select_cuda.cu``), ``triton``
(``kernels/topk_select.py``), ``cpu`` (``csrc/topk_select.cpp``) and ``torch``
(:func:`topk_select_reference`, the specification). Every kernel finds each
sequence's top-k by ranking (no sort of the sequence to find the dropped
tokens) and gathers and fuses in the same pass. It is differentiable with
respect to ``x`` and ``cls_attn``. Output sizes are computed on the host from
the sequence lengths, so with host lengths (a :class:`adaptok.RaggedBatch`
carries them) nothing synchronizes with the device.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..backends import Op
from . import common

# ------------------------------------------------------------------ host sizes


def keep_counts(lengths: Sequence[int], keep_rate: float) -> list[int]:
    """``k_b = ceil(keep_rate * (N_b - 1))`` for each length (EViT's rule,
    with the same float arithmetic)."""
    return [math.ceil(keep_rate * (n - 1)) for n in lengths]


def output_lengths(lengths: Sequence[int], keep: Sequence[int], fuse: bool) -> list[int]:
    """Tokens of each output sequence: ``N_b`` when nothing is dropped,
    else ``1 + k_b + fuse``."""
    return [n if k == n - 1 else 1 + k + int(fuse) for n, k in zip(lengths, keep)]


def _check_keep_rate(keep_rate) -> float:
    keep_rate = common.host_float(keep_rate, "keep_rate")
    if not 0.0 < keep_rate <= 1.0:  # also rejects NaN
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return keep_rate


def _host_keep(keep, lengths: Sequence[int], device: torch.device) -> list[int]:
    """``keep`` (ints, or an integer tensor on the CPU or on ``device``: a
    device tensor is read once) as host ints, each in ``[0, N_b - 1]``."""
    if isinstance(keep, Tensor):
        if keep.dim() != 1 or keep.dtype.is_floating_point or keep.dtype == torch.bool:
            raise TypeError(f"keep must be a 1-D integer tensor, got {keep.dtype} of shape {tuple(keep.shape)}")
        if keep.device.type != "cpu" and keep.device != device:
            raise ValueError(f"keep must be on the CPU or on x's device ({device}), got {keep.device}")
        keep = keep.tolist()
    elif isinstance(keep, (str, bytes)) or not hasattr(keep, "__len__"):
        raise TypeError(f"keep must be ints (one per sequence) or a 1-D integer tensor, got {type(keep).__name__}")
    keep = list(keep)
    if len(keep) != len(lengths):
        raise ValueError(f"keep must have one entry per sequence ({len(lengths)}), got {len(keep)}")
    for b, (k, n) in enumerate(zip(keep, lengths)):
        try:
            k = keep[b] = common.host_int(k, f"keep[{b}]", -common.INT32_MAX)
        except TypeError:
            raise TypeError(f"keep must hold ints, got {k!r} at index {b}") from None
        if not 0 <= k <= n - 1:
            raise ValueError(f"keep[{b}] = {k} must lie in [0, N_b - 1 = {n - 1}] for sequence {b} of {n} tokens")
    return keep


# ----------------------------------------------------------------------- checks


def _check(x: Tensor, cu_seqlens: Tensor, cls_attn: Tensor, keep: Tensor, cu_seqlens_out: Tensor,
           total_out: int, max_seqlen: int) -> None:
    """Metadata checks (no device sync), also run while tracing."""
    common.check_tensors(x=x, cu_seqlens=cu_seqlens, cls_attn=cls_attn, keep=keep, cu_seqlens_out=cu_seqlens_out)
    if x.dim() != 2:
        raise ValueError(f"x must have shape [T, C], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one token")
    common.check_cu_seqlens(cu_seqlens, x, "x")
    common.check_cu_seqlens(cu_seqlens_out, x, "x", name="cu_seqlens_out")
    batch = cu_seqlens.shape[0] - 1
    if cu_seqlens_out.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens_out must have shape {tuple(cu_seqlens.shape)}, got {tuple(cu_seqlens_out.shape)}")
    if cls_attn.shape != (x.shape[0],):
        raise ValueError(f"cls_attn must have shape [T] = [{x.shape[0]}] (one score per token of x), got {tuple(cls_attn.shape)}")
    if cls_attn.dtype != torch.promote_types(x.dtype, torch.float32):
        raise TypeError(f"cls_attn must be {torch.promote_types(x.dtype, torch.float32)} for x of {x.dtype}, got {cls_attn.dtype}")
    common.check_same_device(cls_attn, "cls_attn", x, "x")
    if keep.dtype != torch.int32 or keep.shape != (batch,):
        raise ValueError(f"keep must be int32 of shape [B] = [{batch}], got {keep.dtype} of shape {tuple(keep.shape)}")
    common.check_same_device(keep, "keep", x, "x")
    if total_out < batch:
        raise ValueError(f"total_out must be at least B = {batch}, got {total_out}")
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen must be >= 1, got {max_seqlen}")


def _check_values(x, cu_seqlens, keep, cu_seqlens_out, total_out, max_seqlen, fuse) -> None:
    """Checks that read offsets (CPU tensors, or ``ADAPTOK_DEBUG=1``)."""
    common.check_cu_seqlens_values(cu_seqlens, x.shape[0], total_name="x.shape[0]")
    common.check_max_len(cu_seqlens, max_seqlen, "max_seqlen")
    lengths = cu_seqlens.diff().tolist()
    keep = _host_keep(keep, lengths, x.device)
    common.check_cu_seqlens_values(cu_seqlens_out, total_out, name="cu_seqlens_out", total_name="total_out")
    expected = output_lengths(lengths, keep, fuse)
    for b, (m, e) in enumerate(zip(cu_seqlens_out.diff().tolist(), expected)):
        if m != e:
            raise ValueError(f"cu_seqlens_out gives sequence {b} {m} tokens; with {lengths[b]} tokens and keep "
                             f"{keep[b]} it has {e}")


# ---------------------------------------------------------------------- backends


def _example(device, dtype, lengths=(50, 197, 1), channels=384, keep_rate=0.7):
    x = torch.randn(sum(lengths), channels, device=device).to(dtype)
    cu = common.cu_seqlens(lengths, device)
    keep = keep_counts(lengths, keep_rate)
    out_lengths = output_lengths(lengths, keep, True)
    cu_out = common.cu_seqlens(out_lengths, device)
    cls_attn = torch.rand(sum(lengths), device=device, dtype=torch.promote_types(dtype, torch.float32))
    keep = torch.tensor(keep, dtype=torch.int32, device=device)
    return x, cu, cls_attn, keep, cu_out, sum(out_lengths), max(lengths), True, False


TOPK_SELECT = Op("topk_select", subject=lambda x, *rest: x, example=_example)


@TOPK_SELECT.register("torch")
def topk_select_reference(x: Tensor, cu_seqlens: Tensor, cls_attn: Tensor, keep: Tensor, cu_seqlens_out: Tensor,
                          total_out: int, max_seqlen: int, fuse: bool, renormalize: bool):
    """Plain PyTorch, one sequence at a time (reads offsets on the host): the
    specification of the op. The fused token accumulates in fp32 (fp64 for
    fp64 inputs).

    Returns:
        ``out [total_out, C]`` in x's dtype and ``kept_index`` int64
        ``[total_out]``: the row of x each output row copies, -1 for fused rows.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    out = x.new_empty((total_out, x.shape[1]))
    kept_index = torch.empty(total_out, dtype=torch.int64, device=x.device)
    bounds, starts, ks = cu_seqlens.tolist(), cu_seqlens_out.tolist(), keep.tolist()
    for s, e, o, k in zip(bounds[:-1], bounds[1:], starts, ks):
        n = e - s
        if k == n - 1:
            out[o:o + n] = x[s:e]
            kept_index[o:o + n] = torch.arange(s, e, device=x.device)
            continue
        # A stable descending sort ranks equal scores by lower index first.
        order = torch.sort(cls_attn[s + 1:e], descending=True, stable=True).indices + (s + 1)
        rows = torch.cat([torch.tensor([s], device=x.device), order[:k]])
        out[o:o + k + 1] = x[rows]
        kept_index[o:o + k + 1] = rows
        if fuse:
            dropped = order[k:].sort().values
            w = cls_attn[dropped].to(compute)
            if renormalize:  # a weight sum that is not positive gives a zero token
                w = w / w.sum() if w.sum() > 0 else torch.zeros_like(w)
            out[o + k + 1] = (w[:, None] * x[dropped].to(compute)).sum(0).to(x.dtype)
            kept_index[o + k + 1] = -1
    return out, kept_index


# The CUDA kernel stages a sequence's scores in shared memory.
CUDA_MAX_SEQLEN = 16384


def _cuda_check(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, total_out, max_seqlen, *rest) -> Optional[str]:
    return f"sequences up to {CUDA_MAX_SEQLEN} tokens, got max_seqlen {max_seqlen}" if max_seqlen > CUDA_MAX_SEQLEN else None


@TOPK_SELECT.register("cuda", dtypes=common.FLOATS, ext_op="ext_topk_select", check=_cuda_check)
@TOPK_SELECT.register("cpu", dtypes=common.FLOATS, ext_op="ext_topk_select")
def _topk_select_ext(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, total_out, max_seqlen, fuse, renormalize):
    out = common.empty((total_out, x.shape[1]), x)
    kept_index = common.empty((total_out,), x, torch.int64)
    torch.ops.adaptok.ext_topk_select(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, max_seqlen, fuse, renormalize,
                                      out, kept_index)
    return out, kept_index


@TOPK_SELECT.register("triton", dtypes=common.FLOATS)
def _topk_select_triton(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, total_out, max_seqlen, fuse, renormalize):
    out = common.empty((total_out, x.shape[1]), x)
    kept_index = common.empty((total_out,), x, torch.int64)
    common.triton_kernels("topk_select").forward(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, max_seqlen, fuse, renormalize, out, kept_index)
    return out, kept_index


# ------------------------------------------------------------------- custom op


def _topk_select_body(x: Tensor, cu_seqlens: Tensor, cls_attn: Tensor, keep: Tensor, cu_seqlens_out: Tensor,
                      total_out: int, max_seqlen: int, fuse: bool, renormalize: bool) -> tuple[Tensor, Tensor]:
    _check(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, total_out, max_seqlen)
    if x.stride(1) != 1:
        x = x.contiguous()
    args = (x, cu_seqlens.contiguous(), cls_attn.contiguous(), keep.contiguous(), cu_seqlens_out.contiguous(),
            total_out, max_seqlen, fuse, renormalize)
    impl = TOPK_SELECT.select(*args)
    if common.check_values_in_python(impl, cu_seqlens):
        _check_values(x, cu_seqlens, keep, cu_seqlens_out, total_out, max_seqlen, fuse)
    return impl.fn(*args)


_topk_select_op = torch.library.custom_op("adaptok::topk_select", mutates_args=())(_topk_select_body)


@_topk_select_op.register_fake
def _(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, total_out, max_seqlen, fuse, renormalize):
    _check(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, total_out, max_seqlen)
    return x.new_empty((total_out, x.shape[1])), x.new_empty((total_out,), dtype=torch.int64)


def _setup(ctx, inputs, output):
    x, cu_seqlens, cls_attn, keep, cu_seqlens_out, total_out, _, fuse, renormalize = inputs
    _, kept_index = output
    ctx.save_for_backward(x if fuse else None, cls_attn, kept_index, cu_seqlens, cu_seqlens_out)
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.fuse, ctx.renormalize = fuse, renormalize
    ctx.mark_non_differentiable(kept_index)


def _backward(ctx, grad_out, _grad_index):
    """Kept rows pass their gradient back to their source row; a fused row
    passes ``w_j * g`` to each dropped token j and ``<x_j, g>`` (renormalized:
    ``<x_j - fused, g> / S``) to its score. Masks select rather than
    multiply, so a non-finite value elsewhere never leaks in; per-sequence
    sums use no atomics, so the result is deterministic. No device sync."""
    x, cls_attn, kept_index, cu_seqlens, cu_seqlens_out = ctx.saved_tensors
    (T, C), compute = ctx.x_shape, cls_attn.dtype
    kept = kept_index >= 0
    src = torch.where(kept, kept_index, 0)
    g = grad_out.to(compute)
    grad_x = torch.zeros((T, C), dtype=compute, device=g.device).index_add_(0, src, g.masked_fill(~kept[:, None], 0))
    grad_a = torch.zeros_like(cls_attn)
    if ctx.fuse:
        # A sequence's fused row is its last output row.
        last = cu_seqlens_out[1:].long() - 1
        has_fused = kept_index[last] < 0
        g_fused = torch.where(has_fused[:, None], g[last], 0.0)
        copies = torch.zeros(T, dtype=torch.int32, device=g.device).index_add_(0, src, kept.to(torch.int32))
        seq_in = common.seq_ids(cu_seqlens, T)
        dropped = (copies == 0) & has_fused[seq_in]
        g_tok = g_fused[seq_in]
        xf = x.to(compute)
        a = torch.where(dropped, cls_attn, 0.0)
        if ctx.renormalize:
            offsets = cu_seqlens.long()
            total = torch.segment_reduce(a, "sum", offsets=offsets, unsafe=True)
            inv = torch.where(total > 0, 1 / torch.where(total > 0, total, 1.0), 0.0)
            fused = torch.segment_reduce(a[:, None] * xf, "sum", offsets=offsets, axis=0, unsafe=True) * inv[:, None]
            inv = inv[seq_in]
            grad_x += torch.where(dropped[:, None], (a * inv)[:, None] * g_tok, 0.0)
            grad_a = torch.where(dropped, inv * ((xf - fused[seq_in]) * g_tok).sum(-1), 0.0)
        else:
            grad_x += torch.where(dropped[:, None], a[:, None] * g_tok, 0.0)
            grad_a = torch.where(dropped, (xf * g_tok).sum(-1), 0.0)
    return grad_x.to(ctx.x_dtype), None, grad_a, None, None, None, None, None, None


_topk_select_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------ public


def topk_select(x: Tensor, cu_seqlens: Tensor, max_seqlen: int, cls_attn: Tensor, *,
                keep_rate: Optional[float] = None, keep: Union[Tensor, Sequence[int], None] = None,
                fuse: bool = True, renormalize: bool = False, lengths: Optional[Sequence[int]] = None):
    """Keep each sequence's most attended tokens and fuse the rest (EViT).

    Args:
        x: ``[T, C]`` packed tokens; sequence b is ``x[cu_seqlens[b]:cu_seqlens[b+1]]``,
            its first token the CLS token (never dropped).
        cu_seqlens: int32 ``[B + 1]``.
        max_seqlen: the longest sequence, a host int.
        cls_attn: ``[T]`` token scores, e.g. the ``cls_attn`` of
            :func:`adaptok.varlen_attention`; the CLS entries are ignored.
            fp32 (or x's dtype, promoted to fp32).
        keep_rate: in (0, 1]: ``k_b = ceil(keep_rate * (N_b - 1))``.
        keep: instead of ``keep_rate``, ``k_b`` per sequence in ``[0, N_b - 1]``
            (ints, or an integer tensor; a device tensor is read once).
        fuse: append the fused token ``sum of cls_attn[j] * x[j]`` over the
            dropped tokens (to sequences that drop any).
        renormalize: divide the fused token by the sum of its weights.
        lengths: the ``N_b`` as host ints, if known: saves the one read of
            ``cu_seqlens`` that sizing the output needs otherwise (a device
            sync on a GPU, and a graph break under ``torch.compile``).

    Returns:
        ``(x_out [T_out, C], cu_seqlens_out int32 [B + 1], max_seqlen_out,
        kept_index int64 [T_out])``: each output sequence is ``[CLS, the k_b
        kept tokens by descending score, fused]``; ``kept_index`` holds the
        row of x each output row copies, -1 for fused rows.

    Example::

        >>> x = torch.randn(247, 384)                      # a 50- and a 197-token image
        >>> cu = torch.tensor([0, 50, 247], dtype=torch.int32)
        >>> x_out, cu_out, n_out, kept = topk_select(x, cu, 197, torch.rand(247), keep_rate=0.7)
        >>> cu_out.tolist(), n_out                         # 1 + ceil(0.7 (N - 1)) + 1 tokens
        ([0, 37, 177], 140)
    """
    x_out, cu_out, out_lengths, kept_index = select_tokens(x, cu_seqlens, max_seqlen, cls_attn, keep_rate, keep, fuse,
                                                           renormalize, lengths)
    return x_out, cu_out, max(out_lengths), kept_index


def select_tokens(x, cu_seqlens, max_seqlen, cls_attn, keep_rate, keep, fuse, renormalize, lengths,
                  lengths_checked: bool = False):
    """:func:`topk_select` that returns the output lengths as host ints
    (instead of their maximum), for :meth:`adaptok.RaggedBatch.topk_select`.
    ``lengths_checked``: the caller guarantees that ``lengths`` are those of
    ``cu_seqlens`` (a :class:`RaggedBatch` checked them when it was built),
    so the offsets are not read back on the host again."""
    common.check_tensors(x=x, cu_seqlens=cu_seqlens, cls_attn=cls_attn)
    common.check_cu_seqlens(cu_seqlens, x, "x")
    if (keep_rate is None) == (keep is None):
        raise ValueError("give exactly one of keep_rate and keep, got " + ("both" if keep is not None else "neither"))
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be a host int (reading it from a tensor would sync), got {type(max_seqlen).__name__}")
    if not cls_attn.is_floating_point():
        raise TypeError(f"cls_attn must be floating point, got {cls_attn.dtype}")
    batch = cu_seqlens.shape[0] - 1
    recheck = common.check_values_now(cu_seqlens) and not torch.compiler.is_compiling() and not lengths_checked
    if recheck:
        common.check_cu_seqlens_values(cu_seqlens, x.shape[0], total_name="x.shape[0]")
    if lengths is None:
        lengths = cu_seqlens.diff().tolist()
    else:
        lengths = [int(n) for n in lengths]
        if len(lengths) != batch:
            raise ValueError(f"lengths must have one entry per sequence ({batch}), got {len(lengths)}")
        if sum(lengths) != x.shape[0]:
            raise ValueError(f"lengths must sum to x.shape[0] = {x.shape[0]}, got {sum(lengths)}")
        if recheck and lengths != cu_seqlens.diff().tolist():
            raise ValueError(f"lengths must match cu_seqlens, got {lengths} for {cu_seqlens.diff().tolist()}")
    if min(lengths) < 1:
        raise ValueError(f"every sequence needs at least one token, got lengths {lengths}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"cu_seqlens holds a sequence of {max(lengths)} tokens, more than max_seqlen = {max_seqlen}")
    counts = keep_counts(lengths, _check_keep_rate(keep_rate)) if keep is None else _host_keep(keep, lengths, x.device)
    out_lengths = output_lengths(lengths, counts, fuse)
    cu_out = common.cu_seqlens(out_lengths, x.device)
    keep_t = torch.tensor(counts, dtype=torch.int32).to(x.device, non_blocking=True)
    cls_attn = cls_attn.to(torch.promote_types(x.dtype, torch.float32))
    op = torch.ops.adaptok.topk_select if common.dispatcher_needed(x, cls_attn) else _topk_select_body
    x_out, kept_index = op(x, cu_seqlens, cls_attn, keep_t, cu_out, sum(out_lengths), max_seqlen, fuse, renormalize)
    return x_out, cu_out, out_lengths, kept_index
