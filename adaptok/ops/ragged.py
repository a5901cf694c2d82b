"""Ragged-batch data movement: the ops behind :class:`adaptok.RaggedBatch`.

A ragged batch packs B sequences of lengths ``N_b`` (each >= 1) into
``values [T, *F]`` with ``T = sum(N_b)``, described by ``cu_seqlens`` int32
``[B + 1]`` (``cu_seqlens[b]`` = offset of sequence b, ``cu_seqlens[0] = 0``,
``cu_seqlens[B] = T``).

=================  =====================================================
``pack``           padded ``x [B, N, *F]`` -> packed ``[T, *F]``
``unpack``         packed ``[T, *F]`` -> padded ``[B, L, *F]``
``cls_tokens``     packed ``[T, *F]`` -> first token of each sequence ``[B, *F]``
``select_sequences``  packed ``[T, *F]`` -> the sequences ``seq_idx``, packed
=================  =====================================================

Each op is a ``torch.library`` custom op (``torch.ops.adaptok.<name>``) with a
fake implementation and autograd, served by the ``cuda``, ``triton``, ``cpu``
and ``torch`` backends (:mod:`adaptok.backends`). Output sizes are host ints,
so no op synchronizes with the device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import Op
from . import common

def _row_width(t: Tensor, row_dims: int) -> int:
    width = 1
    for s in t.shape[row_dims:]:
        width *= s
    return width


def _example_batch(device, dtype, lengths=(50, 197, 1), channels=384):
    cu = common.cu_seqlens(lengths, device)
    return torch.randn(sum(lengths), channels, device=device).to(dtype), cu


# ----------------------------------------------------------------------------- pack


def _check_pack(x: Tensor, cu_seqlens: Tensor, total: int) -> None:
    common.check_tensor(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, N, ...], got {tuple(x.shape)}")
    common.check_cu_seqlens(cu_seqlens, x, "x")
    if cu_seqlens.shape[0] != x.shape[0] + 1:
        raise ValueError(f"cu_seqlens must have B + 1 = {x.shape[0] + 1} entries for x of shape {tuple(x.shape)}, got {cu_seqlens.shape[0]}")
    if not isinstance(total, torch.SymInt) and total < 0:
        raise ValueError(f"total must be >= 0 (the packed token count), got {total}")


PACK = Op("pack", subject=lambda x, cu, total: x,
          example=lambda device, dtype: (torch.zeros(3, 197, 384, device=device, dtype=dtype),
                                         _example_batch(device, dtype)[1], 248))


@PACK.register("torch")
def pack_reference(x: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """Plain PyTorch ``pack``: ``out[cu[b] + i] = x[b, i]`` for ``i < N_b``."""
    ids = common.seq_ids(cu_seqlens, total)
    return x[ids, common.positions(cu_seqlens, ids)]


@PACK.register("cpu", ext_op="ext_pack")
@PACK.register("cuda", ext_op="ext_pack")
def _pack_ext(x, cu_seqlens, total):
    out = common.empty((total, *x.shape[2:]), x)
    torch.ops.adaptok.ext_pack(x, cu_seqlens, out)
    return out


@PACK.register("triton", dtypes=common.FLOATS)
def _pack_triton(x, cu_seqlens, total):
    out = common.empty((total, *x.shape[2:]), x)
    common.triton_kernels("ragged").pack(x, cu_seqlens, out, _row_width(x, 2))
    return out


@torch.library.custom_op("adaptok::pack", mutates_args=())
def _pack_op(x: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    _check_pack(x, cu_seqlens, total)
    x, cu_seqlens = x.contiguous(), cu_seqlens.contiguous()
    impl = PACK.select(x, cu_seqlens, total)
    if common.check_values_in_python(impl, cu_seqlens):
        common.check_cu_seqlens_values(cu_seqlens, total, total_name="total")
        common.check_max_len(cu_seqlens, x.shape[1], "x.shape[1]")
    return impl.fn(x, cu_seqlens, total)


@_pack_op.register_fake
def _(x, cu_seqlens, total):
    _check_pack(x, cu_seqlens, total)
    return x.new_empty((total, *x.shape[2:]))


def _pack_setup(ctx, inputs, output):
    x, cu_seqlens, _ = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.length = x.shape[1]


def _pack_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return torch.ops.adaptok.unpack(grad, cu_seqlens, ctx.length, 0.0), None, None


_pack_op.register_autograd(_pack_backward, setup_context=_pack_setup)


def pack(x: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """Pack a padded batch.

    Args:
        x: ``[B, N, *F]``; sequence b is ``x[b, :N_b]``.
        cu_seqlens: int32 ``[B + 1]`` offsets of the packed sequences.
        total: ``T = cu_seqlens[-1]`` as a host int (no device sync).

    Returns:
        ``[T, *F]``.

    Example::

        >>> x = torch.randn(2, 4, 8)
        >>> pack(x, torch.tensor([0, 3, 5], dtype=torch.int32), 5).shape
        torch.Size([5, 8])
    """
    common.check_tensors(x=x, cu_seqlens=cu_seqlens)
    return torch.ops.adaptok.pack(x, cu_seqlens, common.host_int(total, "total"))


# --------------------------------------------------------------------------- unpack


def _check_unpack(values: Tensor, cu_seqlens: Tensor, length: int, pad_value: float) -> None:
    common.check_tensor(values, "values")
    if values.dim() < 1:
        raise ValueError("values must have shape [T, ...], got a 0-d tensor")
    common.check_cu_seqlens(cu_seqlens, values, "values")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    common.check_fill_value(pad_value, values.dtype, "pad_value")


UNPACK = Op("unpack", subject=lambda values, cu, length, pad: values,
            example=lambda device, dtype: (*_example_batch(device, dtype), 197, 0.0))


@UNPACK.register("torch")
def unpack_reference(values: Tensor, cu_seqlens: Tensor, length: int, pad_value: float) -> Tensor:
    """Plain PyTorch ``unpack``: ``out[b, i] = values[cu[b] + i]`` for ``i < N_b``, else ``pad_value``."""
    ids = common.seq_ids(cu_seqlens, values.shape[0])
    out = values.new_full((cu_seqlens.shape[0] - 1, length, *values.shape[1:]), pad_value)
    out[ids, common.positions(cu_seqlens, ids)] = values
    return out


def _unpack_out(values, cu_seqlens, length):
    return common.empty((cu_seqlens.shape[0] - 1, length, *values.shape[1:]), values)


@UNPACK.register("cpu", ext_op="ext_unpack")
@UNPACK.register("cuda", ext_op="ext_unpack")
def _unpack_ext(values, cu_seqlens, length, pad_value):
    out = _unpack_out(values, cu_seqlens, length)
    torch.ops.adaptok.ext_unpack(values, cu_seqlens, pad_value, out)
    return out


@UNPACK.register("triton", dtypes=common.FLOATS)
def _unpack_triton(values, cu_seqlens, length, pad_value):
    out = _unpack_out(values, cu_seqlens, length)
    common.triton_kernels("ragged").unpack(values, cu_seqlens, pad_value, out, _row_width(values, 1))
    return out


@torch.library.custom_op("adaptok::unpack", mutates_args=())
def _unpack_op(values: Tensor, cu_seqlens: Tensor, length: int, pad_value: float) -> Tensor:
    _check_unpack(values, cu_seqlens, length, pad_value)
    values, cu_seqlens = values.contiguous(), cu_seqlens.contiguous()
    impl = UNPACK.select(values, cu_seqlens, length, pad_value)
    if common.check_values_in_python(impl, cu_seqlens):
        common.check_cu_seqlens_values(cu_seqlens, values.shape[0], total_name="values.shape[0]")
        common.check_max_len(cu_seqlens, length, "length")
    return impl.fn(values, cu_seqlens, length, pad_value)


@_unpack_op.register_fake
def _(values, cu_seqlens, length, pad_value):
    _check_unpack(values, cu_seqlens, length, pad_value)
    return values.new_empty((cu_seqlens.shape[0] - 1, length, *values.shape[1:]))


def _unpack_setup(ctx, inputs, output):
    values, cu_seqlens, _, _ = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.total = values.shape[0]


def _unpack_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return torch.ops.adaptok.pack(grad, cu_seqlens, ctx.total), None, None, None


_unpack_op.register_autograd(_unpack_backward, setup_context=_unpack_setup)


def unpack(values: Tensor, cu_seqlens: Tensor, length: int, pad_value: float = 0.0) -> Tensor:
    """Unpack to a padded batch.

    Args:
        values: ``[T, *F]`` packed sequences.
        cu_seqlens: int32 ``[B + 1]``.
        length: padded length ``L`` (host int), at least the longest sequence.
        pad_value: value of the rows past each sequence's end, representable
            in values' dtype (a finite value past its range is a ValueError;
            inf and NaN are allowed).

    Returns:
        ``[B, L, *F]``.
    """
    common.check_tensors(values=values, cu_seqlens=cu_seqlens)
    return torch.ops.adaptok.unpack(values, cu_seqlens, common.host_int(length, "length", 1),
                                    common.host_float(pad_value, "pad_value"))


# ----------------------------------------------------------------------- cls_tokens


def _check_cls_tokens(values: Tensor, cu_seqlens: Tensor) -> None:
    common.check_tensor(values, "values")
    if values.dim() < 1:
        raise ValueError("values must have shape [T, ...], got a 0-d tensor")
    common.check_cu_seqlens(cu_seqlens, values, "values")


CLS_TOKENS = Op("cls_tokens", subject=lambda values, cu: values, example=_example_batch)


@CLS_TOKENS.register("torch")
def cls_tokens_reference(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Plain PyTorch ``cls_tokens``: ``out[b] = values[cu[b]]``."""
    return values[cu_seqlens[:-1].long()]


def _cls_tokens_out(values, cu_seqlens):
    return common.empty((cu_seqlens.shape[0] - 1, *values.shape[1:]), values)


@CLS_TOKENS.register("cpu", ext_op="ext_cls_tokens")
@CLS_TOKENS.register("cuda", ext_op="ext_cls_tokens")
def _cls_tokens_ext(values, cu_seqlens):
    out = _cls_tokens_out(values, cu_seqlens)
    torch.ops.adaptok.ext_cls_tokens(values, cu_seqlens, out)
    return out


@CLS_TOKENS.register("triton", dtypes=common.FLOATS)
def _cls_tokens_triton(values, cu_seqlens):
    out = _cls_tokens_out(values, cu_seqlens)
    common.triton_kernels("ragged").cls_tokens(values, cu_seqlens, out, _row_width(values, 1))
    return out


@torch.library.custom_op("adaptok::cls_tokens", mutates_args=())
def _cls_tokens_op(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    _check_cls_tokens(values, cu_seqlens)
    values, cu_seqlens = values.contiguous(), cu_seqlens.contiguous()
    impl = CLS_TOKENS.select(values, cu_seqlens)
    if common.check_values_in_python(impl, cu_seqlens):
        common.check_cu_seqlens_values(cu_seqlens, values.shape[0], total_name="values.shape[0]")
    return impl.fn(values, cu_seqlens)


@_cls_tokens_op.register_fake
def _(values, cu_seqlens):
    _check_cls_tokens(values, cu_seqlens)
    return values.new_empty((cu_seqlens.shape[0] - 1, *values.shape[1:]))


def _cls_tokens_setup(ctx, inputs, output):
    values, cu_seqlens = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.total = values.shape[0]


def _cls_tokens_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    grad_values = grad.new_zeros((ctx.total, *grad.shape[1:]))
    return grad_values.index_copy(0, cu_seqlens[:-1].long(), grad), None


_cls_tokens_op.register_autograd(_cls_tokens_backward, setup_context=_cls_tokens_setup)


def cls_tokens(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """First token of every sequence.

    Args:
        values: ``[T, *F]``; cu_seqlens: int32 ``[B + 1]``.

    Returns:
        ``[B, *F]``.
    """
    common.check_tensors(values=values, cu_seqlens=cu_seqlens)
    return torch.ops.adaptok.cls_tokens(values, cu_seqlens)


# ----------------------------------------------------------------- select_sequences


def _check_select(values: Tensor, cu_seqlens: Tensor, seq_idx: Tensor, cu_seqlens_out: Tensor, total_out: int) -> None:
    common.check_tensor(values, "values")
    if values.dim() < 1:
        raise ValueError("values must have shape [T, ...], got a 0-d tensor")
    common.check_cu_seqlens(cu_seqlens, values, "values")
    common.check_cu_seqlens(cu_seqlens_out, values, "values", name="cu_seqlens_out")
    common.check_tensor(seq_idx, "seq_idx")
    if seq_idx.dtype != torch.int64:
        raise TypeError(f"seq_idx must be int64, got {seq_idx.dtype}")
    if seq_idx.dim() != 1 or seq_idx.shape[0] != cu_seqlens_out.shape[0] - 1:
        raise ValueError(
            f"seq_idx must be 1-D with one entry per output sequence ({cu_seqlens_out.shape[0] - 1}), got shape {tuple(seq_idx.shape)}"
        )
    common.check_same_device(seq_idx, "seq_idx", values, "values")
    if not isinstance(total_out, torch.SymInt) and total_out < 0:
        raise ValueError(f"total_out must be >= 0 (the output token count), got {total_out}")


def _check_select_values(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out):
    common.check_cu_seqlens_values(cu_seqlens, values.shape[0], total_name="values.shape[0]")
    batch = cu_seqlens.shape[0] - 1
    bad = (seq_idx < 0) | (seq_idx >= batch)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"seq_idx[{b}] = {int(seq_idx[b])} is out of range for a batch of {batch} sequences")
    common.check_cu_seqlens_values(cu_seqlens_out, total_out, name="cu_seqlens_out", total_name="total_out")
    if not torch.equal(cu_seqlens_out.diff(), cu_seqlens.diff()[seq_idx]):
        raise ValueError("cu_seqlens_out must give every output sequence the length of input sequence seq_idx[b]")


SELECT_SEQUENCES = Op(
    "select_sequences", subject=lambda values, *rest: values,
    example=lambda device, dtype: (*_example_batch(device, dtype), torch.tensor([2, 0], device=device),
                                   torch.tensor([0, 1, 51], dtype=torch.int32, device=device), 51),
)


def select_rows(cu_seqlens: Tensor, seq_idx: Tensor, cu_seqlens_out: Tensor, total_out: int) -> Tensor:
    """``[total_out]`` int64: the source row in ``values`` of every output token."""
    ids = common.seq_ids(cu_seqlens_out, total_out)
    return cu_seqlens[seq_idx][ids].long() + common.positions(cu_seqlens_out, ids)


@SELECT_SEQUENCES.register("torch")
def select_sequences_reference(values: Tensor, cu_seqlens: Tensor, seq_idx: Tensor,
                               cu_seqlens_out: Tensor, total_out: int) -> Tensor:
    """Plain PyTorch ``select_sequences``: a row gather."""
    return values[select_rows(cu_seqlens, seq_idx, cu_seqlens_out, total_out)]


@SELECT_SEQUENCES.register("cpu", ext_op="ext_select_sequences")
@SELECT_SEQUENCES.register("cuda", ext_op="ext_select_sequences")
def _select_sequences_ext(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out):
    out = common.empty((total_out, *values.shape[1:]), values)
    torch.ops.adaptok.ext_select_sequences(values, cu_seqlens, seq_idx, cu_seqlens_out, out)
    return out


@SELECT_SEQUENCES.register("triton", dtypes=common.FLOATS)
def _select_sequences_triton(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out):
    out = common.empty((total_out, *values.shape[1:]), values)
    common.triton_kernels("ragged").select_sequences(values, cu_seqlens, seq_idx, cu_seqlens_out, out, _row_width(values, 1))
    return out


@torch.library.custom_op("adaptok::select_sequences", mutates_args=())
def _select_op(values: Tensor, cu_seqlens: Tensor, seq_idx: Tensor, cu_seqlens_out: Tensor, total_out: int) -> Tensor:
    _check_select(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out)
    values, cu_seqlens = values.contiguous(), cu_seqlens.contiguous()
    seq_idx, cu_seqlens_out = seq_idx.contiguous(), cu_seqlens_out.contiguous()
    impl = SELECT_SEQUENCES.select(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out)
    if common.check_values_in_python(impl, cu_seqlens):
        _check_select_values(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out)
    return impl.fn(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out)


@_select_op.register_fake
def _(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out):
    _check_select(values, cu_seqlens, seq_idx, cu_seqlens_out, total_out)
    return values.new_empty((total_out, *values.shape[1:]))


def _select_setup(ctx, inputs, output):
    values, cu_seqlens, seq_idx, cu_seqlens_out, total_out = inputs
    ctx.save_for_backward(cu_seqlens, seq_idx, cu_seqlens_out)
    ctx.total = values.shape[0]
    ctx.total_out = total_out


def _select_backward(ctx, grad):
    cu_seqlens, seq_idx, cu_seqlens_out = ctx.saved_tensors
    rows = select_rows(cu_seqlens, seq_idx, cu_seqlens_out, ctx.total_out)
    grad_values = grad.new_zeros((ctx.total, *grad.shape[1:])).index_add(0, rows, grad)
    return grad_values, None, None, None, None


_select_op.register_autograd(_select_backward, setup_context=_select_setup)


def select_sequences(values: Tensor, cu_seqlens: Tensor, seq_idx: Tensor, cu_seqlens_out: Tensor, total_out: int) -> Tensor:
    """Gather whole sequences into a new packed batch.

    Args:
        values: ``[T, *F]``; cu_seqlens: int32 ``[B + 1]``.
        seq_idx: int64 ``[B']``, the input sequence of each output sequence
            (repeats allowed).
        cu_seqlens_out: int32 ``[B' + 1]``, offsets of the output sequences.
        total_out: ``T' = cu_seqlens_out[-1]`` as a host int.

    Returns:
        ``[T', *F]``. :meth:`adaptok.RaggedBatch.index_select` computes
        ``cu_seqlens_out`` and ``total_out`` for you.
    """
    common.check_tensors(values=values, cu_seqlens=cu_seqlens, seq_idx=seq_idx, cu_seqlens_out=cu_seqlens_out)
    return torch.ops.adaptok.select_sequences(values, cu_seqlens, seq_idx, cu_seqlens_out,
                                              common.host_int(total_out, "total_out"))
