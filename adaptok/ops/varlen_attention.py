"""Variable-length attention over packed sequences, with the class-attention
row as a side output.

B sequences of lengths ``N_b >= 1`` are packed along the token axis:
``q, k, v`` are ``[T, H, D]`` with ``T = sum(N_b)``, described by int32
``cu_seqlens [B + 1]`` (the layout of :class:`adaptok.RaggedBatch`). Every
sequence attends to itself only, without a causal mask.

Two ``torch.library`` custom ops:

- ``adaptok::varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, return_cls)
  -> (out [T, H, D], lse [H, T], cls [H, T] or [H, 0])``, where ``cls[h, j]``
  is the probability with which the first token of j's sequence (its CLS)
  attends to j in head h;
- ``adaptok::varlen_attention_backward`` (gradients of q, k, v through all
  three outputs),

served by the backends of :mod:`adaptok.backends`:

- forward: ``triton`` (``kernels/varlen_attention.py``), ``cpu`` and ``cuda``
  (``csrc/varlen_attention*.{cpp,cu}``, the CUDA kernel fp16/bf16 with head
  dims 32, 64 and 128), and ``torch``, the per-sequence PyTorch reference;
- backward: ``triton`` and ``torch``; the ``cuda`` backend runs the Triton
  kernel and the ``cpu`` backend the torch reference (``python -m
  adaptok.info`` says so).

:func:`varlen_attention` is the public entry point.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import Op, backend_unavailable
from . import common

def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of ``lse`` and ``cls``: fp32 (fp64 for fp64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def _example(device, dtype, lengths=(50, 197, 1), heads=6, head_dim=64):
    cu = common.cu_seqlens(lengths, device)
    q, k, v = torch.randn(3, sum(lengths), heads, head_dim, device=device).to(dtype).unbind(0)
    return q, k, v, cu, max(lengths), head_dim ** -0.5, True


# ------------------------------------------------------------------------ checks


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float) -> None:
    """Metadata checks (no device sync), also run while tracing."""
    common.check_tensors(q=q, k=k, v=v)
    if q.dim() != 3:
        raise ValueError(f"q must have shape [T, H, D], got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        common.check_same_device(t, name, q, "q")
    if not q.is_floating_point():
        raise TypeError(f"q, k and v must be floating point, got {q.dtype}")
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"q must have at least one token, head and channel, got shape {tuple(q.shape)}")
    common.check_cu_seqlens(cu_seqlens, q, "q")
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen must be >= 1, got {max_seqlen}")
    common.check_float32_scalar(scale, "scale")


def _check_values(q: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> None:
    """Checks that read ``cu_seqlens`` (CPU tensors, or ``ADAPTOK_DEBUG=1``)."""
    common.check_cu_seqlens_values(cu_seqlens, q.shape[0], total_name="q.shape[0]")
    common.check_max_len(cu_seqlens, max_seqlen, "max_seqlen")


def _triton_check(q, *args) -> Optional[str]:
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # Measured: outputs ~1e9 off; fp16 and fp32 are exact there.
        return "bf16 is wrong in the Triton interpreter (its bf16 tl.dot); bf16 runs compiled on a GPU"
    limit = common.triton_kernels("varlen_attention").MAX_HEAD_DIM
    if q.shape[-1] > limit:
        return f"head dim up to {limit}, got {q.shape[-1]}"
    return None


CUDA_HEAD_DIMS = (32, 64, 128)


def _cuda_check(q, *args) -> Optional[str]:
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"head dims {', '.join(map(str, CUDA_HEAD_DIMS))}, got {q.shape[-1]}"
    if q.shape[1] > 65535:
        return f"up to 65535 heads, got {q.shape[1]}"
    return None


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ----------------------------------------------------------------------- forward

# On CUDA tensors the Triton kernel comes first until GPU measurements
# (per shape) decide between it and the CUDA kernel.
VARLEN_ATTENTION = Op("varlen_attention", subject=lambda q, *rest: q, example=_example,
                      preference={"cuda": ("triton", "cuda", "torch")})


def _outputs(q: Tensor, return_cls: bool):
    """Uninitialized (poisoned in tests) ``out [T, H, D]``, fp32 ``lse [H, T]``
    and fp32 ``cls [H, T]`` (``[H, 0]`` unless ``return_cls``)."""
    T, H, D = q.shape
    return (common.empty((T, H, D), q), common.empty((H, T), q, torch.float32),
            common.empty((H, T if return_cls else 0), q, torch.float32))


@VARLEN_ATTENTION.register("torch")
def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
                               return_cls: bool, compute_dtype: Optional[torch.dtype] = None):
    """Plain PyTorch, one sequence at a time (reads ``cu_seqlens`` on the host).

    Computes in ``compute_dtype`` (default: fp32, or fp64 for fp64 inputs).

    Returns:
        ``out [T, H, D]`` (q's dtype), ``lse [H, T]`` and ``cls [H, T]``
        (``[H, 0]`` unless ``return_cls``), both fp32 (fp64 for fp64 inputs).
    """
    compute = compute_dtype or _stat_dtype(q.dtype)
    T, H, D = q.shape
    stat = _stat_dtype(q.dtype)
    out = q.new_empty((T, H, D))
    lse = q.new_empty((H, T), dtype=stat)
    cls = q.new_empty((H, T if return_cls else 0), dtype=stat)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qb, kb, vb = (x[s:e].transpose(0, 1).to(compute) for x in (q, k, v))  # [H, N, D]
        scores = (qb @ kb.transpose(1, 2)) * scale  # [H, N, N]
        lse_b = scores.logsumexp(-1)  # [H, N]
        p = (scores - lse_b[..., None]).exp()
        out[s:e] = (p @ vb).transpose(0, 1).to(q.dtype)
        lse[:, s:e] = lse_b.to(stat)
        if return_cls:
            cls[:, s:e] = p[:, 0].to(stat)
    return out, lse, cls


@VARLEN_ATTENTION.register("triton", dtypes=common.FLOATS, check=_triton_check)
def _forward_triton(q, k, v, cu_seqlens, max_seqlen, scale, return_cls):
    out, lse, cls = _outputs(q, return_cls)
    common.triton_kernels("varlen_attention").forward(q, k, v, cu_seqlens, max_seqlen, scale, out, lse, cls if return_cls else None)
    return out, lse, cls


@VARLEN_ATTENTION.register("cuda", dtypes=(torch.float16, torch.bfloat16), ext_op="ext_varlen_attention",
                           check=_cuda_check)
@VARLEN_ATTENTION.register("cpu", dtypes=common.FLOATS, ext_op="ext_varlen_attention")
def _forward_ext(q, k, v, cu_seqlens, max_seqlen, scale, return_cls):
    out, lse, cls = _outputs(q, return_cls)
    torch.ops.adaptok.ext_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, out, lse, cls)
    return out, lse, cls


@torch.library.custom_op("adaptok::varlen_attention", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
                return_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check(q, k, v, cu_seqlens, max_seqlen, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()
    impl = VARLEN_ATTENTION.select(q, k, v, cu_seqlens, max_seqlen, scale, return_cls)
    if common.check_values_in_python(impl, cu_seqlens):
        _check_values(q, cu_seqlens, max_seqlen)
    return impl.fn(q, k, v, cu_seqlens, max_seqlen, scale, return_cls)


@_forward_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, return_cls):
    _check(q, k, v, cu_seqlens, max_seqlen, scale)
    T, H, D = q.shape
    stat = _stat_dtype(q.dtype)
    return (q.new_empty((T, H, D)), q.new_empty((H, T), dtype=stat),
            q.new_empty((H, T if return_cls else 0), dtype=stat))


def _forward_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, return_cls = inputs
    out, lse, cls = output
    ctx.save_for_backward(q, k, v, out, lse, cls, cu_seqlens)
    ctx.max_seqlen, ctx.scale, ctx.return_cls = max_seqlen, scale, return_cls


def _forward_backward(ctx, dout, dlse, dcls):
    q, k, v, out, lse, cls, cu_seqlens = ctx.saved_tensors
    grads = torch.ops.adaptok.varlen_attention_backward(
        dout, dlse, dcls if ctx.return_cls else None, q, k, v, out, lse, cls, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return (*grads, None, None, None, None)


_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)


# ---------------------------------------------------------------------- backward


def _backward_subject(dout, dlse, dcls, q, *rest):
    return q


VARLEN_ATTENTION_BACKWARD = Op(
    "varlen_attention_backward", subject=_backward_subject,
    example=lambda device, dtype: _backward_example(*_example(device, dtype)),
)


def _backward_example(q, k, v, cu_seqlens, max_seqlen, scale, return_cls):
    T, H, _ = q.shape
    stat = torch.zeros(H, T, device=q.device)
    return torch.zeros_like(q), stat, stat, q, k, v, q, stat, stat, cu_seqlens, max_seqlen, scale


@VARLEN_ATTENTION_BACKWARD.register("cpu", note="the torch reference (there is no CPU backward kernel)")
@VARLEN_ATTENTION_BACKWARD.register("torch")
def varlen_attention_backward_reference(dout, dlse, dcls, q, k, v, out, lse, cls, cu_seqlens, max_seqlen, scale,
                                        compute_dtype: Optional[torch.dtype] = None):
    """Plain PyTorch gradients, one sequence at a time, recomputing the
    probabilities (``out``, ``lse`` and ``cls`` are unused)::

        dP = dO V^T   (+ dcls on the CLS row)
        dS = P * (dP - rowsum(P * dP) + dlse)
        dQ = scale dS K,   dK = scale dS^T Q,   dV = P^T dO

    Returns ``dq, dk, dv`` ``[T, H, D]`` in q's dtype.
    """
    compute = compute_dtype or _stat_dtype(q.dtype)
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)]
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qb, kb, vb, gb = (x[s:e].transpose(0, 1).to(compute) for x in (q, k, v, dout))  # [H, N, D]
        p = ((qb @ kb.transpose(1, 2)) * scale).softmax(-1)  # [H, N, N]
        dp = gb @ vb.transpose(1, 2)
        if dcls is not None:
            dp[:, 0] += dcls[:, s:e].to(compute)
        delta = (p * dp).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse[:, s:e, None].to(compute)
        ds = p * (dp - delta)
        for grad, g in zip(grads, (ds @ kb * scale, ds.transpose(1, 2) @ qb * scale, p.transpose(1, 2) @ gb)):
            grad[s:e] = g.transpose(0, 1).to(q.dtype)
    return tuple(grads)


def _triton_backward_check(dout, dlse, dcls, q, *rest) -> Optional[str]:
    return backend_unavailable("triton") or _triton_check(q)


@VARLEN_ATTENTION_BACKWARD.register("cuda", dtypes=common.FLOATS, check=_triton_backward_check,
                                    note="the Triton kernel (there is no CUDA backward kernel)")
@VARLEN_ATTENTION_BACKWARD.register("triton", dtypes=common.FLOATS, check=_triton_backward_check)
def _backward_triton(dout, dlse, dcls, q, k, v, out, lse, cls, cu_seqlens, max_seqlen, scale):
    T, H, D = q.shape
    dq, dk, dv = (common.empty((T, H, D), q) for _ in range(3))
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    stat = lambda g: None if g is None else g.to(torch.float32).contiguous()  # noqa: E731
    common.triton_kernels("varlen_attention").backward(_last_dim_contiguous(dout), q, k, v, out, lse, cls, stat(dlse), stat(dcls), cu_seqlens,
                       scale, dq, dk, dv, delta)
    return dq, dk, dv


def _check_backward(dout, dlse, dcls, q, k, v, out, lse, cls, cu_seqlens, max_seqlen, scale):
    _check(q, k, v, cu_seqlens, max_seqlen, scale)
    T, H, D = q.shape
    common.check_tensors(dout=dout, out=out, lse=lse, cls=cls)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout and out must have the shape of q {tuple(q.shape)}, got {tuple(dout.shape)} and {tuple(out.shape)}")
    if lse.shape != (H, T):
        raise ValueError(f"lse must have shape [H, T] = {(H, T)}, got {tuple(lse.shape)}")
    if dlse is not None and dlse.shape != (H, T):
        raise ValueError(f"dlse must have shape [H, T] = {(H, T)}, got {tuple(dlse.shape)}")
    if dcls is not None and (dcls.shape != (H, T) or cls.shape != (H, T)):
        raise ValueError(f"dcls and cls must have shape [H, T] = {(H, T)}, got {tuple(dcls.shape)} and {tuple(cls.shape)}")


@torch.library.custom_op("adaptok::varlen_attention_backward", mutates_args=())
def _backward_op(dout: Tensor, dlse: Optional[Tensor], dcls: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                 out: Tensor, lse: Tensor, cls: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_backward(dout, dlse, dcls, q, k, v, out, lse, cls, cu_seqlens, max_seqlen, scale)
    q, k, v, out = (_last_dim_contiguous(t) for t in (q, k, v, out))
    args = (dout, dlse, dcls, q, k, v, out, lse.contiguous(), cls.contiguous(), cu_seqlens.contiguous(),
            max_seqlen, scale)
    return VARLEN_ATTENTION_BACKWARD(*args)


@_backward_op.register_fake
def _(dout, dlse, dcls, q, k, v, out, lse, cls, cu_seqlens, max_seqlen, scale):
    _check_backward(dout, dlse, dcls, q, k, v, out, lse, cls, cu_seqlens, max_seqlen, scale)
    return tuple(q.new_empty(q.shape) for _ in range(3))


# ------------------------------------------------------------------------ public


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
                     scale: Optional[float] = None, return_lse: bool = False, return_cls_attn: bool = False):
    """Attention within each of B packed sequences (no padding, no N x N matrix).

    Args:
        q, k, v: ``[T, H, D]`` fp16, bf16 or fp32 (any dtype on the ``torch``
            backend), on one device. Token and head strides are free, so the
            views ``qkv.unbind(1)`` of a ``[T, 3, H, D]`` projection are read
            without a copy.
        cu_seqlens: int32 ``[B + 1]``: sequence b is tokens
            ``cu_seqlens[b]:cu_seqlens[b + 1]``, each at least one token.
        max_seqlen: the longest sequence, as a host int (no device sync).
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return ``lse``, fp32 ``[H, T]``: the natural-log
            sum of exponentiated scores of every query row.
        return_cls_attn: also return ``cls_attn``, fp32 ``[T]``: for every
            token j, the attention probability from the first token (CLS) of
            j's sequence to j, averaged over heads (EViT's token score). It
            is differentiable.

    Returns:
        ``out [T, H, D]`` in q's dtype, or the tuple ``(out, [lse],
        [cls_attn])`` when either flag is set.

    Example::

        >>> qkv = torch.randn(247, 3, 6, 64)          # a 50- and a 197-token image
        >>> cu = torch.tensor([0, 50, 247], dtype=torch.int32)
        >>> out, cls_attn = varlen_attention(*qkv.unbind(1), cu, 197, return_cls_attn=True)
        >>> out.shape, cls_attn.shape
        (torch.Size([247, 6, 64]), torch.Size([247]))
    """
    common.check_tensors(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if q.dim() != 3:
        raise ValueError(f"q must have shape [T, H, D], got {tuple(q.shape)}")
    if isinstance(max_seqlen, torch.Tensor) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"max_seqlen must be a host int (reading it from a tensor would sync), got {type(max_seqlen).__name__}")
    max_seqlen = common.host_int(max_seqlen, "max_seqlen", 1)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0  # a head dim of 0 is refused by the op
    else:
        scale = common.host_float(scale, "scale")
    out, lse, cls = torch.ops.adaptok.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, return_cls_attn)
    extra = ([lse] if return_lse else []) + ([cls.mean(0)] if return_cls_attn else [])
    return (out, *extra) if extra else out
