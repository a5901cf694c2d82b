"""CF-ViT (Chen et al.): a coarse pass on half-resolution tokens for every
image, and a fine pass that re-splits only the informative coarse patches of
the images the coarse pass was not sure of.

:func:`convert` turns a timm ViT (patched by adaptok or not) into a
:class:`CFViT` in place. Both passes share every weight but the position
tables: the model's own table serves the fine grid (its own, e.g. 14x14) and
a learned ``coarse_pos_embed`` the coarse grid (half the side, 7x7), started
by resampling the model's. A call ``model(images, eta=0.7)``:

1. resizes the images to half their size (bilinear with antialiasing, as
   ``grid=`` does, or the official code's ``align_corners=True`` without
   antialiasing: ``resize="official"``) and runs every image on the coarse
   grid in one batch, keeping each block's class attention (the fused
   kernels' ``cls_attn``, never an N x N map) and folding it into the global
   class attention ``g = beta g + (1 - beta) a_k`` from block ``start`` on;
2. lets the images whose coarse max softmax is at least ``eta`` exit (one
   host sync: how many are left);
3. for the rest, builds the fine sequences in one op
   (:func:`adaptok.ops.fine_tokens`): the top ``ceil(alpha Nc)`` coarse
   patches by ``g`` become their 4 fine patches (the full-resolution patch
   embedding, the fine position table, and feature reuse: LayerNorm + MLP
   on the final coarse tokens, added to the 4 fine patches of their coarse
   patch), the others keep their coarse input embedding; and runs them in
   one batch.

Logits come back in input order. ``model(images, stages=True)`` runs both
passes on every image and returns ``(coarse, fine)`` logits: CF-ViT's
training step (:func:`loss`) and the offline eta sweep.

Example::

    >>> model = adaptok.models.cfvit.create("deit_small_patch16_224")
    >>> logits, exited = model(images, eta=0.7, return_exits=True)
    >>> coarse, fine = model(images, stages=True)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import blocks_macs, linear
from ..errors import UnsupportedModelError
from ..layout import resize_images
from ..nn.layout_aware import apply
from ..ops.fine_tokens import fine_tokens
from ..ops.pack_patches import pack_patches
from ..ragged import RaggedBatch
from ..timm_vit import AdaptiveVisionTransformer

ALPHA, BETA, START = 0.5, 0.99, 3
SELECTIONS = ("global", "negative", "random")
RESIZES = ("antialias", "official")
NO_KEEP_RATE = "CF-ViT with a keep rate is not supported (it chooses its own tokens)"


def _check_unit(value, name: str, closed: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value <= 1 if closed else 0 <= value < 1):
        raise ValueError(f"{name} must be a number in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)


def check_options(*, alpha=None, beta=None, selection=None, resize=None) -> None:
    """The options that do not depend on the model (errors name them)."""
    if alpha is not None:
        _check_unit(alpha, "alpha")
    if beta is not None:
        _check_unit(beta, "beta", closed=False)
    if selection is not None and selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if resize is not None and resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")


def _check_start(start, depth: int) -> int:
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < depth:
        raise ValueError(f"start must be a block index in [0, {depth - 1}] (depth {depth}), got {start!r}")
    return start


def confidence(coarse: Tensor) -> Tensor:
    """``[B]`` float64: the coarse max softmax (computed in fp32, or in the
    logits' dtype if wider) an image exits on, from the coarse logits
    ``[B, classes]``."""
    return coarse.to(torch.promote_types(coarse.dtype, torch.float32)).softmax(-1).amax(-1).double()


def exits(coarse: Tensor, eta: float) -> Tensor:
    """``[B]`` bool: the images whose coarse pass is sure enough to exit,
    ``confidence(coarse) >= eta`` (compared in float64). The one exit rule:
    the model, :func:`eta_sweep` and the official-style baseline use it."""
    return confidence(coarse) >= eta


def eta_sweep(coarse: Tensor, fine: Tensor, labels: Tensor, etas, stage_macs) -> dict:
    """CF-ViT at every exit threshold from saved outputs (the paper's
    curve), without running the model again: an image exits with its coarse
    prediction when its :func:`confidence` is at least eta, else takes the
    fine one and pays for both passes (:func:`adaptok.routing.cascade_outcome`,
    a two-stage cascade).

    Args:
        coarse, fine: ``[N, classes]`` logits of both passes of every image
            (``model(images, stages=True)``).
        labels: ``[N]``.
        etas: ``[E]`` thresholds.
        stage_macs: ``(coarse, fine)`` MACs of one image
            (:meth:`CFViT.stage_macs`).

    Returns:
        ``{"eta": [E], "top1": [E] %, "gmacs": [E] per image, "exited": [E] %}``
        (float64 tensors).
    """
    from ..routing import cascade_outcome

    etas = torch.as_tensor(etas, dtype=torch.float64).reshape(-1).cpu()
    if etas.numel() and not bool(((etas >= 0) & (etas <= 1)).all()):
        raise ValueError(f"etas must be in [0, 1], got {etas.tolist()}")
    labels = labels.cpu()
    conf = confidence(coarse).cpu()
    correct = torch.stack([coarse.argmax(-1).cpu() == labels, fine.argmax(-1).cpu() == labels], 1)
    right, spent, exit_ = cascade_outcome(torch.stack([conf, torch.ones_like(conf)], 1), correct,
                                          torch.tensor([float(m) for m in stage_macs], dtype=torch.float64),
                                          etas[:, None])
    return {"eta": etas, "top1": 100.0 * right.double().mean(1), "gmacs": spent.mean(1) / 1e9,
            "exited": 100.0 * (exit_ == 0).double().mean(1)}


def pick_eta(coarse: Tensor, fine: Tensor, labels: Tensor, min_top1: Optional[float] = None) -> Optional[dict]:
    """An exit threshold chosen on these images (training or calibration
    data) from both passes' logits ``[N, classes]``: the lowest whose top-1
    reaches ``min_top1`` %, or with ``min_top1=None`` the most accurate (the
    lowest among ties). The candidates are 0, 1 and every image's
    confidence. Returns ``{"eta", "top1"}``, or None when no threshold
    reaches ``min_top1``."""
    etas = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), confidence(coarse).cpu()]).unique()
    top1 = eta_sweep(coarse, fine, labels, etas, (0, 0))["top1"]
    if min_top1 is None:
        i = int(top1.argmax())  # the first maximum: the lowest eta
    else:
        reach = (top1 >= min_top1 - 1e-9).nonzero()
        if reach.numel() == 0:
            return None
        i = int(reach[0])
    return {"eta": float(etas[i]), "top1": float(top1[i])}


def check_eta(eta) -> Optional[float]:
    """``eta`` in [0, 1], or None (no image exits); errors name ``eta``."""
    return None if eta is None else _check_unit(eta, "eta")


class CFViT(AdaptiveVisionTransformer):
    """A patched timm ViT that runs CF-ViT's two passes (see the module
    docstring); made by :func:`convert`.

    Attributes (set by :func:`convert`, changed with :meth:`configure`):
    ``alpha`` (share of coarse patches re-split), ``beta`` and ``start``
    (the global class attention), ``selection`` (``"global"``; the
    ablations ``"negative"``, the lowest scores, and ``"random"``),
    ``resize``, ``eta`` (the exit threshold a call uses by default; None:
    no exit), and ``split_all`` (re-split every patch: the first part of
    training). ``reuse`` is the feature-reuse module (None: off).
    """

    timm_parity = False
    alpha: float = ALPHA
    beta: float = BETA
    start: int = START
    selection: str = "global"
    resize: str = "antialias"
    eta: Optional[float] = None
    split_all: bool = False

    def configure(self, *, alpha=None, beta=None, start=None, selection=None, resize=None, eta=...) -> None:
        """Change the options given (checked; errors name them)."""
        check_options(alpha=alpha, beta=beta, selection=selection, resize=resize)
        if alpha is not None:
            self.alpha = float(alpha)
        if beta is not None:
            self.beta = float(beta)
        if start is not None:
            self.start = _check_start(start, len(self.blocks))
        if selection is not None:
            self.selection = selection
        if resize is not None:
            self.resize = resize
        if eta is not ...:
            self.eta = check_eta(eta)

    def _configure(self, keep_rate, prune_layers, fuse: bool) -> None:
        if keep_rate is not None:
            raise UnsupportedModelError(NO_KEEP_RATE)
        super()._configure(keep_rate, prune_layers, fuse)

    # ------------------------------------------------------------ grids

    def grids(self, images: Tensor) -> tuple[tuple, tuple]:
        """``(coarse (h, w), fine (2h, 2w))`` patch grids of ``images``."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {getattr(images, 'shape', type(images))}")
        ph, pw = self.patch_embed.patch_size
        H, W = images.shape[-2:]
        if H % (2 * ph) or W % (2 * pw) or H == 0 or W == 0:
            raise ValueError(f"images must be a multiple of 2 x the patch size ({2 * ph}x{2 * pw}) on each side, so "
                             f"that the fine grid splits into 2x2 children of the coarse grid; got {H}x{W}")
        return (H // (2 * ph), W // (2 * pw)), (H // ph, W // pw)

    def _coarse_tables(self, grid: tuple) -> tuple[Tensor, Tensor]:
        """``(prefix [n, C], pos [h w, C])`` of the coarse grid."""
        from timm.layers import resample_abs_pos_embed

        table = self.coarse_pos_embed
        n_pos = 0 if self.no_embed_class else self.num_prefix_tokens
        if grid != self.coarse_grid:
            table = resample_abs_pos_embed(table, new_size=list(grid), old_size=list(self.coarse_grid),
                                           num_prefix_tokens=n_pos)
        table = table[0]
        tokens = [t for t in (self.cls_token, self.reg_token) if t is not None]
        prefix = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
        if n_pos:
            prefix = prefix + table[:n_pos]
        return prefix, table[n_pos:]

    @property
    def coarse_grid(self) -> tuple:
        gh, gw = self.patch_embed.grid_size
        return gh // 2, gw // 2

    def _fine_patches(self, images: Tensor) -> Tensor:
        """``[B, 4 Nc, C]`` patch embeddings at full resolution, channels
        contiguous (the convolution runs channels-last, so no copy)."""
        out = self.patch_embed.proj(images.contiguous(memory_format=torch.channels_last))
        return self.patch_embed.norm(out.flatten(2).transpose(1, 2))

    # ----------------------------------------------------------- passes

    def _blocks(self, batch: RaggedBatch, collect: bool) -> tuple[RaggedBatch, Optional[Tensor]]:
        """The blocks on a uniform batch of B sequences of N tokens; with
        ``collect``, also the global class attention ``[B, N - n]``. The
        blocks whose class attention is collected take the packed path; the
        others run timm's block on the dense view. Both use the attention
        formulation measured per shape (:mod:`adaptok.nn.attention`)."""
        B, N, n = batch.batch_size, batch.max_seqlen, self.num_prefix_tokens
        g = None
        for k, blk in enumerate(self.blocks):
            if collect and k >= self.start:
                batch, a = blk._forward_packed(batch, need_cls=True)
                a = a.view(B, N)[:, n:]
                g = (1 - self.beta) * a if g is None else self.beta * g + (1 - self.beta) * a
            else:
                batch = blk(batch)
        return batch.with_values(apply(self.norm, batch.values, batch)), g

    def _coarse(self, x: Tensor, grid: tuple):
        """The coarse pass: ``(logits [B, K], inputs [B, Nc, C], final
        [B, Nc, C], score [B, Nc])``: the coarse input embeddings, the final
        coarse patch tokens and the global class attention."""
        B, n = x.shape[0], self.num_prefix_tokens
        ph, pw = self.patch_embed.patch_size
        size = (grid[0] * ph, grid[1] * pw)
        if self.resize == "official":
            small = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        else:
            small = resize_images(x, size)
        patches = self._patchify(small)
        prefix, pos = self._coarse_tables(grid)
        values = self.pos_drop(pack_patches([patches], [pos.to(patches.dtype)], prefix.to(patches.dtype)))
        Nc = grid[0] * grid[1]
        inputs = values.view(B, n + Nc, -1)[:, n:]
        batch = RaggedBatch.from_lengths(self.norm_pre(values), (n + Nc,) * B)
        batch, g = self._blocks(batch, collect=self.selection != "random")
        final = batch.values.view(B, n + Nc, -1)[:, n:]
        return self.forward_head(batch), inputs, final, g

    def keep(self, coarse_patches: int) -> int:
        """Coarse patches re-split per image: ``ceil(alpha Nc)`` (all of them
        with ``split_all``)."""
        if self.split_all:
            return coarse_patches
        return min(coarse_patches, math.ceil(self.alpha * coarse_patches - 1e-9))

    def _fine(self, x: Tensor, inputs: Tensor, final: Tensor, score: Optional[Tensor], grid: tuple,
              fine_grid: tuple) -> Tensor:
        """The fine pass of images ``x [R, 3, H, W]`` from their coarse pass's
        ``inputs``, ``final`` tokens and ``score``: logits ``[R, K]``."""
        R, Nc = inputs.shape[:2]
        fine = self._fine_patches(x)
        prefix, pos = self._prefix_and_pos(fine_grid)
        dt = fine.dtype
        if score is None or self.selection == "random":
            score = torch.rand(R, Nc, device=x.device)
        elif self.selection == "negative":
            score = -score
        reuse = self.reuse(final).to(dt) if self.reuse is not None else None
        tokens, _ = fine_tokens(fine, inputs.to(dt), score, self.keep(Nc), grid, pos=pos.to(dt),
                                prefix=prefix.to(dt), reuse=reuse)
        L = tokens.shape[1]
        batch = RaggedBatch.from_lengths(self.norm_pre(tokens.reshape(R * L, -1)), (L,) * R)
        batch, _ = self._blocks(batch, collect=False)
        return self.forward_head(batch)

    # ---------------------------------------------------------- forward

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, *, grid=None,
                eta=..., return_exits: bool = False, stages: bool = False):
        """``x [B, C, H, W]`` -> logits ``[B, classes]`` in input order.

        Args:
            eta: exit threshold on the coarse max softmax, in [0, 1] (an
                image exits when it is at least eta), or None (none exits);
                default the model's ``eta``.
            return_exits: also return ``exited [B]`` (bool, on the device).
            stages: return ``(coarse, fine)`` logits ``[B, classes]`` of
                every image (no exit): the training step and the sweep.
        """
        if attn_mask is not None or is_causal or grid is not None:
            raise UnsupportedModelError("CF-ViT chooses its own token grids: grid=, attn_mask and is_causal are "
                                        "not supported")
        self._check_not_traced()
        eta = self.eta if eta is ... else check_eta(eta)
        grid, fine_grid = self.grids(x)
        B = x.shape[0]
        if B == 0:
            empty = x.new_zeros((0, self.num_classes))
            return (empty, empty) if stages else ((empty, empty.bool()[:, 0]) if return_exits else empty)
        coarse, inputs, final, score = self._coarse(x, grid)
        if stages:
            return coarse, self._fine(x, inputs, final, score, grid, fine_grid)
        if eta is None:
            stay = torch.ones(B, dtype=torch.bool, device=x.device)
        else:
            stay = ~exits(coarse, eta)
        idx = stay.nonzero().squeeze(1)  # the one host sync: how many images go on
        R = idx.shape[0]
        out = coarse
        if R == B:
            out = self._fine(x, inputs, final, score, grid, fine_grid).to(coarse.dtype)
        elif R > 0:
            pick = (lambda t: None if t is None else t.index_select(0, idx))
            fine = self._fine(x.index_select(0, idx), pick(inputs), pick(final), pick(score), grid, fine_grid)
            out = coarse.index_copy(0, idx, fine.to(coarse.dtype))
        return (out, ~stay) if return_exits else out

    def stage_macs(self, images: Optional[Tensor] = None) -> tuple[int, int]:
        """``(coarse, fine)`` multiply-accumulates of one image (of the
        model's size, or of ``images``'): the coarse pass (patch embedding,
        blocks, head), and what the fine pass adds (the full-resolution
        patch embedding of every fine patch, the reuse MLP on every coarse
        patch, blocks on ``n + Nc + 3K`` tokens, head). Norms, the softmax
        and the selection are not counted, as :func:`adaptok.macs` does."""
        if images is None:
            (gh, gw), (fh, fw) = self.coarse_grid, tuple(self.patch_embed.grid_size)
        else:
            (gh, gw), (fh, fw) = self.grids(images)
        Nc, n = gh * gw, self.num_prefix_tokens
        key = (gh, gw, self.keep(Nc), self.reuse is not None)
        cache = self.__dict__.setdefault("_stage_macs", {})
        if key in cache:
            return cache[key]
        conv = self.patch_embed.proj.weight.numel()
        reuse = 0 if self.reuse is None else linear(self.reuse)
        head = linear(self) - linear(self.blocks) - linear(self.patch_embed) - reuse
        coarse = Nc * conv + blocks_macs(self, n + Nc) + head
        fine = fh * fw * conv + Nc * reuse + blocks_macs(self, n + Nc + 3 * self.keep(Nc)) + head
        cache[key] = coarse, fine
        return coarse, fine

    @torch.no_grad()
    def forward_with_macs(self, images: Tensor, grid=None) -> tuple[Tensor, Tensor]:
        """``(logits [B, K], macs [B] int64 on the device)``: each image's
        coarse pass, plus the fine pass where it did not exit (at the model's
        ``eta``)."""
        logits, exited = self(images, grid=grid, return_exits=True)
        coarse, fine = self.stage_macs(images)  # cached per grid and keep count
        both = torch.full_like(exited, coarse + fine, dtype=torch.int64)
        return logits, both.masked_fill_(exited, coarse)  # on the device: no second sync

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, start={self.start}, selection={self.selection!r}, "
                f"eta={self.eta}, feature_reuse={self.reuse is not None}")


def is_cfvit(model: nn.Module) -> bool:
    return isinstance(model, CFViT)


def convert(model: nn.Module, *, alpha: float = ALPHA, beta: float = BETA, start: int = START,
            feature_reuse: bool = True, selection: str = "global", resize: str = "antialias",
            eta: Optional[float] = None) -> nn.Module:
    """Make a timm ViT (patched by :func:`adaptok.patch` or not) a CF-ViT in
    place, from its current weights.

    Args:
        model: a timm ``VisionTransformer`` that ``adaptok.patch`` supports,
            with a class token, a position table, an even square patch grid
            (the fine grid; the coarse one is half its side), no keep rate and
            no position or patch dropout.
        alpha: the share of coarse patches re-split, in [0, 1] (CF-ViT: 0.5).
        beta: the global class attention's decay, in [0, 1) (0.99).
        start: the first block whose class attention counts (3).
        feature_reuse: add the reuse module (LayerNorm + MLP D -> 4D -> D).
        selection: ``"global"``; ``"negative"`` or ``"random"`` (ablations).
        resize: ``"antialias"`` or ``"official"`` (bilinear,
            ``align_corners=True``, no antialiasing: the official code's).
        eta: the default exit threshold (None: no exit).

    Returns:
        ``model``, now a :class:`CFViT`.
    """
    from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
    from timm.models.deit import VisionTransformerDistilled

    from ..timm_vit import patch

    if is_cfvit(model):
        raise ValueError("model is a CF-ViT already")
    if isinstance(model, VisionTransformerDistilled):
        raise UnsupportedModelError("CF-ViT on a model with a distillation token is not supported")
    if getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError("CF-ViT needs a class token: its class attention picks the patches to re-split")
    if getattr(model, "pos_embed", None) is None:
        raise UnsupportedModelError("CF-ViT needs a position table (it learns one per grid)")
    if getattr(model, "_adaptok_keep_rate", None) is not None:
        raise UnsupportedModelError(NO_KEEP_RATE)
    if model.pos_drop.p > 0 or not isinstance(model.patch_drop, nn.Identity):
        raise UnsupportedModelError("CF-ViT does not support position or patch dropout (pos_drop_rate, "
                                    "patch_drop_rate): the fine sequence reuses coarse input embeddings")
    gh, gw = model.patch_embed.grid_size
    if gh != gw or gh % 2:
        raise UnsupportedModelError(f"CF-ViT needs an even square patch grid (the fine grid), this model's is "
                                    f"{gh}x{gw}")
    check_options(alpha=alpha, beta=beta, selection=selection, resize=resize)
    check_eta(eta)
    _check_start(start, len(model.blocks))
    patch(model)  # every argument checked first: a refused call leaves the model as it was
    model.__class__ = CFViT
    model.configure(alpha=alpha, beta=beta, start=start, selection=selection, resize=resize, eta=eta)
    model.split_all = False
    n_pos = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        table = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[gh // 2, gw // 2], old_size=[gh, gw],
                                       num_prefix_tokens=n_pos)
    model.coarse_pos_embed = nn.Parameter(table.clone())
    if feature_reuse:
        C = model.embed_dim
        ref = model.patch_embed.proj.weight
        reuse = nn.Sequential(nn.LayerNorm(C, eps=1e-6), Mlp(C, 4 * C, C)).to(ref.device, ref.dtype)
        for m in reuse.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        model.reuse = reuse
    else:
        model.reuse = None
    model.clear_position_cache()
    return model


def create(model_name: str, *, checkpoint: Optional[str] = None, alpha: float = ALPHA, beta: float = BETA,
           start: int = START, feature_reuse: bool = True, selection: str = "global", resize: str = "antialias",
           eta: Optional[float] = None, **timm_kwargs) -> nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` (``pretrained=True``
    loads timm's weights) converted to a CF-ViT (:func:`convert`);
    ``checkpoint``: a lab checkpoint or state dict of a CF-ViT of the same
    shape."""
    import timm

    model = convert(timm.create_model(model_name, **timm_kwargs), alpha=alpha, beta=beta, start=start,
                    feature_reuse=feature_reuse, selection=selection, resize=resize, eta=eta)
    if checkpoint is not None:
        from ..train.loop import load_weights

        load_weights(model, checkpoint)
    return model


# ------------------------------------------------------------------ training


def loss(model, images: Tensor, targets: Tensor, criterion) -> Tensor:
    """CF-ViT's training loss: ``CE(fine, y) + KL(p_fine || p_coarse)``, the
    fine side detached in the KL, the coarse side not (so the KL trains the
    coarse pass, and the CE also reaches it through feature reuse).
    ``criterion`` is the loop's (label smoothing, soft targets)."""
    coarse, fine = model(images, stages=True)
    kl = F.kl_div(F.log_softmax(coarse.float(), -1), F.log_softmax(fine.detach().float(), -1),
                  reduction="batchmean", log_target=True)
    return criterion(fine, targets) + kl
