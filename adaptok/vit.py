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

import contextlib
import functools
import math
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import (Attention, DropPath, GluMlp, LayerNorm, LayerNormFp32, LayerScale, Mlp, PatchEmbed,
                         RmsNorm, RmsNormFp32, SimpleNorm, SimpleNormFp32, SwiGLU, resample_abs_pos_embed)
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from .ops import common
from .ops.pack_patches import pack_patches, sequence_lengths
from .ops.topk_select import output_lengths
from .ops.varlen_attention import varlen_attention
from .ragged import RaggedBatch

KeepRate = Union[float, Sequence[float], None]


class UnsupportedModelError(ValueError):
    """A model, or a use of it, that adaptok cannot run exactly."""


# A batch whose sequences fall into at most this many runs of equal length
# (a uniform batch is one run; packed grids are one run per grid) runs
# attention as one dense SDPA call per run; more runs take the varlen kernel.
# Measured on the CPU: SDPA on two [16, 6, N, 64] runs (N = 197, 50) took
# 16 ms against 25 ms for the varlen kernel over the same packed tokens.
MAX_DENSE_RUNS = 4

# Modules applied to [T, C] packed tokens must act on each token alone.
_TOKEN_NORMS = (nn.Identity, nn.LayerNorm, LayerNorm, LayerNormFp32, RmsNorm, RmsNormFp32, SimpleNorm,
                SimpleNormFp32)
_TOKEN_MLPS = (Mlp, GluMlp, SwiGLU)


# -------------------------------------------------------------------- helpers


def _runs(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal length as ``(first token, sequences, length)``."""
    runs, token = [], 0
    for n in lengths:
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([token, 1, n])
        token += n
    return [tuple(r) for r in runs]


def _per_sequence(module: nn.Module, y: Tensor, x: RaggedBatch) -> Tensor:
    """Apply a per-sample module (timm's ``DropPath``) to ``y [T, C]`` with
    one sample per sequence of ``x``."""
    if isinstance(module, nn.Identity) or not module.training:  # DropPath is the identity in eval mode
        return y
    if x.is_uniform:
        return module(y.view(x.batch_size, x.max_seqlen, -1)).view_as(y)
    # The module draws one factor per sample of a [B, 1] ones tensor.
    scale = module(y.new_ones(x.batch_size, 1))
    return y * scale[common.seq_ids(x.cu_seqlens, x.total_tokens)]


def _positions(x: RaggedBatch) -> Tensor:
    """int64 ``[T]``: each token's position in its sequence."""
    return common.positions(x.cu_seqlens, common.seq_ids(x.cu_seqlens, x.total_tokens))


def _keep_counts(lengths: Sequence[int], keep_rate: float, num_prefix: int = 1) -> list[int]:
    """Tokens each sequence keeps after the CLS token: its other prefix tokens
    plus ``ceil(keep_rate * (N - num_prefix))`` patch tokens (EViT's
    ``ceil(keep_rate * (N - 1))`` for a model with only a CLS token)."""
    return [num_prefix - 1 + math.ceil(keep_rate * (n - num_prefix)) for n in lengths]


def keep_rate_schedule(step: float, target: float, start: float, end: float) -> float:
    """EViT's keep-rate warm-up: 1 until ``start``, then a cosine from 1 down
    to ``target`` at ``end``, then ``target``. Steps may be epochs or
    iterations (EViT: start at epoch 10, reach the target at epoch 100)::

        model.keep_rate = adaptok.keep_rate_schedule(epoch, 0.7, start=10, end=100)
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if not end > start:
        raise ValueError(f"end must be after start, got start={start}, end={end}")
    t = min(max((step - start) / (end - start), 0.0), 1.0)
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * t))


def macs(model: nn.Module, grid: Optional[int] = None) -> int:
    """Multiply-accumulates of one image through a timm ViT, patched or not,
    at a ``grid`` x ``grid`` token grid (default: the model's), with the
    token counts its keep rate leaves: the patch embedding, every block's
    linear layers and attention (``2 N^2`` per attention channel), and the
    linear layers outside the blocks once (the head). The papers' "FLOPs"
    of a ViT are these MACs (DeiT-S: 4.6 G)."""
    gh, gw = (grid, grid) if grid is not None else model.patch_embed.grid_size
    n = model.num_prefix_tokens
    N = n + gh * gw
    total = gh * gw * model.patch_embed.proj.weight.numel()

    def linear(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    for blk in model.blocks:
        total += N * linear(blk.attn) + 2 * N * N * blk.attn.attn_dim
        rate = getattr(blk, "keep_rate", None)
        if rate is not None:
            N = output_lengths([N], _keep_counts([N], rate, n), blk.fuse)[0]
        total += N * linear(blk.mlp)
    inside = linear(model.blocks) + linear(model.patch_embed)
    return total + linear(model) - inside


# ------------------------------------------------------------------ attention


def matmul_attention_pays(device: torch.device, dtype: torch.dtype, sequences: int, heads: int, n: int) -> bool:
    """Whether attention over ``sequences`` x ``heads`` rows of ``n`` tokens
    runs faster as explicit ``softmax((scale q) k^T) v`` matmuls than
    through SDPA.

    Measured on the CPU (2 cores, AVX-512 BF16, torch 2.14, head dim 64, 6
    heads, 20 paired calls; the table is in ``docs/vit.md``): in bf16 the
    matmuls take 0.36-0.8x SDPA's time for every batch at up to 140 tokens,
    0.54x for one image of 197 tokens and 0.97-1.09x for 8 to 64 images of
    197; inside DeiT-S at 32 images, SDPA's four 197-token blocks took 86 ms
    where the public EViT code's matmuls took about 30 ms (profiled), so the
    matmuls serve every ViT length (up to 256 tokens). In fp32 they gain at most 20 % in a narrow band and lose
    up to 2.8x just past it, so fp32 (and fp16, not measured) keep SDPA, as
    does CUDA (its fused kernels; no GPU measurement yet)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    return n <= MATMUL_ATTENTION_MAX_TOKENS or sequences * heads * n * n <= MATMUL_ATTENTION_MAX_SCORES


# The CPU bf16 matmul path (see matmul_attention_pays) serves sequences of up
# to this many tokens at any batch, and longer ones while the [b, H, n, n]
# score tensor holds at most MATMUL_ATTENTION_MAX_SCORES elements.
MATMUL_ATTENTION_MAX_TOKENS = 256
MATMUL_ATTENTION_MAX_SCORES = 1_000_000


def _dense_runs(q: Tensor, k: Tensor, v: Tensor, x: RaggedBatch, scale: float, dropout: float,
                need_cls: bool):
    """Attention over each run of equal-length sequences, on views of the
    packed ``q, k, v [T, H, D]``: SDPA, or explicit matmuls where
    :func:`matmul_attention_pays`. The CLS rows for ``need_cls`` cost
    ``O(N D)`` per head with SDPA and nothing more with the matmuls (their
    probabilities hold them). Returns ``out [T, H * D]`` and ``cls_attn [T]``
    (or None)."""
    T, H, D = q.shape
    runs = _runs(x.lengths)
    out = None if len(runs) == 1 else q.new_empty((T, H, D))
    cls = []
    stat = torch.promote_types(q.dtype, torch.float32)
    for start, count, n in runs:
        qr, kr, vr = (t[start:start + count * n].view(count, n, H, D).transpose(1, 2) for t in (q, k, v))
        if matmul_attention_pays(q.device, q.dtype, count, H, n):
            # q is scaled first (exact for a power-of-2 scale: head dims 16, 64,
            # 256); the softmax computes in fp32 and rounds the probabilities
            # to bf16 for the P V matmul, the CLS rows are kept in fp32.
            scores = (qr * scale) @ kr.transpose(-1, -2)  # [count, H, n, n]
            if need_cls:
                cls.append(scores[:, :, 0].softmax(-1, dtype=stat).mean(1).reshape(count * n))
            probs = scores.softmax(-1)
            if dropout > 0:
                probs = F.dropout(probs, dropout)
            o = (probs @ vr).transpose(1, 2)
        else:
            o = F.scaled_dot_product_attention(qr, kr, vr, dropout_p=dropout, scale=scale).transpose(1, 2)
            if need_cls:
                autocast = torch.is_autocast_enabled(q.device.type)
                with torch.autocast(q.device.type, enabled=False) if autocast else contextlib.nullcontext():
                    scores = (qr[:, :, :1].to(stat) @ kr.to(stat).transpose(-1, -2)) * scale  # [count, H, 1, n]
                cls.append(scores.softmax(-1).mean(1).reshape(count * n))
        if out is None:
            out = o.reshape(T, H, D)
        else:  # one copy, as the single-run reshape makes
            out[start:start + count * n].view(count, n, H, D).copy_(o)
    cls_attn = (cls[0] if len(cls) == 1 else torch.cat(cls)) if need_cls else None
    return out.reshape(T, H * D), cls_attn


class AdaptiveAttention(Attention):
    """timm ``Attention`` that also runs on packed ragged batches
    (:meth:`forward_packed`) and returns the class attention EViT ranks
    tokens with. On ``[B, N, C]`` tensors it is timm's module unchanged."""

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
        T = h.shape[0]
        gate = self.gate(h).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(h).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        if len(_runs(x.lengths)) <= MAX_DENSE_RUNS:
            out, cls_attn = _dense_runs(q, k, v, x, self.scale, dropout, need_cls)
        else:
            if dropout > 0:
                raise UnsupportedModelError("attention dropout (attn_drop_rate > 0) is not supported in training on "
                                            "batches with many sequence lengths: the varlen kernel has no dropout")
            result = varlen_attention(q, k, v, x.cu_seqlens, x.max_seqlen, scale=self.scale,
                                      return_cls_attn=need_cls)
            out, cls_attn = result if need_cls else (result, None)
            out = out.reshape(T, self.attn_dim)
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
    (the CLS and other prefix tokens, never pruned) and ``parity`` (the
    model has no keep rate: a uniform batch runs timm's own ``forward``,
    exactly; otherwise every block takes adaptok's attention path, chosen
    per shape by :func:`matmul_attention_pays`).
    """

    keep_rate: Optional[float] = None
    fuse: bool = True
    num_prefix_tokens: int = 1
    parity: bool = True

    def forward(self, x, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """``x``: a :class:`RaggedBatch` of ``[T, C]`` tokens, or a ``[B, N, C]``
        tensor (what timm passes; a pruning block returns ``[B, N', C]``)."""
        if isinstance(x, RaggedBatch):
            if x.is_uniform and self.keep_rate is None and self.parity:
                dense = x.values.view(x.batch_size, x.max_seqlen, -1)
                return x.with_values(super().forward(dense).view_as(x.values))
            return self._forward_packed(x)
        if self.keep_rate is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("a pruning block (keep_rate set) cannot take attn_mask or is_causal")
        B, N, C = x.shape
        if B == 0:  # an empty batch: the token count this block leaves
            return x[:, :output_lengths([N], _keep_counts([N], self.keep_rate, self.num_prefix_tokens), self.fuse)[0]]
        out = self._forward_packed(RaggedBatch._unchecked(x.reshape(B * N, C), (N,) * B))
        return out.values.view(B, -1, C)

    def _forward_packed(self, x: RaggedBatch) -> RaggedBatch:
        h = x.values
        prune = self.keep_rate is not None
        a, cls_attn = self.attn.forward_packed(self.norm1(h), x, need_cls=prune)
        h = h + _per_sequence(self.drop_path1, self.ls1(a), x)
        if prune:
            x = self._select(x.with_values(h), cls_attn)
            h = x.values
        h = h + _per_sequence(self.drop_path2, self.ls2(self.mlp(self.norm2(h))), x)
        return x.with_values(h)

    def _select(self, x: RaggedBatch, cls_attn: Tensor) -> RaggedBatch:
        n = self.num_prefix_tokens
        if n > 1:  # rank the other prefix tokens first: they are always kept, in order
            pos = _positions(x)
            cls_attn = cls_attn.masked_fill((pos >= 1) & (pos < n), float("inf"))
        keep = _keep_counts(x.lengths, self.keep_rate, n)
        out, _ = x.topk_select(cls_attn, keep=keep, fuse=self.fuse)
        return out

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}" if self.keep_rate is not None else ""


# ---------------------------------------------------------------------- model


def _host_grid(grid, batch: int) -> tuple:
    """``grid`` (an int, a sequence of ints, a numpy array or an integer
    tensor) as one host int >= 1 per image; otherwise a TypeError or
    ValueError naming ``grid``."""
    kinds = "an int, one int per image (a list, tuple or numpy array) or a 1-D integer tensor"
    if isinstance(grid, Tensor):
        if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool or grid.dim() > 1:
            raise TypeError(f"grid must be {kinds}, got a {grid.dtype} tensor of shape {tuple(grid.shape)}")
        grid = grid.tolist()  # sizes depend on it: one sync for a device tensor
    elif hasattr(grid, "dtype") and hasattr(grid, "tolist"):  # numpy arrays and scalars
        grid = grid.tolist()
    if isinstance(grid, bool):
        raise TypeError(f"grid must be {kinds}, got a bool")
    if isinstance(grid, int):
        grid = [grid] * batch
    elif isinstance(grid, (str, bytes, dict, set, frozenset)) or not isinstance(grid, Sequence):
        raise TypeError(f"grid must be {kinds}, got {type(grid).__name__} {grid!r}"[:200])
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


def _one_rate(keep_rate) -> bool:
    """Whether ``keep_rate`` is one number (for every prune layer)."""
    return not isinstance(keep_rate, Sequence) and getattr(keep_rate, "ndim", 0) == 0


def _host_rates(keep_rate) -> tuple:
    """``keep_rate`` (a real number, or one per prune layer: a sequence, a
    numpy array or a tensor) as a tuple of Python floats, unchecked in
    value; otherwise a TypeError naming ``keep_rate``."""
    kinds = "a float in (0, 1], one float per prune layer, or None"
    if isinstance(keep_rate, Tensor) or (hasattr(keep_rate, "dtype") and hasattr(keep_rate, "tolist")):
        if getattr(keep_rate, "ndim", 0) > 1:
            raise TypeError(f"keep_rate must be {kinds}, got an array of shape {tuple(keep_rate.shape)}")
        keep_rate = keep_rate.tolist()
    if isinstance(keep_rate, (str, bytes, dict, set, frozenset)):
        raise TypeError(f"keep_rate must be {kinds}, got {type(keep_rate).__name__} {keep_rate!r}"[:200])
    rates = keep_rate if isinstance(keep_rate, Sequence) else (keep_rate,)
    out = []
    for r in rates:
        try:
            out.append(common.host_float(r, "keep_rate"))
        except TypeError:
            raise TypeError(f"keep_rate must be {kinds}, got {r!r}"[:200]) from None
    return tuple(out)


def _check_keep_rate(keep_rate: KeepRate, prune_layers: Sequence[int], model: nn.Module) -> Optional[tuple]:
    """Validated ``(layer, rate)`` pairs for ``model``, or None for no
    pruning (then ``prune_layers`` is only kept for a later keep rate)."""
    if keep_rate is None:
        return None
    if not model.has_class_token:
        raise UnsupportedModelError("EViT pruning (keep_rate) ranks tokens by class-token attention; "
                                    "this model has no class token")
    depth = len(model.blocks)
    layers = tuple(prune_layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth:
            raise ValueError(f"prune_layers must hold block indices in [0, {depth - 1}], got {i!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"prune_layers must not repeat a block, got {layers}")
    rates = _host_rates(keep_rate)
    if _one_rate(keep_rate):
        rates = rates * len(layers)
    if len(rates) != len(layers):
        raise ValueError(f"keep_rate must be a float or one rate per prune layer ({len(layers)}), got {len(rates)}")
    for r in rates:
        if not 0.0 < r <= 1.0:  # also refuses NaN
            raise ValueError(f"keep_rate must be in (0, 1], got {r!r}")
    return tuple(zip(layers, rates))


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

    def _configure(self, keep_rate: KeepRate, prune_layers: Sequence[int], fuse: bool) -> None:
        pairs = _check_keep_rate(keep_rate, prune_layers, self)
        rates = dict(pairs or ())
        for i, blk in enumerate(self.blocks):
            blk.keep_rate = rates.get(i)
            blk.fuse = fuse
            blk.num_prefix_tokens = self.num_prefix_tokens
            blk.parity = pairs is None
        rates = _host_rates(keep_rate) if keep_rate is not None else None
        self._adaptok_keep_rate = rates if rates is None or not _one_rate(keep_rate) else rates[0]
        self._adaptok_prune_layers = tuple(prune_layers)
        self._adaptok_fuse = fuse

    # ---------------------------------------------------------- embedding

    def _prefix_and_pos(self, grid: tuple) -> tuple:
        """``(prefix [n, C] or None, pos [gh * gw, C] or None)`` for a patch
        grid ``(gh, gw)``: the prefix tokens with their position embedding,
        and the patch position table, resampled from the model's own table
        as timm does for other image sizes.

        Resampled tables are cached per grid while no gradient is recorded.
        The key holds the parameters' version counters, so in-place updates
        (optimizer steps, ``load_state_dict``, EMA) invalidate it; writes
        through ``.data`` do not: call :meth:`clear_position_cache` after
        those."""
        native = tuple(self.patch_embed.grid_size)
        tokens = [t for t in (self.cls_token, getattr(self, "dist_token", None), self.reg_token) if t is not None]
        params = [t for t in (*tokens, self.pos_embed) if t is not None]
        cacheable = grid != native and self.pos_embed is not None and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in params))
        if cacheable:
            key = (grid, tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
            cache = self.__dict__.setdefault("_adaptok_tables", {})
            if key in cache:
                return cache[key]
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
            cache[key] = (prefix, pos)
            self.__dict__["_adaptok_tables"] = cache
        return prefix, pos

    def clear_position_cache(self) -> None:
        """Forget the position tables resampled for other grids."""
        self.__dict__.pop("_adaptok_tables", None)

    def _patchify(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` at any multiple of the patch size -> ``[B, P, C]``
        with the model's patch projection and norm (timm's check of the
        image size is what this skips)."""
        return self.patch_embed.norm(self.patch_embed.proj(images).flatten(2).transpose(1, 2))

    def embed(self, x: Tensor, grid=None) -> tuple[RaggedBatch, Optional[list]]:
        """Images to the packed token batch the blocks run on.

        Args:
            x: ``[B, 3, H, W]`` images.
            grid: None (every image at the model's grid), or the token grid
                side of each image (an int for all, or ``[B]`` ints).

        Returns:
            ``(batch, order)``: a :class:`RaggedBatch` of ``[T, C]`` tokens
            and, with ``grid``, ``order[i]``, the image that sequence i holds
            (images are grouped by grid, largest first); None without.
        """
        if grid is None:
            patches = self.patch_embed(x)
            if patches.dim() == 4:  # NHWC (dynamic image size)
                grids = [tuple(patches.shape[1:3])]
                patches = patches.flatten(1, 2)
            else:
                grids = [tuple(self.patch_embed.grid_size)]
            groups, order, tags = [patches], None, None
        else:
            groups, order, grids, tags = self._embed_grids(x, grid)
        tables = [self._prefix_and_pos(g) for g in grids]
        prefix = tables[0][0]
        pos = [p for _, p in tables] if tables[0][1] is not None else None
        # Under autocast the convolution returns bf16/fp16 while the tables
        # stay fp32; timm's sum promotes, so the stream is fp32. Match it.
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in (*groups, *(pos or ()), prefix)
                                                       if t is not None])
        groups = [p.to(dtype) for p in groups]
        pos = None if pos is None else [p.to(dtype) for p in pos]
        prefix = None if prefix is None else prefix.to(dtype)
        values = pack_patches(groups, pos, prefix)
        if self.pos_embed is not None:  # timm applies pos_drop only with a position table
            values = self.pos_drop(values)
        batch = RaggedBatch._unchecked(values, sequence_lengths(groups, prefix), tags)
        batch = self._patch_drop(batch)
        return batch.with_values(self.norm_pre(batch.values)), order

    def _embed_grids(self, x: Tensor, grid):
        if x.dim() != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {tuple(x.shape)}")
        ph, pw = self.patch_embed.patch_size
        gh, gw = self.patch_embed.grid_size
        if gh != gw:
            raise UnsupportedModelError(f"grid= needs a square patch grid, this model's is {gh}x{gw}")
        sides = _host_grid(grid, x.shape[0])
        members: dict[int, list[int]] = {}
        for i, g in enumerate(sides):
            members.setdefault(g, []).append(i)
        groups, order, grids, tags = [], [], [], []
        for g in sorted(members, reverse=True):
            idx = members[g]
            images = _take(x, idx)
            size = (g * ph, g * pw)
            images = resize_images(images, size)
            groups.append(self._patchify(images))
            order += idx
            grids.append((g, g))
            tags += [g] * len(idx)
        return groups, order, grids, torch.tensor(tags, dtype=torch.int32).to(x.device, non_blocking=True)

    def _patch_drop(self, x: RaggedBatch) -> RaggedBatch:
        if isinstance(self.patch_drop, nn.Identity) or not self.training:
            return x
        if not x.is_uniform:
            raise UnsupportedModelError("patch dropout (patch_drop_rate > 0) in training needs one grid for all images")
        out = self.patch_drop(x.values.view(x.batch_size, x.max_seqlen, -1))
        return RaggedBatch._unchecked(out.reshape(-1, out.shape[-1]), (out.shape[1],) * x.batch_size, x.grid)

    # ------------------------------------------------------------- forward

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: refuse with the alternatives."""
        raise UnsupportedModelError(_NO_TORCHSCRIPT.format(what="torch.jit.script"))

    def _check_not_traced(self) -> None:
        if torch.jit.is_tracing():
            raise UnsupportedModelError(_NO_TORCHSCRIPT.format(what="torch.jit.trace"))

    def _forward_tokens(self, x: Tensor, grid) -> tuple[RaggedBatch, Optional[list]]:
        batch, order = self.embed(x, grid)
        # Parity on a uniform batch: every block is timm's on the [B, N, C]
        # view, so the blocks take that tensor (no per-block RaggedBatch).
        h = batch.values.view(batch.batch_size, batch.max_seqlen, -1) if (
            self._adaptok_keep_rate is None and batch.is_uniform) else batch
        checkpoint = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        for blk in self.blocks:
            h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False) if checkpoint else blk(h)
        values = h.values if isinstance(h, RaggedBatch) else h.reshape(batch.values.shape)
        return batch.with_values(self.norm(values)) if isinstance(h, Tensor) else h.with_values(self.norm(values)), order

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, *,
                         grid=None):
        """Images ``[B, 3, H, W]`` to final tokens: ``[B, N, C]`` when every
        sequence has the same length, else a :class:`RaggedBatch` (in input
        order)."""
        if attn_mask is not None or is_causal:
            self._plain_only("attn_mask or is_causal", grid)
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        self._check_not_traced()
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 0:
            return self._empty_features(x, grid)
        batch, order = self._forward_tokens(x, grid)
        if order is not None and order != sorted(order):
            batch = batch.index_select(_inverse(order))
        return batch.values.view(batch.batch_size, batch.max_seqlen, -1) if batch.is_uniform else batch

    def forward_head(self, x, pre_logits: bool = False):
        """timm's head, also on a :class:`RaggedBatch`: run on each run of
        equal-length sequences (one per grid) as a ``[b, n, C]`` view, so
        every timm pooling and head applies as it is."""
        if not isinstance(x, RaggedBatch):
            return super().forward_head(x, pre_logits=pre_logits)
        C = x.values.shape[-1]
        outs = [super(AdaptiveViTMixin, self).forward_head(x.values[s:s + b * n].view(b, n, C), pre_logits=pre_logits)
                for s, b, n in _runs(x.lengths)]
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
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 0:  # what timm returns: [0, classes]
            return self.forward_head(self._empty_features(x, grid))
        batch, order = self._forward_tokens(x, grid)
        out = self.forward_head(batch)
        if order is None or order == sorted(order):
            return out
        inverse = _inverse(order)
        return tuple(_take(o, inverse) for o in out) if isinstance(out, tuple) else _take(out, inverse)

    def _empty_features(self, x: Tensor, grid) -> Tensor:
        """``[0, N, C]``: the final tokens of an empty batch, N as the grid
        and the keep rates leave it (timm runs empty batches too)."""
        if grid is None:
            return super().forward_features(x)
        _host_grid(grid, 0)  # the same checks as for a full batch
        try:
            side = operator.index(grid)
        except TypeError:  # no image, so no grid: the model's own
            side = self.patch_embed.grid_size[0]
        if self.patch_embed.grid_size[0] != self.patch_embed.grid_size[1]:
            raise UnsupportedModelError(f"grid= needs a square patch grid, this model's is "
                                        f"{self.patch_embed.grid_size[0]}x{self.patch_embed.grid_size[1]}")
        h = x.new_zeros((0, self.num_prefix_tokens + side * side, self.embed_dim), dtype=self.pos_embed.dtype
                        if self.pos_embed is not None else self.patch_embed.proj.weight.dtype)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)

    def forward_intermediates(self, *args, **kwargs):
        """timm's, in parity mode only: its feature maps assume every patch
        token in place."""
        self._plain_only("forward_intermediates", None)
        return super().forward_intermediates(*args, **kwargs)

    def _plain_only(self, what: str, grid) -> None:
        if grid is not None or self._adaptok_keep_rate is not None:
            raise UnsupportedModelError(f"{what} cannot be combined with grid= or a keep_rate")


def resize_images(images: Tensor, size: tuple) -> Tensor:
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


def _take(x: Tensor, idx: Sequence[int]) -> Tensor:
    """``x[idx]`` for host indices: a view when they are a range, else a
    gather whose index is copied to the device without a sync."""
    if list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return x[idx[0]:idx[0] + len(idx)]
    return x[torch.tensor(idx).to(x.device, non_blocking=True)]


def _inverse(order: Sequence[int]) -> list[int]:
    """The permutation that undoes ``order``: ``order[inverse[i]] = i``."""
    inverse = [0] * len(order)
    for i, j in enumerate(order):
        inverse[j] = i
    return inverse


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
        if type(norm) not in _TOKEN_NORMS:
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
            if type(norm) not in _TOKEN_NORMS:
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
    _check_keep_rate(keep_rate, prune_layers, model)
    model.__class__ = _PATCHED.get(type(model), type(model))
    for blk in model.blocks:
        blk.__class__ = AdaptiveBlock
        blk.attn.__class__ = AdaptiveAttention
    model._configure(keep_rate, prune_layers, bool(fuse_inattentive))
    return model
