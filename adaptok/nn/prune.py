"""EViT's token selection on packed batches: how many tokens each sequence
keeps, and the selection by class attention with the rest fused into one
token (:func:`adaptok.topk_select` does the work)."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from ..ops import common
from ..ops.topk_select import output_lengths
from ..ragged import RaggedBatch


def keep_counts(lengths: Sequence[int], keep_rate: float, num_prefix: int = 1) -> list[int]:
    """Tokens each sequence keeps after the CLS token: its other prefix tokens
    plus ``ceil(keep_rate * (N - num_prefix))`` patch tokens (EViT's
    ``ceil(keep_rate * (N - 1))`` for a model with only a CLS token)."""
    return [num_prefix - 1 + math.ceil(keep_rate * (n - num_prefix)) for n in lengths]


def pruned_length(n: int, keep_rate: float, num_prefix: int = 1, fuse: bool = True) -> int:
    """The length a sequence of ``n`` tokens leaves a pruning block with."""
    return output_lengths([n], keep_counts([n], keep_rate, num_prefix), fuse)[0]


def evit_select(x: RaggedBatch, cls_attn: Tensor, keep_rate: float, num_prefix: int = 1,
                fuse: bool = True) -> RaggedBatch:
    """Keep the CLS token, the other ``num_prefix - 1`` prefix tokens (in
    order) and each sequence's :func:`keep_counts` most attended patch
    tokens; with ``fuse``, append the dropped ones' class-attention-weighted
    sum as one token.

    Args:
        x: the batch, ``[T, C]`` values.
        cls_attn: ``[T]``, the class attention of every token.
    """
    if num_prefix > 1:  # rank the other prefix tokens first: they are always kept, in order
        pos = common.positions(x.cu_seqlens, common.seq_ids(x.cu_seqlens, x.total_tokens))
        cls_attn = cls_attn.masked_fill((pos >= 1) & (pos < num_prefix), float("inf"))
    out, _ = x.topk_select(cls_attn, keep=keep_counts(x.lengths, keep_rate, num_prefix), fuse=fuse)
    return out
