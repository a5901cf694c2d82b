"""Pack the patch embeddings of groups of images into one ragged batch, adding
each group's position embeddings and placing each group's prefix tokens
(CLS, registers, a distillation token) in front of its sequences, in one
pass.

A ViT that runs every image on its own token grid embeds the images of each
grid together (one convolution per grid), then needs them as one packed
batch. Group g holds ``B_g`` images of ``P_g`` patch tokens each; the output
is the groups one after another, each image a sequence of ``n_g + P_g``
tokens (``n_g`` prefix tokens, the same for every group or not: ReViT's
shorter sequences carry a distillation token the teacher's lack)::

    out = [ prefix[0] ; patches[0][0] + pos[0] ]      image 0 of group 0
          [ prefix[0] ; patches[0][1] + pos[0] ]      image 1 of group 0
          ...
          [ prefix[1] ; patches[1][0] + pos[1] ]      image 0 of group 1
          ...

so the layout follows from the shapes alone (``cu_seqlens`` is the running
sum of ``n_g + P_g`` repeated ``B_g`` times) and nothing is read from the
device. ``patches[g]`` may be any strided view, e.g. the ``[B, C, h, w]``
output of the patch convolution seen as ``[B, P, C]`` (``flatten(2).
transpose(1, 2)``), which the kernels read without a copy. The sum is formed
in fp32 and rounded once to the dtype.

The op ``adaptok::pack_patches`` is served by the backends of
:mod:`adaptok.backends`: ``cuda`` (``csrc/pack_patches_cuda.cu``),
``triton`` (``kernels/pack_patches.py``), ``cpu`` (``csrc/pack_patches.cpp``)
and ``torch`` (:func:`pack_patches_reference`, its specification); the
layout is written out in ``csrc/pack_patches.h``. It is differentiable with
respect to patches, pos and prefix; the backward is views and sums in plain
PyTorch on every backend.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..backends import Op
from . import common

# ----------------------------------------------------------------------- checks


def _check(patches: Sequence[Tensor], pos: Sequence[Tensor], prefix: Sequence[Tensor]) -> None:
    """Metadata checks (no device sync), also run while tracing."""
    if len(patches) == 0:
        raise ValueError("patches must hold at least one group")
    for g, p in enumerate(patches):
        common.check_tensor(p, f"patches[{g}]")
        if p.dim() != 3 or p.shape[0] == 0 or p.shape[1] == 0 or p.shape[2] == 0:
            raise ValueError(f"patches[{g}] must have shape [B_g, P_g, C] with every size >= 1, got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"patches[{g}] must be floating point, got {p.dtype}")
        ref = patches[0]
        if p.shape[2] != ref.shape[2] or p.dtype != ref.dtype:
            raise ValueError(f"patches[{g}] ({p.shape[2]} channels, {p.dtype}) must match patches[0] "
                             f"({ref.shape[2]} channels, {ref.dtype})")
        common.check_same_device(p, f"patches[{g}]", ref, "patches[0]")
    C, dtype = patches[0].shape[2], patches[0].dtype
    if len(pos) not in (0, len(patches)):
        raise ValueError(f"pos must be empty or hold one table per group ({len(patches)}), got {len(pos)}")
    for g, t in enumerate(pos):
        common.check_tensor(t, f"pos[{g}]")
        if t.shape != (patches[g].shape[1], C):
            raise ValueError(f"pos[{g}] must have shape [P_g, C] = {[patches[g].shape[1], C]}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"pos[{g}] must have the dtype of patches ({dtype}), got {t.dtype}")
        common.check_same_device(t, f"pos[{g}]", patches[0], "patches[0]")
    if len(prefix) not in (0, len(patches)):
        raise ValueError(f"prefix must be empty or hold one table per group ({len(patches)}), got {len(prefix)}")
    for g, t in enumerate(prefix):
        common.check_tensor(t, f"prefix[{g}]")
        if t.dim() != 2 or t.shape[1] != C:
            raise ValueError(f"prefix[{g}] must have shape [n_g, C] with C = {C}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"prefix[{g}] must have the dtype of patches ({dtype}), got {t.dtype}")
        common.check_same_device(t, f"prefix[{g}]", patches[0], "patches[0]")


def _prefix_rows(prefix, groups: int) -> list[int]:
    """``n_g`` of every group, for ``prefix`` as :func:`pack_patches` takes it."""
    if prefix is None or len(prefix) == 0:
        return [0] * groups
    if isinstance(prefix, Tensor):
        return [prefix.shape[0]] * groups
    return [0 if t is None else t.shape[0] for t in prefix]


def output_rows(patches: Sequence[Tensor], prefix=None) -> int:
    """Rows of the packed output: ``sum_g B_g (n_g + P_g)``."""
    return sum(p.shape[0] * (n + p.shape[1]) for p, n in zip(patches, _prefix_rows(prefix, len(patches))))


def sequence_lengths(patches: Sequence[Tensor], prefix=None) -> list[int]:
    """The length of every output sequence, in output order (``prefix`` as
    :func:`pack_patches` takes it)."""
    return [n + p.shape[1] for p, n in zip(patches, _prefix_rows(prefix, len(patches))) for _ in range(p.shape[0])]


# ---------------------------------------------------------------------- backends


def _example(device, dtype, grids=(7, 14), images=(3, 2), channels=384):
    patches = [torch.randn(b, channels, g * g, device=device).to(dtype).transpose(1, 2) for g, b in zip(grids, images)]
    pos = [torch.randn(g * g, channels, device=device).to(dtype) for g in grids]
    return patches, pos, [torch.randn(1, channels, device=device).to(dtype)] * len(grids)


PACK_PATCHES = Op("pack_patches", subject=lambda patches, *rest: patches[0], example=_example)


@PACK_PATCHES.register("torch")
def pack_patches_reference(patches: Sequence[Tensor], pos: Sequence[Tensor], prefix: Sequence[Tensor]) -> Tensor:
    """Plain PyTorch: per group, ``cat([prefix[g], patches + pos])`` for
    every image, then the groups one after another.

    Returns:
        ``[sum_g B_g (n_g + P_g), C]`` in the patches' dtype.
    """
    compute = torch.promote_types(patches[0].dtype, torch.float32)
    out = []
    for g, p in enumerate(patches):
        x = p.to(compute) + pos[g].to(compute) if pos else p
        x = x.to(p.dtype)
        if prefix:
            x = torch.cat([prefix[g][None].expand(p.shape[0], -1, -1), x], dim=1)
        out.append(x.reshape(-1, p.shape[2]))
    return torch.cat(out)


def _output(patches, prefix):
    return common.empty((output_rows(patches, prefix), patches[0].shape[2]), patches[0])


@PACK_PATCHES.register("cuda", dtypes=common.FLOATS, ext_op="ext_pack_patches")
@PACK_PATCHES.register("cpu", dtypes=common.FLOATS, ext_op="ext_pack_patches")
def _pack_patches_ext(patches, pos, prefix):
    out = _output(patches, prefix)
    torch.ops.adaptok.ext_pack_patches(patches, pos, prefix, out)
    return out


@PACK_PATCHES.register("triton", dtypes=common.FLOATS)
def _pack_patches_triton(patches, pos, prefix):
    out = _output(patches, prefix)
    common.triton_kernels("pack_patches").forward(patches, pos, prefix, out)
    return out


# ------------------------------------------------------------------- custom op


def _pack_patches_body(patches: list[Tensor], pos: list[Tensor], prefix: list[Tensor]) -> Tensor:
    _check(patches, pos, prefix)
    args = (list(patches), [t.contiguous() for t in pos], [t.contiguous() for t in prefix])
    return PACK_PATCHES(*args)


_pack_patches_op = torch.library.custom_op("adaptok::pack_patches", mutates_args=())(_pack_patches_body)


@_pack_patches_op.register_fake
def _(patches, pos, prefix):
    _check(patches, pos, prefix)
    return patches[0].new_empty((output_rows(patches, prefix), patches[0].shape[2]))


def _setup(ctx, inputs, output):
    patches, pos, prefix = inputs
    ctx.shapes = [tuple(p.shape) for p in patches]
    ctx.dtype = patches[0].dtype
    ctx.has_pos = len(pos) > 0
    ctx.prefix_rows = [t.shape[0] for t in prefix]


def _backward(ctx, grad):
    """Every group's rows of ``grad`` are a contiguous ``[B_g, n_g + P_g, C]``
    block: its patch rows are the patches' gradient, their sum over images
    the position table's, and its prefix rows summed over its images the
    group's prefix's (autograd adds them up where groups share one prefix
    tensor). Views and reductions only: no sync, no atomics."""
    row = 0
    grad_patches, grad_pos, grad_prefix = [], [], []
    for g, (B, P, C) in enumerate(ctx.shapes):
        n = ctx.prefix_rows[g] if ctx.prefix_rows else 0
        block = grad[row:row + B * (n + P)].view(B, n + P, C)
        row += B * (n + P)
        grad_patches.append(block[:, n:])
        if ctx.has_pos:
            grad_pos.append(block[:, n:].sum(0))
        if ctx.prefix_rows:
            grad_prefix.append(block[:, :n].sum(0))
    return grad_patches, grad_pos, grad_prefix  # [] for an empty pos or prefix, matching its structure


_pack_patches_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------ public


def _prefix_list(prefix, patches: list[Tensor]) -> list[Tensor]:
    """``prefix`` as the op takes it: [] (none) or one ``[n_g, C]`` tensor
    per group (``[0, C]`` for a group without)."""
    if prefix is None or not patches:  # no group: the op's checks say so
        return []
    if isinstance(prefix, Tensor):  # one prefix for every group: checked (and named) as one
        C, ref = patches[0].shape[-1], patches[0]
        if prefix.dim() != 2 or prefix.shape[1] != C:
            raise ValueError(f"prefix must have shape [n, C] with C = {C}, got {tuple(prefix.shape)}")
        if prefix.dtype != ref.dtype:
            raise TypeError(f"prefix must have the dtype of patches ({ref.dtype}), got {prefix.dtype}")
        common.check_same_device(prefix, "prefix", ref, "patches[0]")
        return [prefix] * len(patches)
    if isinstance(prefix, (str, bytes)) or not isinstance(prefix, Sequence):
        raise TypeError(f"prefix must be None, a [n, C] tensor or one per group, got {type(prefix).__name__}")
    if len(prefix) != len(patches):
        raise ValueError(f"prefix must hold one entry per group ({len(patches)}), got {len(prefix)}")
    out = []
    for g, t in enumerate(prefix):
        if t is None:
            ref = patches[g] if isinstance(patches[g], Tensor) else patches[0]
            t = ref.new_empty((0, ref.shape[-1]))
        common.check_tensor(t, f"prefix[{g}]")
        out.append(t)
    return out


def pack_patches(patches: Sequence[Tensor], pos: Optional[Sequence[Tensor]] = None,
                 prefix: Union[Tensor, Sequence[Optional[Tensor]], None] = None) -> Tensor:
    """Pack groups of patch embeddings into one ragged batch, with position
    embeddings added and prefix tokens in front of every sequence.

    Args:
        patches: G tensors ``[B_g, P_g, C]`` (any strides, one dtype and
            device): group g holds B_g images of P_g patch tokens.
        pos: None, or G position tables ``[P_g, C]`` added to every image of
            their group.
        prefix: the tokens placed in front of every image (CLS, registers,
            distillation token, their position embedding already added):
            None, one ``[n, C]`` tensor for every group, or G entries
            ``[n_g, C]`` or None, one per group.

    Returns:
        ``[T, C]`` with ``T = sum_g B_g (n_g + P_g)``: group after group,
        image after image, each ``[prefix_g; patches + pos]``. Its
        ``cu_seqlens`` is the running sum of :func:`sequence_lengths`.

    Example::

        >>> conv7, conv14 = torch.randn(3, 384, 7, 7), torch.randn(2, 384, 14, 14)
        >>> patches = [c.flatten(2).transpose(1, 2) for c in (conv7, conv14)]   # [B, P, C] views
        >>> out = pack_patches(patches, [torch.randn(49, 384), torch.randn(196, 384)], torch.randn(1, 384))
        >>> out.shape                                   # 3 x (1 + 49) + 2 x (1 + 196) rows
        torch.Size([544, 384])
    """
    if isinstance(patches, Tensor):
        raise TypeError("patches must be a list of [B_g, P_g, C] tensors, one per group, got a tensor")
    if pos is not None and isinstance(pos, Tensor):
        raise TypeError("pos must be a list of [P_g, C] tensors, one per group, got a tensor")
    # Before the dispatcher, which would reject a non-tensor without naming it.
    for name, ts in (("patches", patches), ("pos", pos or [])):
        for g, t in enumerate(ts):
            common.check_tensor(t, f"{name}[{g}]")
    patches, pos = list(patches), list(pos or [])
    prefix = _prefix_list(prefix, patches)
    if not common.dispatcher_needed(*patches, *pos, *prefix):
        return _pack_patches_body(patches, pos, prefix)
    return torch.ops.adaptok.pack_patches(patches, pos, prefix)
