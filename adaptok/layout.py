"""The per-image token plan: which token grid each image of a batch runs at,
how the images are grouped and packed, and the way back to input order.

:class:`TokenLayout` owns every one of those decisions; the patched timm
model, the baselines of ``adaptok-bench``, the model families and the tests
take them from it instead of re-deriving them::

    layout = TokenLayout.from_grid([7, 14, 14, 7], batch=4)
    layout.groups                   # ((14, (1, 2)), (7, (0, 3))): largest grid first
    images = layout.group_images(x, patch_size=(16, 16))    # [2, 3, 224, 224], [2, 3, 112, 112]
    batch = layout.pack(patches, tables)                    # one RaggedBatch, grid tags set
    logits = layout.restore(packed_logits)                  # rows back in input order

A group is the images of one grid, in input order; groups run largest grid
first (the teacher sequence of a multi-length model leads). Each group may
have its own prefix tokens and position table (``tables``), so sequences
with and without a distillation token pack in one batch.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.pack_patches import pack_patches, sequence_lengths
from .ragged import RaggedBatch

Grid = Union[int, Sequence[int], Tensor, None]

_GRID_KINDS = "an int, one int per image (a list, tuple or numpy array) or a 1-D integer tensor"


def host_grid(grid, batch: int) -> tuple:
    """``grid`` (an int, a sequence of ints, a numpy array or an integer
    tensor) as one host int >= 1 per image; otherwise a TypeError or
    ValueError naming ``grid``. A device tensor costs one sync."""
    if isinstance(grid, Tensor):
        if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool or grid.dim() > 1:
            raise TypeError(f"grid must be {_GRID_KINDS}, got a {grid.dtype} tensor of shape {tuple(grid.shape)}")
        grid = grid.tolist()  # sizes depend on it: one sync for a device tensor
    elif hasattr(grid, "dtype") and hasattr(grid, "tolist"):  # numpy arrays and scalars
        grid = grid.tolist()
    if isinstance(grid, bool):
        raise TypeError(f"grid must be {_GRID_KINDS}, got a bool")
    if isinstance(grid, int):
        grid = [grid] * batch
    elif isinstance(grid, (str, bytes, dict, set, frozenset)) or not isinstance(grid, Sequence):
        raise TypeError(f"grid must be {_GRID_KINDS}, got {type(grid).__name__} {grid!r}"[:200])
    grid = tuple(grid)
    if len(grid) != batch:
        raise ValueError(f"grid must have one entry per image ({batch}), got {len(grid)}")
    sides = []
    for i, g in enumerate(grid):
        try:
            side = operator.index(g)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            side = None
        if side is None or isinstance(g, bool) or side < 1:
            raise ValueError(f"grid must hold ints >= 1 (token grid sides), got {g!r} at index {i}")
        sides.append(side)
    return tuple(sides)


def resize_images(images: Tensor, size: Sequence[int]) -> Tensor:
    """``[B, C, H, W]`` images resized to ``size = (h, w)`` pixels, bilinear
    with antialiasing (what ``grid=`` does to an image of another size); the
    images themselves when they already have that size. PyTorch's CPU
    antialiased resize has no fp16/bf16 kernel: those resize in fp32 and are
    rounded back once."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    low = images.device.type == "cpu" and images.dtype in (torch.float16, torch.bfloat16)
    out = F.interpolate(images.float() if low else images, size=tuple(size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.to(images.dtype) if low else out


def take(x: Tensor, idx: Sequence[int]) -> Tensor:
    """``x[idx]`` for host indices: a view when they are a range, else a
    gather whose index is copied to the device without a sync."""
    if list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return x[idx[0]:idx[0] + len(idx)]
    return x[torch.tensor(idx).to(x.device, non_blocking=True)]


def mixed_grids(batch: int, fraction: float, small: int, large: int) -> list[int]:
    """A grid per image: a ``fraction`` of them ``small``, spread evenly
    through the batch (so that packing has to regroup them), the rest
    ``large``."""
    return [small if int((i + 1) * fraction) > int(i * fraction) else large for i in range(batch)]


class TokenLayout:
    """The token plan of one batch of images (host data only: building one
    reads nothing from a device).

    Attributes:
        grids: the grid of every image, in input order: a side ``g`` (a
            ``g x g`` grid) or, for a model's own rectangular grid, ``(gh, gw)``.
        groups: ``((grid, members), ...)`` in packed order: one group per
            distinct grid, largest first; ``members`` are input indices in
            input order.
        order: the input index of every packed sequence.
        tagged: whether packed batches carry each sequence's grid side as
            :attr:`RaggedBatch.grid` (square grids only).
    """

    __slots__ = ("grids", "groups", "order", "tagged", "_inverse")

    def __init__(self, grids: Sequence[Union[int, tuple]], tagged: bool = True):
        members: dict = {}
        for i, g in enumerate(grids):
            members.setdefault(g, []).append(i)
        self.grids = tuple(grids)
        self.groups = tuple((g, tuple(members[g])) for g in sorted(members, key=_area, reverse=True))
        self.order = tuple(i for _, idx in self.groups for i in idx)
        self.tagged = tagged and all(isinstance(g, int) for g in self.grids)
        self._inverse = None

    @classmethod
    def from_grid(cls, grid: Grid, batch: int) -> "TokenLayout":
        """The plan for ``grid=`` as the patched model takes it (an int for
        every image, or one per image; see :func:`host_grid`)."""
        return cls(host_grid(grid, batch))

    @classmethod
    def uniform(cls, batch: int, grid: Sequence[int], tagged: bool = True) -> "TokenLayout":
        """Every image at the model's own ``(gh, gw)`` grid: one group, input
        order (tagged with the side when ``tagged`` and the grid is square)."""
        gh, gw = grid
        return cls([gh if gh == gw else (gh, gw)] * batch, tagged)

    def __len__(self) -> int:
        return len(self.grids)

    def __repr__(self) -> str:
        return f"TokenLayout({', '.join(f'{_name(g)} x {len(idx)}' for g, idx in self.groups)})"

    # ---------------------------------------------------------------- order

    @property
    def in_input_order(self) -> bool:
        """Whether packed order is input order (nothing to restore)."""
        return all(i == j for i, j in enumerate(self.order))

    @property
    def inverse(self) -> tuple:
        """The packed position of every input image: ``order[inverse[i]] == i``."""
        if self._inverse is None:
            inverse = [0] * len(self.order)
            for k, i in enumerate(self.order):
                inverse[i] = k
            self._inverse = tuple(inverse)
        return self._inverse

    def restore(self, out):
        """Rows of ``out`` (a ``[B, ...]`` tensor, a tuple of them, or a
        :class:`RaggedBatch`) in packed order, back in input order."""
        if self.in_input_order:
            return out
        if isinstance(out, RaggedBatch):
            return out.index_select(self.inverse)
        if isinstance(out, tuple):
            return tuple(take(o, self.inverse) for o in out)
        return take(out, self.inverse)

    # ----------------------------------------------------------- embedding

    def group_images(self, images: Tensor, patch_size: Sequence[int]) -> list[Tensor]:
        """``images [B, C, H, W]`` split by group, each resized so that a
        ``patch_size`` patch embedding yields its grid (:func:`resize_images`)."""
        if images.dim() != 4 or images.shape[0] != len(self):
            raise ValueError(f"images must have shape [B, C, H, W] with B = {len(self)}, got {tuple(images.shape)}")
        ph, pw = patch_size
        out = []
        for g, idx in self.groups:
            gh, gw = grid_sides(g)
            out.append(resize_images(take(images, idx), (gh * ph, gw * pw)))
        return out

    def tags(self) -> Optional[tuple]:
        """Every packed sequence's grid side (host ints), or None when not
        :attr:`tagged`."""
        return tuple(g for g, idx in self.groups for _ in idx) if self.tagged else None

    def pack(self, patches: Sequence[Tensor], tables: Sequence[tuple]) -> RaggedBatch:
        """One packed batch of every group's sequences.

        Args:
            patches: per group, ``[B_g, P_g, C]`` patch embeddings (any
                strides) of its images, ``P_g`` its grid's token count.
            tables: per group, ``(prefix [n_g, C] or None, pos [P_g, C] or
                None)``: the group's prefix tokens (position embedding
                added) and patch position table.

        Every input is cast to the promotion of their dtypes before the sum
        (as timm's ``x + pos_embed`` promotes: under autocast the embedding
        is bf16 while the tables stay fp32, so the stream is fp32).

        Returns:
            :class:`RaggedBatch` ``[T, C]``, sequences in :attr:`order`,
            grid tags set when :attr:`tagged`.
        """
        if len(patches) != len(self.groups) or len(tables) != len(self.groups):
            raise ValueError(f"patches and tables must hold one entry per group ({len(self.groups)}), "
                             f"got {len(patches)} and {len(tables)}")
        for (g, idx), p in zip(self.groups, patches):
            gh, gw = grid_sides(g)
            if p.dim() != 3 or p.shape[0] != len(idx) or p.shape[1] != gh * gw:
                raise ValueError(f"patches of grid {_name(g)} must have shape [{len(idx)}, {gh * gw}, C], "
                                 f"got {tuple(p.shape)}")
        prefix = [t for t, _ in tables]
        pos = [t for _, t in tables]
        if any(t is None for t in pos) and not all(t is None for t in pos):
            raise ValueError("tables must give a position table for every group or for none")
        dtype = stream_dtype(*patches, *pos, *prefix)
        patches = [p.to(dtype) for p in patches]
        pos = None if pos[0] is None else [t.to(dtype) for t in pos]
        prefix = None if all(t is None for t in prefix) else [None if t is None else t.to(dtype) for t in prefix]
        values = pack_patches(patches, pos, prefix)
        lengths = sequence_lengths(patches, prefix)
        return RaggedBatch.from_lengths(values, lengths, self.tags())


def stream_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype of the token stream built from patch embeddings, position
    tables and prefix tokens (None entries skipped): their promotion, as
    timm's ``x + pos_embed`` promotes (under autocast the embedding is bf16
    while the tables stay fp32, so the stream is fp32)."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])


def grid_sides(grid) -> tuple:
    """``(gh, gw)`` of a grid given as a side or as a pair."""
    return (grid, grid) if isinstance(grid, int) else tuple(grid)


def _area(grid) -> tuple:
    gh, gw = grid_sides(grid)
    return gh * gw, gh, gw


def _name(grid) -> str:
    gh, gw = grid_sides(grid)
    return f"{gh}x{gw}"
