"""Segment layer norm: LayerNorm over the channels of every token of a packed
batch, with the weight and bias of its sequence's group, and an optional
residual add fused in front (``h = x + residual``; ``y = LayerNorm(h)``).

This is the kernel of ReViT's token-length-aware LayerNorm
(:class:`adaptok.nn.TokenLengthLayerNorm`): one affine pair per token grid
(14x14, 10x10, 7x7), chosen per sequence, for a batch that mixes grids.
Statistics are fp32 whatever the dtype. The semantics are written out in
``csrc/segment_layer_norm.h``.

The op ``adaptok::segment_layer_norm`` is served by the backends of
:mod:`adaptok.backends`: ``cuda`` (``csrc/segment_layer_norm_cuda.cu``),
``triton`` (``kernels/segment_layer_norm.py``), ``cpu``
(``csrc/segment_layer_norm.cpp``) and ``torch``
(:func:`segment_layer_norm_reference`). The backward is plain PyTorch (no
sync) on every backend. Group ids come from the device unchecked on a GPU
(checking would sync): the kernels clamp them; on the CPU they are checked.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backends import Op
from . import common

# ----------------------------------------------------------------------- checks


def _check(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
           cu_seqlens: Tensor, group: Tensor, eps: float) -> None:
    """Metadata checks (no device sync), also run while tracing."""
    common.check_tensors(x=x, cu_seqlens=cu_seqlens, group=group)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have shape [T, C] with T, C >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    common.check_cu_seqlens(cu_seqlens, x, "x")
    batch = cu_seqlens.shape[0] - 1
    if group.dtype != torch.int32 or group.shape != (batch,):
        raise ValueError(f"group must be int32 of shape [B] = [{batch}], got {group.dtype} of shape {tuple(group.shape)}")
    common.check_same_device(group, "group", x, "x")
    if residual is not None:
        common.check_tensor(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, {residual.dtype}")
        common.check_same_device(residual, "residual", x, "x")
    groups = None
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        common.check_tensor(p, name)
        if p.dim() != 2 or p.shape[1] != x.shape[1] or p.shape[0] < 1:
            raise ValueError(f"{name} must have shape [G, C] with C = {x.shape[1]}, got {tuple(p.shape)}")
        if p.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {p.dtype}")
        common.check_same_device(p, name, x, "x")
        if groups is not None and p.shape[0] != groups:
            raise ValueError(f"weight and bias must have the same number of groups, got {groups} and {p.shape[0]}")
        groups = p.shape[0]
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def _groups(weight, bias) -> int:
    p = weight if weight is not None else bias
    return p.shape[0] if p is not None else 1


def _check_values(x, cu_seqlens, group, weight, bias) -> None:
    """Checks that read device values (CPU tensors, or ``ADAPTOK_DEBUG=1``)."""
    common.check_cu_seqlens_values(cu_seqlens, x.shape[0], total_name="x.shape[0]")
    if weight is not None or bias is not None:
        groups = _groups(weight, bias)
        for b, g in enumerate(group.tolist()):
            if not 0 <= g < groups:
                raise ValueError(f"group[{b}] = {g} must lie in [0, G - 1 = {groups - 1}]")


# ---------------------------------------------------------------------- backends


def _example(device, dtype, lengths=(50, 197, 101), channels=384, groups=3):
    x = torch.randn(sum(lengths), channels, device=device).to(dtype)
    cu = common.cu_seqlens(lengths, device)
    group = torch.arange(len(lengths), dtype=torch.int32, device=device) % groups
    weight = torch.ones(groups, channels, device=device, dtype=dtype)
    return x, x, weight, torch.zeros_like(weight), cu, group, 1e-6


SEGMENT_LAYER_NORM = Op("segment_layer_norm", subject=lambda x, *rest: x, example=_example)


def _outputs(x: Tensor, residual: Optional[Tensor]):
    T, C = x.shape
    return (common.empty((T, C), x), common.empty((T if residual is not None else 0, C), x),
            common.empty((T,), x, torch.float32), common.empty((T,), x, torch.float32))


@SEGMENT_LAYER_NORM.register("torch")
def segment_layer_norm_reference(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                                 bias: Optional[Tensor], cu_seqlens: Tensor, group: Tensor, eps: float):
    """Plain PyTorch in fp32 (fp64 for fp64 inputs): two-pass statistics,
    then each sequence's weight and bias rows (reads offsets and groups on
    the host). A row whose variance overflows the compute dtype is NaN, as
    in every kernel (``F.layer_norm`` returns 0 there: finite and wrong).

    Returns:
        ``y [T, C]``, ``h [T, C]`` (``[0, C]`` without a residual), and fp32
        ``mean [T]``, ``rstd [T]``.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute) + residual.to(compute) if residual is not None else x.to(compute)
    mean = h.mean(1)
    d = h - mean[:, None]
    var = (d * d).mean(1)
    rstd = torch.where(var.isinf(), float("nan"), torch.rsqrt(var + eps))
    y = d * rstd[:, None]
    if weight is not None or bias is not None:
        rows = group.long()[common.seq_ids(cu_seqlens, x.shape[0])]
        if weight is not None:
            y = y * weight.to(compute)[rows]
        if bias is not None:
            y = y + bias.to(compute)[rows]
    h_out = h.to(x.dtype) if residual is not None else x.new_empty((0, x.shape[1]))
    return y.to(x.dtype), h_out, mean, rstd


@SEGMENT_LAYER_NORM.register("cuda", dtypes=common.FLOATS, ext_op="ext_segment_layer_norm")
@SEGMENT_LAYER_NORM.register("cpu", dtypes=common.FLOATS, ext_op="ext_segment_layer_norm")
def _segment_layer_norm_ext(x, residual, weight, bias, cu_seqlens, group, eps):
    y, h, mean, rstd = _outputs(x, residual)
    torch.ops.adaptok.ext_segment_layer_norm(x, residual, weight, bias, cu_seqlens, group, eps, y,
                                             h if residual is not None else None, mean, rstd)
    return y, h, mean, rstd


@SEGMENT_LAYER_NORM.register("triton", dtypes=common.FLOATS)
def _segment_layer_norm_triton(x, residual, weight, bias, cu_seqlens, group, eps):
    y, h, mean, rstd = _outputs(x, residual)
    common.triton_kernels("segment_layer_norm").forward(x, residual, weight, bias, cu_seqlens, group, eps, y, h if residual is not None else None,
                      mean, rstd)
    return y, h, mean, rstd


# ------------------------------------------------------------------- custom op


def _unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("adaptok::segment_layer_norm", mutates_args=())
def _segment_layer_norm_op(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                           cu_seqlens: Tensor, group: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check(x, residual, weight, bias, cu_seqlens, group, eps)
    args = (_unit_stride(x), _unit_stride(residual), None if weight is None else weight.contiguous(),
            None if bias is None else bias.contiguous(), cu_seqlens.contiguous(), group.contiguous(), eps)
    impl = SEGMENT_LAYER_NORM.select(*args)
    if common.check_values_in_python(impl, cu_seqlens):
        _check_values(x, cu_seqlens, group, weight, bias)
    return impl.fn(*args)


@_segment_layer_norm_op.register_fake
def _(x, residual, weight, bias, cu_seqlens, group, eps):
    _check(x, residual, weight, bias, cu_seqlens, group, eps)
    T, C = x.shape
    stat = torch.promote_types(x.dtype, torch.float32)
    return (x.new_empty((T, C)), x.new_empty((T if residual is not None else 0, C)),
            x.new_empty((T,), dtype=stat), x.new_empty((T,), dtype=stat))


def _setup(ctx, inputs, output):
    x, residual, weight, bias, cu_seqlens, group, _ = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, bias, cu_seqlens, group, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
    """``dh = rstd (w dy - mean(w dy) - xhat mean(w dy xhat))``; the weight
    and bias rows of each group sum ``dy xhat`` and ``dy`` over its tokens.
    No device sync."""
    h, weight, bias, cu_seqlens, group, mean, rstd = ctx.saved_tensors
    T, C = h.shape
    compute = torch.promote_types(h.dtype, torch.float32)
    ids = group.long()[common.seq_ids(cu_seqlens, T)]
    xhat = (h.to(compute) - mean[:, None]) * rstd[:, None]
    dy = grad_y.to(compute)
    grad_weight = grad_bias = None
    if weight is not None:
        ids = ids.clamp(0, weight.shape[0] - 1)
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=h.device).index_add_(0, ids, dy * xhat)
        dy_w = dy * weight.to(compute)[ids]
    else:
        dy_w = dy
    if bias is not None:
        ids = ids.clamp(0, bias.shape[0] - 1)
        grad_bias = torch.zeros(bias.shape, dtype=compute, device=h.device).index_add_(0, ids, dy)
    dh = (dy_w - dy_w.mean(1, keepdim=True) - xhat * (dy_w * xhat).mean(1, keepdim=True)) * rstd[:, None]
    if ctx.has_residual and grad_h is not None and grad_h.numel():
        dh = dh + grad_h.to(compute)
    dh = dh.to(h.dtype)
    return (dh, dh if ctx.has_residual else None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


_segment_layer_norm_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------ public


def segment_layer_norm(x: Tensor, cu_seqlens: Tensor, group: Tensor, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, eps: float = 1e-5, residual: Optional[Tensor] = None):
    """LayerNorm of every token of a packed batch with its sequence's affine
    parameters, optionally after a fused residual add.

    Args:
        x: ``[T, C]`` packed tokens.
        cu_seqlens: int32 ``[B + 1]``.
        group: int32 ``[B]``: the row of ``weight`` and ``bias`` each
            sequence uses, in ``[0, G)``.
        weight, bias: ``[G, C]`` in x's dtype, or None (1 and 0).
        eps: added to the variance.
        residual: ``[T, C]`` or None: normalize ``h = x + residual`` and
            also return ``h`` (the pre-norm block's residual stream).

    Returns:
        ``y [T, C]``, or ``(y, h)`` with a residual.

    Example::

        >>> x = torch.randn(247, 384)                      # a 7x7 and a 14x14 image
        >>> cu = torch.tensor([0, 50, 247], dtype=torch.int32)
        >>> w, b = torch.ones(2, 384), torch.zeros(2, 384)  # one pair per grid
        >>> segment_layer_norm(x, cu, torch.tensor([1, 0], dtype=torch.int32), w, b).shape
        torch.Size([247, 384])
    """
    common.check_tensors(x=x, cu_seqlens=cu_seqlens, group=group)
    eps = common.host_float(eps, "eps")
    y, h, _, _ = torch.ops.adaptok.segment_layer_norm(x, residual, weight, bias, cu_seqlens, group, eps)
    return (y, h) if residual is not None else y
