"""ReViT's token-length-aware LayerNorm over packed ragged batches."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops import common
from ..ops.segment_layer_norm import segment_layer_norm
from ..ragged import RaggedBatch
from .layout_aware import LayoutAware


class TokenLengthLayerNorm(LayoutAware, nn.Module):
    """ReViT's token-length-aware LayerNorm: one LayerNorm (weight and bias)
    per token grid, each sequence of a packed batch normalized with its grid's.

    A batch that mixes 14x14, 10x10 and 7x7 images runs in one fused kernel
    (:func:`adaptok.ops.segment_layer_norm`), with the residual add of a
    pre-norm block optionally fused in front. It is :class:`LayoutAware`:
    as ``norm1``, ``norm2`` or the final ``norm`` of a patched timm ViT it is
    called with the packed tokens and their layout.

    Args:
        normalized_shape: C, the channels.
        grids: the grid sides the model runs, e.g. ``(14, 10, 7)``: a sequence
            tagged with ``grids[i]`` uses ``weight[i]`` and ``bias[i]``.
        eps, elementwise_affine, bias: as in ``nn.LayerNorm``.

    Parameters:
        weight, bias: ``[len(grids), C]``.

    Example::

        >>> norm = TokenLengthLayerNorm(384, grids=(14, 10, 7))
        >>> rb = RaggedBatch.from_list([torch.randn(50, 384), torch.randn(197, 384)], grid=[7, 14])
        >>> norm(rb).values.shape                 # rows 0-49 use weight[2], 50-246 weight[0]
        torch.Size([247, 384])
    """

    def __init__(self, normalized_shape: int, grids: Sequence[int] = (14, 10, 7), eps: float = 1e-6,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None):
        super().__init__()
        grids = [int(g) for g in grids]
        if not grids or len(set(grids)) != len(grids) or min(grids) < 1:
            raise ValueError(f"grids must be distinct positive grid sides, got {grids}")
        self.normalized_shape = int(normalized_shape)
        self.grids = tuple(grids)
        self.eps = eps
        shape = (len(grids), self.normalized_shape)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(shape, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape, **factory)) if elementwise_affine and bias else None
        # grid side -> row of weight/bias (-1: not one of the model's grids)
        table = torch.full((max(grids) + 1,), -1, dtype=torch.int32)
        table[torch.tensor(grids)] = torch.arange(len(grids), dtype=torch.int32)
        self.register_buffer("grid_to_group", table.to(device), persistent=False)

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, grids: Sequence[int] = (14, 10, 7)) -> "TokenLengthLayerNorm":
        """Every grid starts from ``norm``'s parameters (how ReViT initializes
        its per-length norms from a pretrained ViT)."""
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"norm must normalize one dim, got normalized_shape {norm.normalized_shape}")
        weight = norm.weight
        out = cls(norm.normalized_shape[0], grids, norm.eps, elementwise_affine=weight is not None,
                  bias=norm.bias is not None, device=weight.device if weight is not None else None,
                  dtype=weight.dtype if weight is not None else None)
        with torch.no_grad():
            if out.weight is not None:
                out.weight.copy_(weight.expand_as(out.weight))
            if out.bias is not None:
                out.bias.copy_(norm.bias.expand_as(out.bias))
        return out

    def groups(self, grid: Tensor) -> Tensor:
        """int32 ``[B]``: the weight row of each sequence's grid tag."""
        table = self.grid_to_group.to(grid.device)
        index = grid.long().clamp(0, table.shape[0] - 1)
        group = table[index]
        if common.check_values_now(grid) and not torch.compiler.is_compiling():
            bad = (group < 0) | (grid.long() != index)
            if bool(bad.any()):
                raise ValueError(f"grid tags must be one of this norm's grids {self.grids}, "
                                 f"got {grid[bad][0].item()}")
        return group

    def forward(self, x, layout: Optional[RaggedBatch] = None, residual: Optional[Tensor] = None):
        """Normalize every sequence with its grid's weight and bias.

        Called as ``norm(batch)`` with a :class:`RaggedBatch` (returns one),
        or as ``norm(values, layout)`` with packed ``values [T, C]`` laid out
        as ``layout`` (returns ``[T, C]``; how patched blocks call it). The
        layout must carry grid tags.

        With ``residual`` (``[T, C]``), normalizes ``h = values + residual``
        and returns ``(normalized, h)``.
        """
        if isinstance(x, RaggedBatch):
            if layout is not None:
                raise TypeError("layout must be None when x is a RaggedBatch (it is its own layout)")
            values, layout = x.values, x
        elif isinstance(x, Tensor) and isinstance(layout, RaggedBatch):
            values = x
            if values.shape[0] != layout.total_tokens:
                raise ValueError(f"x must have the layout's {layout.total_tokens} rows, got {values.shape[0]}")
        else:
            raise TypeError(f"x must be a RaggedBatch (with grid tags), or [T, C] values with their RaggedBatch "
                            f"layout; got {type(x).__name__} and {type(layout).__name__}")
        if layout.grid is None:
            raise ValueError("x must carry grid tags (RaggedBatch(..., grid=...)) to pick each sequence's norm")
        out = segment_layer_norm(values, layout.cu_seqlens, self.groups(layout.grid), self.weight, self.bias,
                                 self.eps, residual=residual)
        wrap = x.with_values if isinstance(x, RaggedBatch) else (lambda v: v)
        if residual is not None:
            y, h = out
            return wrap(y), h
        return wrap(out)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, grids={self.grids}, eps={self.eps}, "
                f"elementwise_affine={self.weight is not None}, bias={self.bias is not None}")
