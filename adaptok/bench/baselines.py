"""What users run without adaptok, for the benchmarks to compare against:
plain timm models and PyTorch only, no adaptok op.

- :func:`evit_public`: EViT the way its public code computes it (the
  attention matrix materialized in every block to read its class-token row;
  ``topk``, ``gather``, a sort for the complement, ``gather``, weighted sum).
- :func:`cfvit_official`: CF-ViT the way its official code computes it (the
  attention matrix of every block kept to average its class row, an argsort
  and index arithmetic for the fine tokens, the remaining images masked into
  a dense sub-batch).
- :class:`PaddedMixedGrid`: a batch that mixes token grids, padded to the
  longest sequence and masked (timm's own approach to variable resolution).
- :class:`SeparateBatches`: the same batch split by grid, one timm model call
  per grid.

Each takes an unpatched timm ``VisionTransformer`` with a class token as its
only prefix token and ``global_pool="token"`` (DeiT, ViT), and refuses others.
Host indices reach the device without a sync, as adaptok's do.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import TokenLayout, resize_images


def _check_scope(model: nn.Module) -> None:
    gated = any(getattr(blk.attn, "gate", None) is not None for blk in model.blocks)
    if model.num_prefix_tokens != 1 or not model.has_class_token or model.global_pool != "token" or gated:
        raise ValueError("the baselines run ViTs with a class token as their only prefix token, class-token "
                         f"pooling and no attention gate; got {type(model).__name__} with "
                         f"{model.num_prefix_tokens} prefix tokens, global_pool={model.global_pool!r}"
                         f"{', gated attention' if gated else ''}")


def at_grid(model: nn.Module, grid: int) -> nn.Module:
    """A copy of ``model`` for images of ``grid`` x ``grid`` patches (timm's
    ``set_input_size`` resamples the position table), or ``model`` itself."""
    if tuple(model.patch_embed.grid_size) == (grid, grid):
        return model
    ph, pw = model.patch_embed.patch_size
    out = copy.deepcopy(model)
    out.set_input_size(img_size=(grid * ph, grid * pw))
    return out


def _attention_with_probs(attn: nn.Module, x: Tensor):
    """timm ``Attention`` with the ``[B, H, N, N]`` probabilities materialized
    and returned, as EViT's fork of timm computes it."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn.attn_drop(p) @ v).transpose(1, 2).reshape(B, N, attn.attn_dim)
    return attn.proj_drop(attn.proj(attn.norm(out))), p


def evit_public(model: nn.Module, images: Tensor, keep_rate: float = 0.7, prune_layers: Sequence[int] = (3, 6, 9),
                fuse: bool = True) -> Tensor:
    """EViT's forward computed the way its public code does, on an unpatched
    timm model: logits ``[B, classes]``."""
    _check_scope(model)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, blk in enumerate(model.blocks):
        a, p = _attention_with_probs(blk.attn, blk.norm1(x))
        x = x + blk.drop_path1(blk.ls1(a))
        B, N, C = x.shape
        left = math.ceil(keep_rate * (N - 1))
        if i in prune_layers and left < N - 1:
            cls_attn = p[:, :, 0, 1:].mean(dim=1)  # [B, N - 1]
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            others = x[:, 1:]
            kept = torch.gather(others, 1, idx[..., None].expand(-1, -1, C))
            parts = [x[:, :1], kept]
            if fuse:
                # The complement of the kept indices, by a sort over all N - 1.
                marked = torch.zeros_like(cls_attn, dtype=torch.bool).scatter_(1, idx, True)
                positions = torch.arange(N - 1, device=x.device).expand(B, -1).masked_fill(marked, N)
                compl = positions.sort(dim=1).values[:, :N - 1 - left]
                dropped = torch.gather(others, 1, compl[..., None].expand(-1, -1, C))
                weights = torch.gather(cls_attn, 1, compl)
                parts.append((dropped * weights[..., None]).sum(dim=1, keepdim=True))
            x = torch.cat(parts, dim=1)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


def _blocks_with_class_attention(model: nn.Module, x: Tensor, start: int, beta: float):
    """Dense blocks on ``x [B, N, C]``; the global class attention ``[B, N -
    1]`` read from the running average of every block's ``[B, H, N, N]``
    map from ``start`` on (None when ``start`` is past the last block)."""
    g = 0
    for i, blk in enumerate(model.blocks):
        a, p = _attention_with_probs(blk.attn, blk.norm1(x))
        if i >= start:
            g = beta * g + (1 - beta) * p  # a running average of the whole [B, H, N, N] maps, as the official code
        x = x + blk.drop_path1(blk.ls1(a))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.norm(x), (g[:, :, 0, 1:].mean(dim=1) if start < len(model.blocks) else None)


def cfvit_official(model: nn.Module, images: Tensor, eta=None) -> Tensor:
    """CF-ViT's inference computed the way its official code does, on the
    weights of an :mod:`adaptok.models.cfvit` model at its own image size
    (its ``alpha``, ``beta``, ``start``, ``selection="global"``, ``resize``):
    logits ``[B, classes]``, the coarse prediction where its max softmax is
    at least ``eta`` (None: no image exits), else the fine one."""
    from adaptok.models.cfvit import exits

    _check_scope(model)
    if model.no_embed_class:
        raise ValueError("the official path adds the coarse table to the class token too: a model with "
                         "no_embed_class is not in its scope")
    if model.selection != "global":
        raise ValueError(f"the official path selects by global class attention, model.selection is "
                         f"{model.selection!r}")
    B = images.shape[0]
    (h, w), _ = model.grids(images)
    if (h, w) != model.coarse_grid:
        raise ValueError(f"images must be of the model's own size (a {model.coarse_grid} coarse grid, as the "
                         f"official code's fixed size), got {tuple(images.shape[-2:])}")
    Nc, ph = h * w, model.patch_embed.patch_size[0]
    size = (h * ph, w * ph)
    if model.resize == "official":
        small = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
    else:
        small = resize_images(images, size)  # antialiased; fp16/bf16 on the CPU resized in fp32, as adaptok does
    cls = model.cls_token.expand(B, -1, -1)
    embed = (lambda t: model.patch_embed.norm(model.patch_embed.proj(t).flatten(2).transpose(1, 2)))
    x = torch.cat([cls, embed(small)], dim=1) + model.coarse_pos_embed
    final, g = _blocks_with_class_attention(model, model.norm_pre(x), model.start, model.beta)
    coarse = model.forward_head(final)
    if eta is None:
        stay = torch.ones(B, dtype=torch.bool, device=images.device)
    else:
        stay = ~exits(coarse, eta)
    if not bool(stay.any()):
        return coarse  # no image left, no fine pass (skipping it can only favour this baseline)
    # The remaining images as a dense sub-batch.
    x_in, final, g, full = x[stay], final[stay], g[stay], images[stay]
    R, C = full.shape[0], x.shape[-1]
    fine = embed(full)  # [R, 4 Nc, C]
    if model.reuse is not None:
        up = model.reuse(final[:, 1:]).transpose(1, 2).reshape(R, C, h, w)
        fine = fine + F.interpolate(up, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)
    fine = fine + model.pos_embed[:, 1:]
    keep = model.keep(Nc)
    order = torch.argsort(g, dim=1, descending=True)
    top, rest = order[:, :keep], order[:, keep:]
    # Index arithmetic: the four fine patches of coarse patch i = (r, c).
    r, c = top // w, top % w
    base = 2 * r * (2 * w) + 2 * c
    idx = torch.stack([base, base + 1, base + 2 * w, base + 2 * w + 1], dim=-1).reshape(R, 4 * keep)
    chosen = torch.gather(fine, 1, idx[..., None].expand(-1, -1, C))
    kept = torch.gather(x_in[:, 1:], 1, rest[..., None].expand(-1, -1, C))
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(R, -1, -1)
    out, _ = _blocks_with_class_attention(model, model.norm_pre(torch.cat([cls, chosen, kept], dim=1)), len(model.blocks),
                                          0.0)
    logits = coarse.clone()
    logits[stay] = model.forward_head(out).to(coarse.dtype)
    return logits


class SeparateBatches:
    """A mixed-grid batch run as one timm call per grid (models resampled for
    each grid once, at construction)."""

    def __init__(self, model: nn.Module, grids: Sequence[int]):
        _check_scope(model)
        self.models = {g: at_grid(model, g) for g in grids}
        self.patch_size = tuple(model.patch_embed.patch_size)

    def __call__(self, images: Tensor, grid: Sequence[int]) -> Tensor:
        layout, groups = self._groups(images, grid)
        return layout.restore(torch.cat([self.models[g](x) for (g, _), x in zip(layout.groups, groups)]))

    def _groups(self, images: Tensor, grid: Sequence[int]):
        """The batch's :class:`TokenLayout` and its images per group, resized
        for their grid."""
        layout = TokenLayout.from_grid(grid, images.shape[0])
        return layout, layout.group_images(images, self.patch_size)


class PaddedMixedGrid(SeparateBatches):
    """A mixed-grid batch padded to its longest sequence: every image embedded
    at its grid, the sequences zero-padded to one length, every block run
    with a key mask (padding attends but is never attended to)."""

    def __init__(self, model: nn.Module, grids: Sequence[int]):
        super().__init__(model, grids)
        self.model = model

    def __call__(self, images: Tensor, grid: Sequence[int]) -> Tensor:
        layout, images = self._groups(images, grid)
        groups = [self.models[g].norm_pre(self.models[g]._pos_embed(self.models[g].patch_embed(x)))
                  for (g, _), x in zip(layout.groups, images)]
        longest = max(x.shape[1] for x in groups)
        lengths = [x.shape[1] for x in groups for _ in range(x.shape[0])]
        x = torch.cat([F.pad(x, (0, 0, 0, longest - x.shape[1])) for x in groups])
        lengths = torch.tensor(lengths).to(x.device, non_blocking=True)
        mask = (torch.arange(longest, device=x.device) < lengths[:, None])[:, None, None, :]  # [B, 1, 1, L]
        for blk in self.model.blocks:
            x = blk(x, attn_mask=mask)
        return layout.restore(self.model.forward_head(self.model.norm(x)))
