"""The cost model: multiply-accumulates a ViT spends on one image, counted
for the tokens that actually run (the papers' "FLOPs" of a ViT are these
MACs; DeiT-S: 4.6 G)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .nn.prune import pruned_length


def macs(model: nn.Module, grid: Optional[int] = None) -> int:
    """Multiply-accumulates of one image through a timm ViT, patched or not,
    at a ``grid`` x ``grid`` token grid (default: the model's), with the
    token counts its keep rate leaves: the patch embedding, every block's
    linear layers and attention (``2 N^2`` per attention channel), and the
    linear layers outside the blocks once (the head; without what the model
    says does not run at that grid, ``idle_modules``)."""
    gh, gw = (grid, grid) if grid is not None else model.patch_embed.grid_size
    N = (model.prefix_count(gh) if hasattr(model, "prefix_count") else model.num_prefix_tokens) + gh * gw
    total = gh * gw * model.patch_embed.proj.weight.numel() + blocks_macs(model, N)
    idle = model.idle_modules(gh) if hasattr(model, "idle_modules") else ()
    inside = linear(model.blocks) + linear(model.patch_embed) + sum(linear(m) for m in idle if m is not None)
    return total + linear(model) - inside


def linear(module: nn.Module) -> int:
    """Multiply-accumulates of one token through every ``nn.Linear`` of
    ``module``."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def blocks_macs(model: nn.Module, tokens: int) -> int:
    """Multiply-accumulates of one sequence of ``tokens`` tokens through the
    blocks of a timm ViT, with the token counts its keep rates leave."""
    total, N, n = 0, tokens, model.num_prefix_tokens
    for blk in model.blocks:
        total += N * linear(blk.attn) + 2 * N * N * blk.attn.attn_dim
        rate = getattr(blk, "keep_rate", None)
        if rate is not None:
            N = pruned_length(N, rate, n, blk.fuse)
        total += N * linear(blk.mlp)
    return total
