"""How a block hands the batch layout to the modules that need it.

A patched block runs its modules on packed ``[T, C]`` tokens. Most act on
each token alone (timm's LayerNorm, Linear, MLP) and are called as they are.
A module that needs to know which sequence a token belongs to declares it by
subclassing :class:`LayoutAware`; blocks then call it as
``module(values, layout)`` with the :class:`adaptok.RaggedBatch` the values
are laid out as, through :func:`apply`. :class:`adaptok.nn.TokenLengthLayerNorm`
is one (each sequence normalized with its grid's weights); timm's
``DropPath`` draws one factor per sample, so :func:`per_sequence` applies it
per sequence.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..ops import common
from ..ragged import RaggedBatch


class LayoutAware:
    """Mixin of modules whose ``forward(values [T, C], layout)`` needs the
    packed layout (``layout``: a :class:`RaggedBatch` over ``values``) and
    returns ``[T, C]``. Blocks never run such a module on a dense
    ``[B, N, C]`` view."""


def is_layout_aware(module: nn.Module) -> bool:
    return isinstance(module, LayoutAware)


def apply(module: nn.Module, values: Tensor, layout: RaggedBatch) -> Tensor:
    """``module`` on packed ``values [T, C]`` laid out as ``layout``."""
    return module(values, layout) if isinstance(module, LayoutAware) else module(values)


def per_sequence(module: nn.Module, y: Tensor, x: RaggedBatch) -> Tensor:
    """Apply a per-sample module (timm's ``DropPath``) to ``y [T, C]`` with
    one sample per sequence of ``x``."""
    if isinstance(module, LayoutAware):
        return module(y, x)
    if isinstance(module, nn.Identity) or not module.training:  # DropPath is the identity in eval mode
        return y
    if x.is_uniform:
        return module(y.view(x.batch_size, x.max_seqlen, -1)).view_as(y)
    # The module draws one factor per sample of a [B, 1] ones tensor.
    scale = module(y.new_ones(x.batch_size, 1))
    return y * scale[common.seq_ids(x.cu_seqlens, x.total_tokens)]
