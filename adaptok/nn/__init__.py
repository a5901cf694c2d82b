"""``nn`` building blocks over packed :class:`adaptok.RaggedBatch` tokens
(none imports timm):

- :mod:`.layout_aware`: how blocks hand the batch layout to a module;
- :mod:`.norm`: :class:`TokenLengthLayerNorm`, ReViT's per-length LayerNorm;
- :mod:`.attention`: attention within each sequence, on the measured path;
- :mod:`.patch_embed`: timm's patch embedding, by convolution or matmul as
  measured;
- :mod:`.prune`: EViT's token selection.
"""
from . import attention, patch_embed
from .layout_aware import LayoutAware, apply, is_layout_aware, per_sequence
from .norm import TokenLengthLayerNorm

__all__ = ["LayoutAware", "TokenLengthLayerNorm", "apply", "is_layout_aware", "per_sequence"]
