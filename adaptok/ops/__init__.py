"""adaptok ops. Each is a ``torch.library`` custom op (``torch.ops.adaptok.*``)
served by the backends of :mod:`adaptok.backends`; the ``*_reference``
functions are their plain PyTorch specifications."""
from .fine_tokens import fine_tokens
from .pack_patches import pack_patches
from .ragged import cls_tokens, pack, select_sequences, unpack
from .segment_layer_norm import segment_layer_norm
from .topk_select import topk_select
from .varlen_attention import varlen_attention

__all__ = ["cls_tokens", "fine_tokens", "pack", "pack_patches", "segment_layer_norm", "select_sequences", "topk_select", "unpack", "varlen_attention"]
