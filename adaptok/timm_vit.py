"""adaptok for timm Vision Transformers: :func:`patch` converts a model in
place so that it runs on packed ragged batches.

After ``adaptok.patch(model)`` the model

- computes what it computed before (``keep_rate=None``, the parity mode);
- with ``keep_rate``, prunes tokens EViT's way in its ``prune_layers``: the
  class attention of the block's attention ranks the tokens, the block keeps
  the top ``ceil(keep_rate * (N - n))`` patch tokens after its attention and
  fuses the rest into one token before its MLP, without an N x N matrix;
- accepts ``model(images, grid=...)``, a token grid per image: each image is
  resized so that the model's patch embedding yields its grid, gets position
  embeddings interpolated for that grid (once per grid, cached), and every
  sequence runs packed in one :class:`adaptok.RaggedBatch` through every block.

The model keeps its class (a subclass replaces it), its modules and its
state-dict keys, so timm checkpoints load before or after patching. Every
submodule still runs its own timm code; adaptok owns only the data flow
between them. Configurations it cannot run exactly are refused with
:class:`UnsupportedModelError`.

Example::

    >>> model = timm.create_model("deit_small_patch16_224")
    >>> adaptok.patch(model, keep_rate=0.7)                          # EViT, blocks 3, 6, 9
    >>> logits = model(images)                                       # [B, 1000]
    >>> logits = model(images, grid=torch.tensor([7, 14, 14, 7]))    # one grid per image
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from timm.layers import (Attention, DropPath, GluMlp, LayerNorm, LayerNormFp32, LayerScale, Mlp, PatchEmbed,
                         RmsNorm, RmsNormFp32, SimpleNorm, SimpleNormFp32, SwiGLU, resample_abs_pos_embed)
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from .errors import UnsupportedModelError
from .layout import TokenLayout, grid_sides, host_grid, resize_images, stream_dtype
from .models import evit
from .models.evit import KeepRate
from .nn.attention import ATTENTION, attention_path, dense_attention, packed_attention, runs
from .nn.linear import adapt_linears
from .nn.layout_aware import LayoutAware, apply, is_layout_aware, per_sequence
from .nn.norm import TokenLengthLayerNorm
from .nn.patch_embed import embed_patches, has_hooks
from .nn.prune import evit_select, pruned_length
from .ragged import RaggedBatch
from .tuning import compute_dtype, transformed, values_key


# Modules applied to [T, C] packed tokens must act on each token alone.
_TOKEN_NORMS = (nn.Identity, nn.LayerNorm, LayerNorm, LayerNormFp32, RmsNorm, RmsNormFp32, SimpleNorm,
                SimpleNormFp32)
_TOKEN_MLPS = (Mlp, GluMlp, SwiGLU)
# Where a layout-aware norm (ReViT's per-length LayerNorm) may sit.
_LAYOUT_NORM_SLOTS = ("norm", "norm1", "norm2")


# ------------------------------------------------------------------ attention


class AdaptiveAttention(Attention):
    """timm ``Attention`` that also runs on packed ragged batches
    (:meth:`forward_packed`) and returns the class attention EViT ranks
    tokens with. On ``[B, N, C]`` tensors it is timm's module, with the
    attention formulation chosen per shape (:meth:`forward`)."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """timm's forward on ``x [B, N, C]``, with the formulation timm
        would use, fused SDPA or explicit matmuls, chosen per shape without a
        mask (:func:`adaptok.nn.attention.attention_path`: measured in bf16
        on the CPU, SDPA elsewhere). Where SDPA is chosen it is timm's own
        code, unchanged."""
        # Cheap tests first: this runs in every block of parity mode.
        if attn_mask is None and not is_causal and self.fused_attn and x.dim() == 3 and (
                x.dtype is torch.bfloat16 or ATTENTION.forced() is not None or torch.is_autocast_enabled("cpu")):
            B, N, C = x.shape
            path = attention_path(x, compute_dtype(x), B, self.num_heads, N, self.head_dim, False,
                                  self.attn_drop.p if self.training else 0.0)
            if path != "sdpa":
                out, _ = self._attend_tokens(x.reshape(B * N, C), lambda q, k, v, dropout: dense_attention(
                    q, k, v, ((0, B, N),), self.scale, dropout, path=path))
                return out.view(B, N, -1)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_packed(self, h: Tensor, x: RaggedBatch, need_cls: bool = False):
        """Attention within each sequence of ``x``.

        Args:
            h: ``[T, C]`` normalized tokens, laid out as ``x``.
            x: the batch's layout (``cu_seqlens``, host lengths).
            need_cls: also return ``cls_attn [T]``: for each token, the
                head-mean probability with which its sequence's first token
                attends to it.

        Returns:
            ``(out [T, C], cls_attn [T] or None)``.
        """
        return self._attend_tokens(h, lambda q, k, v, dropout: packed_attention(q, k, v, x, self.scale, dropout,
                                                                                 need_cls))

    def _attend_tokens(self, h: Tensor, attend):
        """timm's attention around ``attend(q, k, v [T, H, D], dropout) ->
        (out [T, H * D], cls_attn or None)`` on tokens ``h [T, C]``."""
        T = h.shape[0]
        gate = self.gate(h).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(h).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        out, cls_attn = attend(q, k, v, self.attn_drop.p if self.training else 0.0)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out)), cls_attn


# ---------------------------------------------------------------------- block


class AdaptiveBlock(Block):
    """timm ``Block`` that runs on packed ragged batches and, with a
    ``keep_rate``, selects tokens between its attention and its MLP (EViT).

    Attributes set by :func:`patch`: ``keep_rate`` (None: no pruning),
    ``fuse`` (append the fused inattentive token), ``num_prefix_tokens``
    (the CLS and other prefix tokens, never pruned). A block without a keep
    rate runs timm's own ``forward`` on the dense view of a uniform batch
    (its attention in the timm formulation measured faster for the shape,
    :func:`adaptok.nn.attention.attention_path`), and adaptok's packed path
    otherwise.
    ``norm1`` and ``norm2`` may be :class:`adaptok.nn.LayoutAware` modules
    (:class:`adaptok.nn.TokenLengthLayerNorm`): they get the packed layout.
    """

    keep_rate: Optional[float] = None
    fuse: bool = True
    num_prefix_tokens: int = 1

    def forward(self, x, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """``x``: a :class:`RaggedBatch` of ``[T, C]`` tokens, or a ``[B, N, C]``
        tensor (what timm passes; a pruning block returns ``[B, N', C]``)."""
        if not isinstance(x, RaggedBatch) and self.keep_rate is None and not self.layout_aware:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # parity mode's hot path
        if isinstance(x, RaggedBatch):
            if x.is_uniform and self.keep_rate is None and not self.layout_aware:  # timm's block on the dense view
                dense = x.values.view(x.batch_size, x.max_seqlen, -1)
                return x.with_values(super().forward(dense).view_as(x.values))
            return self._forward_packed(x)
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("a pruning block (keep_rate set) or one with layout-aware norms cannot take "
                                        "attn_mask or is_causal")
        B, N, C = x.shape
        if B == 0:  # an empty batch: the token count this block leaves
            return x if self.keep_rate is None else x[:, :pruned_length(N, self.keep_rate, self.num_prefix_tokens,
                                                                          self.fuse)]
        if self.layout_aware:
            raise UnsupportedModelError("a block with layout-aware norms runs on a RaggedBatch with grid tags "
                                        "(the patched model's forward), not on a [B, N, C] tensor")
        out = self._forward_packed(RaggedBatch.from_lengths(x.reshape(B * N, C), (N,) * B))
        return out.values.view(B, -1, C)

    @property
    def layout_aware(self) -> bool:
        """Whether a norm of this block needs the packed layout."""
        modules = self._modules  # not nn.Module.__getattr__: this runs in every block call
        return isinstance(modules["norm1"], LayoutAware) or isinstance(modules["norm2"], LayoutAware)

    def _forward_packed(self, x: RaggedBatch, need_cls: bool = False):
        """The block on packed tokens; with ``need_cls``, also its attention's
        class attention ``[T]`` over the input tokens: ``(out, cls_attn)``."""
        h = x.values
        prune = self.keep_rate is not None
        a, cls_attn = self.attn.forward_packed(apply(self.norm1, h, x), x, need_cls=prune or need_cls)
        h = h + per_sequence(self.drop_path1, self.ls1(a), x)
        if prune:
            x = evit_select(x.with_values(h), cls_attn, self.keep_rate, self.num_prefix_tokens, self.fuse)
            h = x.values
        h = h + per_sequence(self.drop_path2, self.ls2(self.mlp(apply(self.norm2, h, x))), x)
        return (x.with_values(h), cls_attn) if need_cls else x.with_values(h)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}" if self.keep_rate is not None else ""


# ---------------------------------------------------------------------- model


_NO_TORCHSCRIPT = ("{what} is not supported on a model patched by adaptok: its forward plans the token layout on "
                   "the host (grids, keep counts, sequence lengths), which TorchScript cannot represent. Use "
                   "torch.compile(model) (parity mode and a fixed keep rate trace with fullgraph=True) or "
                   "torch.export.export(model, (images,)) (parity, keep rates and a fixed grid= list export).")


class AdaptiveViTMixin:
    """What :func:`patch` adds to a timm ``VisionTransformer`` (see the
    module docstring). The patched model's ``forward``, ``forward_features``
    and ``forward_head`` take the same arguments as timm's, plus ``grid``."""

    # ------------------------------------------------------------ pruning

    @property
    def keep_rate(self) -> KeepRate:
        """The keep rate of the prune layers (a float, a per-layer tuple, or
        None). Settable, e.g. from :func:`keep_rate_schedule` while training."""
        return self._adaptok_keep_rate

    @keep_rate.setter
    def keep_rate(self, keep_rate: KeepRate) -> None:
        self._configure(keep_rate, self._adaptok_prune_layers, self._adaptok_fuse)

    @property
    def prune_layers(self) -> tuple:
        return self._adaptok_prune_layers

    def set_pruning(self, keep_rate: KeepRate, prune_layers: Optional[Sequence[int]] = None) -> None:
        """Set the keep rate and, when given, the prune layers together
        (fusion stays as patched); checked as :func:`patch` checks them."""
        self._configure(keep_rate, self._adaptok_prune_layers if prune_layers is None else prune_layers,
                        self._adaptok_fuse)

    def _configure(self, keep_rate: KeepRate, prune_layers: Sequence[int], fuse: bool) -> None:
        self._adaptok_keep_rate = evit.configure(self, keep_rate, prune_layers, fuse)
        self._adaptok_prune_layers = tuple(prune_layers)
        self._adaptok_fuse = fuse

    # ---------------------------------------------------------- embedding

    def _prefix_and_pos(self, grid: tuple) -> tuple:
        """``(prefix [n, C] or None, pos [gh * gw, C] or None)`` for a patch
        grid ``(gh, gw)``: the prefix tokens with their position embedding,
        and the patch position table, resampled from the model's own table
        as timm does for other image sizes.

        Resampled tables are cached per grid while no gradient is recorded
        (and no ``torch.func`` transform or forward-mode AD is active).
        The key holds the parameters' storage and version counters, so
        replacements and in-place updates (optimizer steps,
        ``load_state_dict``, EMA) invalidate it; writes
        through ``.data``, and in-place changes of parameters made under
        ``torch.inference_mode`` (no version counter), do not: call
        :meth:`clear_position_cache` after those."""
        native = tuple(self.patch_embed.grid_size)
        dist = self.dist_token if isinstance(self, VisionTransformerDistilled) else None  # DeiT's, on every image
        tokens = [t for t in (self.cls_token, dist, self.reg_token) if t is not None]
        params = [t for t in (*tokens, self.pos_embed) if t is not None]
        cacheable = grid != native and self.pos_embed is not None and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in params)) and not transformed()
        if cacheable:
            key = (grid, tuple(values_key(p) for p in params))
            cache = self.__dict__.setdefault("_adaptok_tables", {})
            if key in cache:
                return cache[key][:2]
        prefix = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens]) if tokens else None
        pos = None
        if self.pos_embed is not None:
            n_pos = 0 if self.no_embed_class else self.num_prefix_tokens
            table = self.pos_embed
            if grid != native:
                table = resample_abs_pos_embed(table, new_size=list(grid), old_size=list(native), num_prefix_tokens=n_pos)
            table = table[0]
            if n_pos:
                prefix = prefix + table[:n_pos]
            pos = table[n_pos:]
        if cacheable:
            cache = {k: v for k, v in cache.items() if k[1] == key[1]}  # drop entries of old parameters
            cache[key] = (prefix, pos, [p.detach() for p in params])  # aliases: no new parameter takes their address
            self.__dict__["_adaptok_tables"] = cache
        return prefix, pos

    def clear_position_cache(self) -> None:
        """Forget the position tables resampled for other grids."""
        self.__dict__.pop("_adaptok_tables", None)

    def _patchify(self, images: Tensor, grid=None) -> Tensor:
        """``[B, 3, H, W]`` at any multiple of the patch size -> ``[B, P, C]``
        with the model's patch projection and norm (timm's check of the
        image size is what this skips). ``grid``: the images' grid, for a
        family with a patch embedding per length."""
        return embed_patches(self.patch_embed, images)

    def prefix_count(self, grid: int) -> int:
        """Prefix tokens (class, distillation, register) of a sequence at
        ``grid``; a multi-length family may have more on some lengths."""
        return self.num_prefix_tokens

    def idle_modules(self, grid: int) -> tuple:
        """Modules outside the blocks that do not run at ``grid`` (for
        :func:`adaptok.macs`)."""
        return ()

    def token_layout(self, x: Tensor, grid) -> TokenLayout:
        """The :class:`adaptok.layout.TokenLayout` of ``grid=`` for images
        ``x [B, C, H, W]`` (this model's patch grid must be square)."""
        if x.dim() != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {tuple(x.shape)}")
        gh, gw = self.patch_embed.grid_size
        if gh != gw:
            raise UnsupportedModelError(f"grid= needs a square patch grid, this model's is {gh}x{gw}")
        return TokenLayout.from_grid(grid, x.shape[0])

    def embed(self, x: Tensor, grid=None, *, tagged: bool = True) -> tuple[RaggedBatch, TokenLayout]:
        """Images to the packed token batch the blocks run on.

        Args:
            x: ``[B, 3, H, W]`` images.
            grid: None (every image at the model's grid), or the token grid
                side of each image (an int for all, or ``[B]`` ints).
            tagged: with ``grid=None``, whether the batch carries grid tags
                (layout-aware norms need them; ``grid=`` batches always do).

        Returns:
            ``(batch, layout)``: a :class:`RaggedBatch` of ``[T, C]`` tokens
            in the layout's packed order (grid tags set for square grids),
            and the :class:`adaptok.layout.TokenLayout` that restores input
            order.
        """
        if grid is None:
            pe = self.patch_embed
            # timm's module where it pads, checks or keeps NHWC; the measured
            # projection where it is the plain map of the model's image size
            plain = (pe.flatten and not pe.dynamic_img_pad and tuple(x.shape[-2:]) == tuple(pe.img_size or ())
                     and not has_hooks(pe))
            patches = embed_patches(pe, x) if plain else pe(x)
            if patches.dim() == 4:  # NHWC (dynamic image size)
                hw = tuple(patches.shape[1:3])
                patches = patches.flatten(1, 2)
            else:
                hw = tuple(self.patch_embed.grid_size)
            layout, groups = TokenLayout.uniform(x.shape[0], hw, tagged), [patches]
        else:
            layout = self.token_layout(x, grid)
            groups = [self._patchify(images, g) for (g, _), images in
                      zip(layout.groups, layout.group_images(x, self.patch_embed.patch_size))]
        batch = layout.pack(groups, [self._prefix_and_pos(grid_sides(g)) for g, _ in layout.groups])
        if self.pos_embed is not None:  # timm applies pos_drop only with a position table
            batch = batch.with_values(self.pos_drop(batch.values))
        batch = self._patch_drop(batch)
        return batch.with_values(self.norm_pre(batch.values)), layout

    def _patch_drop(self, x: RaggedBatch) -> RaggedBatch:
        if isinstance(self.patch_drop, nn.Identity) or not self.training:
            return x
        if not x.is_uniform:
            raise UnsupportedModelError("patch dropout (patch_drop_rate > 0) in training needs one grid for all images")
        out = self.patch_drop(x.values.view(x.batch_size, x.max_seqlen, -1))
        return RaggedBatch.from_lengths(out.reshape(-1, out.shape[-1]), (out.shape[1],) * x.batch_size, x.grid)

    # ------------------------------------------------------------- forward

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: refuse with the alternatives."""
        raise UnsupportedModelError(_NO_TORCHSCRIPT.format(what="torch.jit.script"))

    def _check_not_traced(self) -> None:
        if torch.jit.is_tracing():
            raise UnsupportedModelError(_NO_TORCHSCRIPT.format(what="torch.jit.trace"))

    def _layout_aware(self) -> bool:
        """Whether a norm of the blocks or the final norm needs the layout."""
        return is_layout_aware(self.norm) or any(blk.layout_aware for blk in self.blocks)

    # Whether the model at its own grid without a keep rate computes what the
    # timm model computes. A subclass that overrides how tokens are made or
    # read (_PARITY_HOOKS) is taken to say no, unless it sets this itself.
    timm_parity = True
    _PARITY_HOOKS = ("embed", "_patchify", "_prefix_and_pos", "prefix_count", "_forward_tokens", "forward_head",
                     "forward_features", "_head", "_dense_features")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "timm_parity" not in cls.__dict__ and any(h in cls.__dict__ for h in AdaptiveViTMixin._PARITY_HOOKS):
            cls.timm_parity = False

    def _dense_route(self, x: Tensor, grid):
        """How a call runs when every image runs one grid and nothing needs
        the packed layout (no keep rate, no layout-aware norm, a model that
        makes and reads tokens as timm does): ``"timm"`` (the model's own
        grid and image size: timm's own forward), an int ``g`` (one int
        ``grid=g``: timm's forward as at ``g``'s resolution, dense
        ``[B, N, C]`` from embedding to head, :meth:`_dense_features`), or
        None (the packed path). The dense routes skip the packing's host
        work, which decides batch-size-1 latency. A per-image grid list
        always takes the packed path."""
        if grid is not None and (grid.__class__ is not int or grid < 1):
            return None
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] == 0:
            return None
        if not self.timm_parity or self._adaptok_keep_rate is not None or self._layout_aware():
            return None
        gh, gw = self.patch_embed.grid_size
        if grid is None or (grid == gh == gw and tuple(x.shape[-2:]) == tuple(self.patch_embed.img_size)):
            return "timm"
        return grid if gh == gw else None  # grid= on a rectangular grid: the packed path names the error

    def _dense_features(self, x: Tensor, g: int) -> Tensor:
        """Final tokens ``[B, N, C]`` of images ``x [B, 3, H, W]``, every one
        resized to grid ``g``: the embedding as the packed path makes it
        (:func:`adaptok.layout.resize_images`, :meth:`_patchify`, the cached
        tables of :meth:`_prefix_and_pos`, the dtype promotion of
        :meth:`adaptok.layout.TokenLayout.pack`), then timm's modules on the
        dense tensor."""
        ph, pw = self.patch_embed.patch_size
        patches = self._patchify(resize_images(x, (g * ph, g * pw)), g)
        prefix, pos = self._prefix_and_pos((g, g))
        dtype = stream_dtype(patches, prefix, pos)
        h = patches.to(dtype) if pos is None else patches.to(dtype) + pos.to(dtype)
        if prefix is not None:
            h = torch.cat([prefix.to(dtype).expand(h.shape[0], -1, -1), h], dim=1)
        if self.pos_embed is not None:  # timm applies pos_drop only with a position table
            h = self.pos_drop(h)
        h = self.norm_pre(self.patch_drop(h))
        return self.norm(self._run_blocks(h))

    def _run_blocks(self, h):
        """Every block on ``h`` (a ``[B, N, C]`` tensor or a
        :class:`RaggedBatch`), checkpointed in training when enabled."""
        checkpoint = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        for blk in self.blocks:
            h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False) if checkpoint else blk(h)
        return h

    def _forward_tokens(self, x: Tensor, grid) -> tuple[RaggedBatch, TokenLayout]:
        aware = self._layout_aware()
        batch, layout = self.embed(x, grid, tagged=aware)
        # Parity on a uniform batch: every block is timm's on the [B, N, C]
        # view, so the blocks take that tensor (no per-block RaggedBatch).
        dense = self._adaptok_keep_rate is None and batch.is_uniform and not aware
        h = self._run_blocks(batch.values.view(batch.batch_size, batch.max_seqlen, -1) if dense else batch)
        out = batch.with_values(h.reshape(batch.values.shape)) if dense else h
        return out.with_values(apply(self.norm, out.values, out)), layout

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, *,
                         grid=None):
        """Images ``[B, 3, H, W]`` to final tokens: ``[B, N, C]`` when every
        sequence has the same length, else a :class:`RaggedBatch` (in input
        order)."""
        if attn_mask is not None or is_causal:
            self._plain_only("attn_mask or is_causal", grid)
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        self._check_not_traced()
        route = self._dense_route(x, grid)
        if route == "timm":
            return super().forward_features(x)
        if route is not None:
            return self._dense_features(x, route)
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 0:
            return self._empty_features(x, grid)
        batch, layout = self._forward_tokens(x, grid)
        batch = layout.restore(batch)
        return batch.values.view(batch.batch_size, batch.max_seqlen, -1) if batch.is_uniform else batch

    def forward_head(self, x, pre_logits: bool = False):
        """timm's head, also on a :class:`RaggedBatch`: run on each run of
        equal-length sequences (one per grid) as a ``[b, n, C]`` view, so
        every timm pooling and head applies as it is."""
        if not isinstance(x, RaggedBatch):
            return super().forward_head(x, pre_logits=pre_logits)
        C = x.values.shape[-1]
        outs = [super(AdaptiveViTMixin, self).forward_head(x.values[s:s + b * n].view(b, n, C), pre_logits=pre_logits)
                for s, b, n in runs(x.lengths)]
        if len(outs) == 1:
            return outs[0]
        if isinstance(outs[0], tuple):  # distilled training: (head, head_dist)
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, *, grid=None):
        """``x [B, 3, H, W]`` -> logits ``[B, classes]`` in input order.

        ``grid``: None (the model's grid), an int, or ``[B]`` ints: the token
        grid side each image runs at (``g * patch_size`` pixels). A device
        tensor costs one sync (the grids set every size)."""
        if attn_mask is not None or is_causal:
            self._plain_only("attn_mask or is_causal", grid)
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        self._check_not_traced()
        route = self._dense_route(x, grid)
        if route == "timm":
            return super().forward(x)
        if route is not None:
            return self.forward_head(self._dense_features(x, route))
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 0:  # what timm returns: [0, classes]
            return self.forward_head(self._empty_features(x, grid))
        batch, layout = self._forward_tokens(x, grid)
        return layout.restore(self.forward_head(batch))

    def _empty_features(self, x: Tensor, grid) -> Tensor:
        """``[0, N, C]``: the final tokens of an empty batch, N as the grid
        and the keep rates leave it (timm runs empty batches too)."""
        if grid is None:
            return super().forward_features(x)
        host_grid(grid, 0)  # the same checks as for a full batch
        try:
            side = operator.index(grid)
        except TypeError:  # no image, so no grid: the model's own
            side = self.patch_embed.grid_size[0]
        if self.patch_embed.grid_size[0] != self.patch_embed.grid_size[1]:
            raise UnsupportedModelError(f"grid= needs a square patch grid, this model's is "
                                        f"{self.patch_embed.grid_size[0]}x{self.patch_embed.grid_size[1]}")
        h = x.new_zeros((0, self.prefix_count(side) + side * side, self.embed_dim), dtype=self.pos_embed.dtype
                        if self.pos_embed is not None else self.patch_embed.proj.weight.dtype)
        for blk in self.blocks:
            h = blk(h)
        return h if is_layout_aware(self.norm) else self.norm(h)

    def forward_intermediates(self, *args, **kwargs):
        """timm's, in parity mode only: its feature maps assume every patch
        token in place."""
        self._plain_only("forward_intermediates", None)
        return super().forward_intermediates(*args, **kwargs)

    def _plain_only(self, what: str, grid) -> None:
        if grid is not None or self._adaptok_keep_rate is not None:
            raise UnsupportedModelError(f"{what} cannot be combined with grid= or a keep_rate")


class AdaptiveVisionTransformer(AdaptiveViTMixin, VisionTransformer):
    """A patched timm ``VisionTransformer`` (:func:`patch`)."""


class AdaptiveVisionTransformerDistilled(AdaptiveViTMixin, VisionTransformerDistilled):
    """A patched timm ``VisionTransformerDistilled`` (DeiT with a
    distillation token; :func:`patch`)."""


_PATCHED = {VisionTransformer: AdaptiveVisionTransformer, VisionTransformerDistilled: AdaptiveVisionTransformerDistilled}


# ---------------------------------------------------------------------- patch


def _check_model(model: nn.Module) -> None:
    """Refuse what adaptok cannot run exactly, naming it."""
    cls = type(model)
    if cls not in _PATCHED and cls not in _PATCHED.values():
        raise UnsupportedModelError(f"adaptok.patch supports timm VisionTransformer and VisionTransformerDistilled, "
                                    f"got {cls.__module__}.{cls.__name__}")
    if type(model.patch_embed) is not PatchEmbed:
        raise UnsupportedModelError(f"patch embedding {type(model.patch_embed).__name__} is not supported (timm PatchEmbed only)")
    if isinstance(model, VisionTransformerDistilled) and model.reg_token is not None:
        raise UnsupportedModelError("register tokens with a distillation token are not supported")
    for name in ("norm_pre", "norm", "fc_norm", "patch_embed.norm"):
        norm = model.get_submodule(name)
        if type(norm) not in _TOKEN_NORMS and not (name in _LAYOUT_NORM_SLOTS and type(norm) is TokenLengthLayerNorm):
            raise UnsupportedModelError(f"{name} is a {type(norm).__name__}; supported norms: "
                                        f"{', '.join(t.__name__ for t in _TOKEN_NORMS)}")
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if type(blk) not in (Block, AdaptiveBlock):
            raise UnsupportedModelError(f"{where} is a {type(blk).__name__}; only timm's Block is supported")
        if type(blk.attn) not in (Attention, AdaptiveAttention):
            raise UnsupportedModelError(f"{where}.attn is a {type(blk.attn).__name__}; only timm's Attention is supported")
        convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in blk.mlp.modules())
        if type(blk.mlp) not in _TOKEN_MLPS or convs:
            raise UnsupportedModelError(f"{where}.mlp is a {type(blk.mlp).__name__}"
                                        f"{' with 1x1 convolutions' if convs else ''}; supported: "
                                        f"{', '.join(t.__name__ for t in _TOKEN_MLPS)} with Linear layers")
        for name in ("norm1", "norm2", "attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm"):
            norm = blk.get_submodule(name) if name != "mlp.norm" or hasattr(blk.mlp, "norm") else nn.Identity()
            if type(norm) not in _TOKEN_NORMS and not (name in _LAYOUT_NORM_SLOTS and
                                                       type(norm) is TokenLengthLayerNorm):
                raise UnsupportedModelError(f"{where}.{name} is a {type(norm).__name__}; supported norms: "
                                            f"{', '.join(t.__name__ for t in _TOKEN_NORMS)}")
        for name in ("ls1", "ls2"):
            if type(getattr(blk, name)) not in (nn.Identity, LayerScale):
                raise UnsupportedModelError(f"{where}.{name} is a {type(getattr(blk, name)).__name__}; "
                                            "supported: LayerScale or none")
        for name in ("drop_path1", "drop_path2"):
            if type(getattr(blk, name)) not in (nn.Identity, DropPath):
                raise UnsupportedModelError(f"{where}.{name} is a {type(getattr(blk, name)).__name__}; "
                                            "supported: DropPath or none")


def patch(model: nn.Module, *, keep_rate: KeepRate = None, prune_layers: Sequence[int] = (3, 6, 9),
          fuse_inattentive: bool = True) -> nn.Module:
    """Convert a timm Vision Transformer in place to run on adaptok kernels.

    Args:
        model: a timm ``VisionTransformer`` or ``VisionTransformerDistilled``
            (DeiT, ViT, DeiT-III, with class, register or distillation
            tokens, LayerScale, qk-norm, any pooling). Other models raise
            :class:`UnsupportedModelError` naming what is not supported.
        keep_rate: None (compute exactly what the model computed), or EViT's
            keep rate in (0, 1], one for all ``prune_layers`` or one each.
            Settable later as ``model.keep_rate``.
        prune_layers: 0-indexed blocks that select tokens after their
            attention (EViT on DeiT-S: 3, 6, 9).
        fuse_inattentive: fuse the dropped tokens into one token weighted by
            their class attention (EViT); False drops them.

    Returns:
        ``model``, whose ``forward`` also takes ``grid=`` (see the module
        docstring). Its state-dict keys are unchanged.
    """
    _check_model(model)
    evit.check_keep_rate(keep_rate, prune_layers, model)
    model.__class__ = _PATCHED.get(type(model), type(model))
    for blk in model.blocks:
        blk.__class__ = AdaptiveBlock
        blk.attn.__class__ = AdaptiveAttention
    adapt_linears(model)
    model._configure(keep_rate, prune_layers, bool(fuse_inattentive))
    return model
