"""Build CF-ViT's fine-stage sequences in one pass: pick each image's most
informative coarse patches, put their four fine patches in their place, and
keep the coarse input embedding of the others.

Each of B images has an ``h x w`` coarse patch grid (``Nc = h w`` patches)
and the ``2h x 2w`` fine grid of the same image (``Nf = 4 Nc``): coarse
patch ``i = (r, c)`` covers the fine patches ``(2r + dr, 2c + dc)``. With
``K = keep`` patches re-split per image, the op returns ``[B, n + Nc + 3K,
C]`` tokens, each image::

    [ prefix (n rows)
      for the K chosen coarse patches i, in ascending i, its 4 fine patches f
      (top left, top right, bottom left, bottom right):
          fine[b, f] + pos[f] + reuse[b, i]
      for the Nc - K others, in ascending i:
          coarse[b, i] ]

The chosen patches are the top K of ``score[b]`` (CF-ViT's global class
attention); NaN counts as -inf and ties go to the lower index, so exactly
K are chosen whatever the scores. ``source [B, Nc + 3K]`` (int64)
says where every row after the prefix came from: ``f`` for a fine patch,
``Nf + i`` for coarse patch i. The sum is formed in fp32 and rounded once to
the dtype; coarse and prefix rows are copied as they are. Only the shapes
set the layout, so nothing is read back from the device.

The op ``adaptok::fine_tokens`` is served by the backends of
:mod:`adaptok.backends`: ``cuda`` (``csrc/fine_tokens_cuda.cu``), ``triton``
(``kernels/fine_tokens.py``), ``cpu`` (``csrc/fine_tokens.cpp``) and
``torch`` (:func:`fine_tokens_reference`, its specification); the layout is
written out in ``csrc/fine_tokens.h``. It is differentiable with respect to
fine, coarse, pos, prefix and reuse (the choice itself is not); the backward
is a scatter and sums in plain PyTorch on every backend.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..backends import Op
from . import common

# The kernels hold one image's scores in on-chip memory (the CUDA kernel in
# shared memory, the Triton one in registers): up to this many coarse
# patches a batch on those backends; the cpu and torch backends have no limit.
MAX_KERNEL_PATCHES = 4096


# ----------------------------------------------------------------------- checks


def _check(fine: Tensor, coarse: Tensor, score: Tensor, keep: int, h: int, w: int, pos: Optional[Tensor],
           prefix: Optional[Tensor], reuse: Optional[Tensor]) -> None:
    """Metadata checks (no device sync), also run while tracing."""
    common.check_tensors(fine=fine, coarse=coarse, score=score)
    if coarse.dim() != 3 or min(coarse.shape) < 1:
        raise ValueError(f"coarse must have shape [B, Nc, C] with every size >= 1, got {tuple(coarse.shape)}")
    if not coarse.is_floating_point():
        raise TypeError(f"coarse must be floating point, got {coarse.dtype}")
    B, Nc, C = coarse.shape
    if h < 1 or w < 1 or h * w != Nc:
        raise ValueError(f"grid ({h}, {w}) must be the coarse grid of the Nc = {Nc} patches of coarse")
    if tuple(fine.shape) != (B, 4 * Nc, C):
        raise ValueError(f"fine must have shape [B, 4 Nc, C] = {[B, 4 * Nc, C]} (the 2h x 2w grid), got "
                         f"{tuple(fine.shape)}")
    if fine.dtype != coarse.dtype:
        raise TypeError(f"fine must have the dtype of coarse ({coarse.dtype}), got {fine.dtype}")
    common.check_same_device(fine, "fine", coarse, "coarse")
    if tuple(score.shape) != (B, Nc):
        raise ValueError(f"score must have shape [B, Nc] = {[B, Nc]}, got {tuple(score.shape)}")
    if not score.is_floating_point():
        raise TypeError(f"score must be floating point, got {score.dtype}")
    common.check_same_device(score, "score", coarse, "coarse")
    if not 0 <= keep <= Nc:
        raise ValueError(f"keep must be in [0, Nc] = [0, {Nc}], got {keep}")
    for name, t, shape in (("pos", pos, (4 * Nc, C)), ("reuse", reuse, (B, Nc, C))):
        if t is None:
            continue
        common.check_tensor(t, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
        if t.dtype != coarse.dtype:
            raise TypeError(f"{name} must have the dtype of coarse ({coarse.dtype}), got {t.dtype}")
        common.check_same_device(t, name, coarse, "coarse")
    if prefix is not None:
        common.check_tensor(prefix, "prefix")
        if prefix.dim() != 2 or prefix.shape[1] != C:
            raise ValueError(f"prefix must have shape [n, C] with C = {C}, got {tuple(prefix.shape)}")
        if prefix.dtype != coarse.dtype:
            raise TypeError(f"prefix must have the dtype of coarse ({coarse.dtype}), got {prefix.dtype}")
        common.check_same_device(prefix, "prefix", coarse, "coarse")


def output_shape(coarse: Tensor, keep: int, prefix: Optional[Tensor]) -> tuple:
    """``(B, n + Nc + 3 keep, C)``: the tokens the op returns."""
    B, Nc, C = coarse.shape
    return B, (0 if prefix is None else prefix.shape[0]) + Nc + 3 * keep, C


def children(index: Tensor, w: int) -> Tensor:
    """``[..., 4]`` fine indices (top left, top right, bottom left, bottom
    right) of the coarse patches ``index [...]`` of a grid ``w`` wide."""
    r, c = index // w, index % w
    top_left = 2 * r * (2 * w) + 2 * c
    return top_left[..., None] + torch.tensor([0, 1, 2 * w, 2 * w + 1], device=index.device)


def parents(index: Tensor, w: int) -> Tensor:
    """Coarse patch of the fine patches ``index`` of a ``2w``-wide fine grid."""
    return (index // (2 * w)) // 2 * w + (index % (2 * w)) // 2


def split_patches(source: Tensor, grid: tuple) -> Tensor:
    """``[B, Nc]`` bool: which coarse patches of an ``(h, w)`` grid were
    re-split, read from ``source``."""
    h, w = grid
    keep = (source.shape[1] - h * w) // 3
    out = torch.zeros(source.shape[0], h * w, dtype=torch.bool, device=source.device)
    return out.scatter_(1, parents(source[:, 0:4 * keep:4], w), True)


# ---------------------------------------------------------------------- backends


def _example(device, dtype, images=4, grid=7, channels=384, keep=25):
    Nc = grid * grid
    fine = torch.randn(images, channels, 4 * Nc, device=device).to(dtype).transpose(1, 2)
    coarse, reuse = torch.randn(2, images, Nc, channels, device=device).to(dtype).unbind(0)
    return (fine, coarse, torch.rand(images, Nc, device=device), keep, grid, grid,
            torch.randn(4 * Nc, channels, device=device).to(dtype), torch.randn(1, channels, device=device).to(dtype),
            reuse)


FINE_TOKENS = Op("fine_tokens", subject=lambda fine, coarse, *rest: coarse, example=_example)


@FINE_TOKENS.register("torch")
def fine_tokens_reference(fine: Tensor, coarse: Tensor, score: Tensor, keep: int, h: int, w: int,
                          pos: Optional[Tensor], prefix: Optional[Tensor], reuse: Optional[Tensor]):
    """Plain PyTorch: a stable descending sort of the scores picks the
    patches, then gathers and one fp32 sum.

    Returns:
        ``(tokens [B, n + Nc + 3 keep, C], source [B, Nc + 3 keep] int64)``.
    """
    B, Nc, C = coarse.shape
    key = torch.where(torch.isnan(score), -math.inf, score)  # NaN is -inf; infinities stay as they are
    chosen = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :keep]
    split = torch.zeros(B, Nc, dtype=torch.uint8, device=coarse.device).scatter_(1, chosen, 1)
    ranked = torch.sort(split, dim=1, descending=True, stable=True).indices  # chosen ascending, then the others
    parent, rest = ranked[:, :keep], ranked[:, keep:]
    fine_idx = children(parent, w).reshape(B, 4 * keep)
    compute = torch.promote_types(coarse.dtype, torch.float32)
    x = fine.gather(1, fine_idx[..., None].expand(-1, -1, C)).to(compute)
    if pos is not None:
        x = x + pos.to(compute)[fine_idx]
    if reuse is not None:
        x = x + reuse.gather(1, parent.repeat_interleave(4, dim=1)[..., None].expand(-1, -1, C)).to(compute)
    parts = [x.to(coarse.dtype), coarse.gather(1, rest[..., None].expand(-1, -1, C))]
    if prefix is not None:
        parts.insert(0, prefix[None].expand(B, -1, -1))
    return torch.cat(parts, dim=1), torch.cat([fine_idx, rest + 4 * Nc], dim=1)


def _outputs(coarse: Tensor, keep: int, prefix: Optional[Tensor]):
    B, L, C = output_shape(coarse, keep, prefix)
    return common.empty((B, L, C), coarse), common.empty((B, coarse.shape[1] + 3 * keep), coarse, torch.int64)


def _kernel_check(fine, coarse, score, *rest) -> Optional[str]:
    if score.dtype != torch.float32:
        return f"scores must be float32, got {score.dtype}"
    return None


def _on_chip_check(fine, coarse, score, *rest) -> Optional[str]:
    if coarse.shape[1] > MAX_KERNEL_PATCHES:
        return f"at most {MAX_KERNEL_PATCHES} coarse patches an image, got {coarse.shape[1]}"
    return _kernel_check(fine, coarse, score)


@FINE_TOKENS.register("cuda", dtypes=common.FLOATS, ext_op="ext_fine_tokens", check=_on_chip_check)
@FINE_TOKENS.register("cpu", dtypes=common.FLOATS, ext_op="ext_fine_tokens", check=_kernel_check)
def _fine_tokens_ext(fine, coarse, score, keep, h, w, pos, prefix, reuse):
    out, source = _outputs(coarse, keep, prefix)
    torch.ops.adaptok.ext_fine_tokens(fine, coarse, score, keep, h, w, pos, prefix, reuse, out, source)
    return out, source


@FINE_TOKENS.register("triton", dtypes=common.FLOATS, check=_on_chip_check)
def _fine_tokens_triton(fine, coarse, score, keep, h, w, pos, prefix, reuse):
    out, source = _outputs(coarse, keep, prefix)
    common.triton_kernels("fine_tokens").forward(fine, coarse, score, keep, w, pos, prefix, reuse, out, source)
    return out, source


# ------------------------------------------------------------------- custom op


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _last_dim_unit(t: Tensor) -> Tensor:
    """``t`` itself when its channels are contiguous, else a copy: the
    kernels read rows of channels (the model hands them channels-last patch
    embeddings, which need no copy)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _fine_tokens_body(fine: Tensor, coarse: Tensor, score: Tensor, keep: int, h: int, w: int,
                      pos: Optional[Tensor], prefix: Optional[Tensor], reuse: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check(fine, coarse, score, keep, h, w, pos, prefix, reuse)
    if score.dtype in (torch.float16, torch.bfloat16):
        score = score.float()  # exact: the order is the same
    return FINE_TOKENS(_last_dim_unit(fine), _last_dim_unit(coarse), score.contiguous(), keep, h, w,
                       _contiguous(pos), _contiguous(prefix), _last_dim_unit(reuse) if reuse is not None else None)


_fine_tokens_op = torch.library.custom_op("adaptok::fine_tokens", mutates_args=())(_fine_tokens_body)


@_fine_tokens_op.register_fake
def _(fine, coarse, score, keep, h, w, pos, prefix, reuse):
    _check(fine, coarse, score, keep, h, w, pos, prefix, reuse)
    B, L, C = output_shape(coarse, keep, prefix)
    return coarse.new_empty((B, L, C)), coarse.new_empty((B, coarse.shape[1] + 3 * keep), dtype=torch.int64)


def _setup(ctx, inputs, output):
    fine, coarse, score, keep, h, w, pos, prefix, reuse = inputs
    ctx.save_for_backward(output[1])
    ctx.w = w
    ctx.shape = tuple(coarse.shape)
    ctx.has = (pos is not None, prefix is not None, reuse is not None)
    ctx.prefix_rows = 0 if prefix is None else prefix.shape[0]
    ctx.dtypes = (fine.dtype, coarse.dtype)


def _backward(ctx, grad, _grad_source):
    """Every row after the prefix came from exactly one row of fine or of
    coarse (``source``): one scatter gives both gradients; pos's is the
    fine gradient summed over images, reuse's the fine gradient summed over
    each coarse patch's 4 children (zero where not re-split), prefix's its
    rows summed over images."""
    (source,) = ctx.saved_tensors
    B, Nc, C = ctx.shape
    n = ctx.prefix_rows
    has_pos, has_prefix, has_reuse = ctx.has
    rows = grad.new_zeros((B, 5 * Nc, C))
    rows.scatter_(1, source[..., None].expand(-1, -1, C), grad[:, n:])
    grad_fine, grad_coarse = rows[:, :4 * Nc], rows[:, 4 * Nc:]
    h = Nc // ctx.w
    grad_pos = grad_fine.sum(0) if has_pos else None
    grad_reuse = grad_fine.reshape(B, h, 2, ctx.w, 2, C).sum((2, 4)).reshape(B, Nc, C) if has_reuse else None
    grad_prefix = grad[:, :n].sum(0) if has_prefix else None
    return grad_fine, grad_coarse, None, None, None, None, grad_pos, grad_prefix, grad_reuse


_fine_tokens_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------ public


def _grid(grid, coarse: Tensor) -> tuple[int, int]:
    if grid is None:
        Nc = coarse.shape[1] if isinstance(coarse, Tensor) and coarse.dim() == 3 else 0
        side = math.isqrt(Nc)
        if side * side != Nc or Nc == 0:
            raise ValueError(f"grid must be given for Nc = {Nc} coarse patches (not a square)")
        return side, side
    if isinstance(grid, (tuple, list)):
        if len(grid) != 2:
            raise ValueError(f"grid must be an int or (h, w), got {grid!r}")
        return common.host_int(grid[0], "grid[0]", 1), common.host_int(grid[1], "grid[1]", 1)
    side = common.host_int(grid, "grid", 1)
    return side, side


def fine_tokens(fine: Tensor, coarse: Tensor, score: Tensor, keep: int, grid: Union[int, tuple, None] = None, *,
                pos: Optional[Tensor] = None, prefix: Optional[Tensor] = None,
                reuse: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """CF-ViT's fine-stage sequences of B images (see the module docstring).

    Args:
        fine: ``[B, 4 Nc, C]`` fine patch embeddings on the ``2h x 2w`` grid,
            without positions (any strides; channels-last convolution output
            is read in place).
        coarse: ``[B, Nc, C]`` coarse input embeddings (positions added).
        score: ``[B, Nc]`` the informativeness of each coarse patch (any
            float dtype).
        keep: K, the coarse patches re-split per image, in ``[0, Nc]``.
        grid: the coarse grid, an int or ``(h, w)`` (default: square).
        pos: ``[4 Nc, C]`` the fine position table (patch rows), or None.
        prefix: ``[n, C]`` the tokens in front (CLS with its fine position),
            or None.
        reuse: ``[B, Nc, C]`` added to the 4 fine patches of each re-split
            coarse patch (CF-ViT's feature reuse), or None.

    Returns:
        ``(tokens [B, n + Nc + 3K, C], source [B, Nc + 3K] int64)``.

    Example::

        >>> fine, coarse = torch.randn(2, 196, 384), torch.randn(2, 49, 384)
        >>> tokens, source = fine_tokens(fine, coarse, torch.rand(2, 49), 25, 7, prefix=torch.randn(1, 384))
        >>> tokens.shape                              # 1 + 100 fine + 24 coarse
        torch.Size([2, 125, 384])
    """
    common.check_tensors(fine=fine, coarse=coarse, score=score)
    h, w = _grid(grid, coarse)
    keep = common.host_int(keep, "keep")
    for name, t in (("pos", pos), ("prefix", prefix), ("reuse", reuse)):
        if t is not None:
            common.check_tensor(t, name)
    if not common.dispatcher_needed(fine, coarse, score, pos, prefix, reuse):
        return _fine_tokens_body(fine, coarse, score, keep, h, w, pos, prefix, reuse)
    return torch.ops.adaptok.fine_tokens(fine, coarse, score, keep, h, w, pos, prefix, reuse)
