"""ReViT (Zhu et al.): one ViT for several token lengths, trained in one
packed pass, with a Token-Length Assigner choosing each image's length.

:func:`convert` turns a patched timm ViT into a :class:`ReViT` in place.
Every length shares the attention and MLP weights; each length has

- its own LayerNorms (TAL-LN, :class:`adaptok.nn.TokenLengthLayerNorm`, in
  every block's ``norm1``/``norm2`` and the final ``norm``), all started
  from the model's;
- its own position table (the model's own grid keeps ``pos_embed``; the
  other grids get ``pos_tables[str(g)]``, started by resampling it);
- optionally its own patch embedding (``patch_embeds[str(g)]``, a copy of
  the model's; default: shared);
- on the shorter lengths only, a distillation token (``dist_token``, after
  the prefix tokens) read by ``head_dist``; the longest length (the
  teacher) has none. At inference a student's logits are the mean of its
  two heads (DeiT's rule); with ``model.distilled_training`` set and the
  model training, they are the pair ``(head, head_dist)``.

Images run at a length by being resized to ``g * patch`` pixels (what
``grid=`` does), so one patch convolution serves every length.
``model(images, grid=g)`` packs every image at its grid (an int or one per
image) into one ragged batch; ``grid="auto"`` asks the attached
:class:`TokenLengthAssigner`; ``grid="all"`` runs every image at every
length in one pass and returns ``{g: logits}`` (the one-pass training step,
:func:`loss`). :func:`algorithm1_backward` is the paper's Algorithm 1 as
written, one forward and backward per length: the reference the one-pass
step is tested against.

Example::

    >>> model = adaptok.models.revit.create("deit_small_patch16_224", grids=(14, 10, 7))
    >>> out = model(images, grid="all")                 # {14: [B, K], 10: [B, K], 7: [B, K]}
    >>> logits = model(images, grid=[7, 14, 10, 7])     # one packed pass
    >>> model.set_assigner(TokenLengthAssigner(timm.create_model("tinynet_e", num_classes=3), (14, 10, 7), 224))
    >>> logits = model(images, grid="auto")
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import macs
from ..errors import UnsupportedModelError
from ..layout import host_grid
from ..nn.attention import runs
from ..nn.patch_embed import embed_patches
from ..ragged import RaggedBatch
from ..routing import Router, cheapest_correct, save_labels  # noqa: F401  (save_labels: ReViT's labels file)
from ..timm_vit import AdaptiveVisionTransformer, AdaptiveViTMixin

GRIDS = (14, 10, 7)
DISTILLATION = ("soft", "hard")
NO_KEEP_RATE = ("ReViT with a keep rate is not supported (EViT ranks tokens after a fixed prefix; ReViT's prefix "
                "differs per length)")
# Defaults of the student loss (1 - lam) * CE + lam * tau^2 * KL. The paper
# gives no lambda; tau is 0.5 or 0.9 in its Table 2 and 5 in its text: 0.9
# is the table's best for the shorter lengths. lam = 0.5 weighs label and
# teacher alike, as DeiT's hard distillation does.
LAMBDA = 0.5
TAU = 0.9


def check_grids(grids: Sequence[int]) -> tuple:
    """``grids`` as distinct ints >= 1, largest first; errors name ``grids``."""
    if isinstance(grids, (str, bytes)) or not isinstance(grids, Sequence) or not grids:
        raise TypeError(f"grids must be a non-empty sequence of token grid sides, got {grids!r}")
    sides = host_grid(list(grids), len(grids))
    if len(set(sides)) != len(sides):
        raise ValueError(f"grids must be distinct, got {tuple(grids)}")
    return tuple(sorted(sides, reverse=True))


def check_loss_args(lam: float, tau: float, distillation: str) -> None:
    """Errors naming ``lam``, ``tau`` or ``distillation``."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if distillation not in DISTILLATION:
        raise ValueError(f"distillation must be one of {DISTILLATION}, got {distillation!r}")


# ------------------------------------------------------------------ the model


# The Token-Length Assigner is adaptok's router: a small classifier whose
# classes are the grids in ascending order, with a cumulative-probability
# threshold (see adaptok.routing.Router).
TokenLengthAssigner = Router


class ReViT(AdaptiveVisionTransformer):
    """A patched timm ViT that runs several token lengths (see the module
    docstring); made by :func:`convert`."""

    revit_grids: tuple = GRIDS
    distilled_training: bool = False
    timm_parity = False  # its own patch embeddings, tables and heads, even at the teacher's grid

    # ---------------------------------------------------------- lengths

    @property
    def teacher_grid(self) -> int:
        return self.revit_grids[0]

    def prefix_count(self, grid: int) -> int:
        """Prefix tokens of a sequence at ``grid`` (the distillation token
        is one of them on the shorter lengths)."""
        return self.num_prefix_tokens + int(self._has_dist(grid))

    def idle_modules(self, grid: int) -> tuple:
        """The assigner (counted apart) and, on the teacher's grid, ``head_dist``."""
        return (self.assigner,) + (() if self._has_dist(grid) else (self.head_dist,))

    def _has_dist(self, grid: int) -> bool:
        return self.dist_token is not None and grid != self.teacher_grid

    def _configure(self, keep_rate, prune_layers, fuse: bool) -> None:
        if keep_rate is not None:
            raise UnsupportedModelError(NO_KEEP_RATE)
        super()._configure(keep_rate, prune_layers, fuse)

    def _check_grids(self, grid, batch: int) -> None:
        sides = set(host_grid(grid, batch))
        bad = sides - set(self.revit_grids)
        if bad:
            raise ValueError(f"grid must be one of this ReViT's grids {self.revit_grids}, got {sorted(bad)}")

    # -------------------------------------------------------- embedding

    def _prefix_and_pos(self, grid: tuple) -> tuple:
        g = grid[0]
        native = tuple(self.patch_embed.grid_size)
        prefix, pos = super()._prefix_and_pos(native)  # the model's own tables, untouched
        if str(g) in self.pos_tables:
            pos = self.pos_tables[str(g)]
        if self._has_dist(g):
            dist = self.dist_token.reshape(1, -1).to(prefix.dtype)
            prefix = torch.cat((prefix, dist)) if prefix is not None else dist
        return prefix, pos

    def _patchify(self, images: Tensor, grid=None) -> Tensor:
        embed = self.patch_embeds[str(grid)] if grid is not None and str(grid) in self.patch_embeds else \
            self.patch_embed
        return embed_patches(embed, images)

    # ------------------------------------------------------------- head

    def _grid_of_length(self, n: int) -> int:
        for g in self.revit_grids:
            if self.prefix_count(g) + g * g == n:
                return g
        raise ValueError(f"a sequence of {n} tokens is at none of this ReViT's grids {self.revit_grids}")

    def _head(self, x: Tensor, pre_logits: bool):
        """``x [b, n, C]``: final tokens of sequences at one grid (with
        ``pre_logits``, the class head's features only)."""
        g = self._grid_of_length(x.shape[1])
        base = super(AdaptiveViTMixin, self).forward_head
        if not self._has_dist(g):
            return base(x, pre_logits=pre_logits)
        d = self.num_prefix_tokens  # the distillation token's index
        rest = x if self.global_pool == "token" and self.attn_pool is None else torch.cat((x[:, :d], x[:, d + 1:]), 1)
        out = base(rest, pre_logits=pre_logits)
        if pre_logits:
            return out
        dist = self.head_dist(self.head_drop(x[:, d]))
        if self.distilled_training and self.training:
            return out, dist
        return (out + dist) / 2

    def forward_head(self, x, pre_logits: bool = False):
        """timm's head on each run of equal-length sequences; on the
        shorter lengths also ``head_dist`` on the distillation token."""
        if not isinstance(x, RaggedBatch):
            return self._head(x, pre_logits)
        C = x.values.shape[-1]
        outs = [self._head(x.values[s:s + b * n].view(b, n, C), pre_logits) for s, b, n in runs(x.lengths)]
        if len(outs) == 1:
            return outs[0]
        if any(isinstance(o, tuple) for o in outs):
            raise ValueError("with distilled_training in training mode, run one grid per call or grid='all'")
        return torch.cat(outs)

    # ---------------------------------------------------------- forward

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, *, grid=None):
        """``x [B, C, H, W]`` -> logits ``[B, classes]`` in input order.

        ``grid``: None (the model's own grid), an int or ``[B]`` ints
        from :attr:`revit_grids`, ``"auto"`` (the assigner decides), or
        ``"all"``: every image at every grid in one packed pass,
        returning ``{g: logits [B, classes]}`` (a student's value is
        ``(head, head_dist)`` under ``distilled_training``)."""
        if isinstance(grid, str):
            if grid == "all":
                return self._forward_all(x)
            if grid != "auto":
                raise ValueError(f"grid must be an int, one int per image, 'auto' or 'all', got {grid!r}")
            grid = self.assign(x).tolist()  # the one sync: the grids set every size
        elif grid is not None and isinstance(x, Tensor) and x.dim() == 4:
            self._check_grids(grid, x.shape[0])
        return super().forward(x, attn_mask, is_causal, grid=grid)

    def _forward_all(self, x: Tensor) -> dict:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {getattr(x, 'shape', type(x))}")
        B = x.shape[0]
        if B == 0:
            return {g: self(x, grid=g) for g in self.revit_grids}
        G = len(self.revit_grids)
        # The layout groups by grid, largest first, in input order: image i
        # at grid k is packed sequence k * B + i, so no order to restore.
        grids = [g for g in self.revit_grids for _ in range(B)]
        self._check_not_traced()
        batch, layout = self._forward_tokens(x.repeat(G, 1, 1, 1), grids)
        assert layout.in_input_order
        C = batch.values.shape[-1]
        out, token = {}, 0
        for g in self.revit_grids:
            n = self.prefix_count(g) + g * g
            out[g] = self._head(batch.values[token:token + B * n].view(B, n, C), False)
            token += B * n
        return out

    # ---------------------------------------------------------- assigner

    def set_assigner(self, assigner: Optional[TokenLengthAssigner]) -> None:
        """Attach the assigner ``grid="auto"`` asks (None detaches it); it
        must have been trained for this model's grids."""
        if assigner is not None:
            if not isinstance(assigner, TokenLengthAssigner):
                raise TypeError(f"assigner must be a TokenLengthAssigner, got {type(assigner).__name__}")
            if set(assigner.grids) != set(self.revit_grids):
                raise ValueError(f"assigner was trained for grids {assigner.grids}, this ReViT runs "
                                 f"{self.revit_grids}")
        self.assigner = assigner


    def assign(self, images: Tensor, threshold: Optional[float] = None) -> Tensor:
        """The assigner's grid for every image ``[B]`` (int64)."""
        if self.assigner is None:
            raise ValueError("grid='auto' needs an assigner: model.set_assigner(TokenLengthAssigner(...))")
        return self.assigner.assign(images, threshold)

    @torch.no_grad()
    @torch.no_grad()
    def forward_with_macs(self, images: Tensor, grid=None) -> tuple[Tensor, Optional[Tensor]]:
        """``(logits [B, K], macs [B] int64 or None)``. With ``grid="auto"``,
        the MACs of what ran on each image, the assigner's included (the
        per-grid counts are computed once); for any other ``grid`` they
        follow from it, so None: :func:`adaptok.evaluate.evaluate` counts
        them outside its timer."""
        if not (isinstance(grid, str) and grid == "auto"):
            return self(images, grid=grid), None
        sides = self.assign(images).tolist()
        logits = self(images, grid=sides)
        per_grid = self.__dict__.setdefault("_adaptok_macs", {})
        for g in set(sides) - set(per_grid):
            per_grid[g] = macs(self, g)
        extra = self.assigner.macs()
        return logits, torch.tensor([per_grid[g] + extra for g in sides], dtype=torch.int64)

    def extra_repr(self) -> str:
        return f"revit_grids={self.revit_grids}"


def is_revit(model: nn.Module) -> bool:
    return isinstance(model, ReViT)


def convert(model: nn.Module, grids: Sequence[int] = GRIDS, *, tal_ln: bool = True, distill_token: bool = True,
            own_patch_embed: bool = False) -> nn.Module:
    """Make a timm ViT (patched by :func:`adaptok.patch` or not) a ReViT in
    place, from its current weights.

    Args:
        model: a timm ``VisionTransformer`` that ``adaptok.patch`` supports,
            with a square patch grid among ``grids`` and no keep rate.
        grids: the token grid sides, e.g. ``(14, 10, 7)``; the largest is the
            teacher.
        tal_ln: per-length LayerNorms (False: the ablation that shares them).
        distill_token: a distillation token and head on the shorter lengths.
        own_patch_embed: a patch embedding per length (the paper's; default
            shared).

    Returns:
        ``model``, now a :class:`ReViT`.
    """
    from timm.layers import trunc_normal_
    from timm.models.deit import VisionTransformerDistilled

    from ..nn.norm import TokenLengthLayerNorm
    from ..timm_vit import patch

    grids = check_grids(grids)
    if is_revit(model):
        raise ValueError("model is a ReViT already")
    if isinstance(model, VisionTransformerDistilled):
        raise UnsupportedModelError("ReViT adds its own distillation token on the shorter lengths; build it from the "
                                    "model without one (e.g. deit_small_patch16_224, not the _distilled_ variant)")
    if getattr(model, "_adaptok_keep_rate", None) is not None:
        raise UnsupportedModelError(NO_KEEP_RATE)
    gh, gw = model.patch_embed.grid_size
    if gh != gw:
        raise UnsupportedModelError(f"ReViT needs a square patch grid, this model's is {gh}x{gw}")
    if gh not in grids:
        raise ValueError(f"grids must include the model's own grid {gh} (its position table's), got {grids}; "
                         f"create the model with img_size = grid * patch size for another")
    patch(model)
    norms = [(model, "norm")] + [(blk, name) for blk in model.blocks for name in ("norm1", "norm2")]
    if tal_ln:
        for owner, name in norms:
            norm = getattr(owner, name)
            if isinstance(norm, nn.Identity) and owner is model:
                continue  # global-pool models normalize in fc_norm, after pooling: shared
            if not isinstance(norm, nn.LayerNorm):
                raise UnsupportedModelError(f"TAL-LN replaces LayerNorms; {name} is a {type(norm).__name__}")
    model.__class__ = ReViT
    model.revit_grids = grids
    model.distilled_training = False
    if tal_ln:
        for owner, name in norms:
            norm = getattr(owner, name)
            if isinstance(norm, nn.LayerNorm):
                setattr(owner, name, TokenLengthLayerNorm.from_layer_norm(norm, grids))
    C = model.embed_dim
    ref = model.patch_embed.proj.weight
    model.pos_tables = nn.ParameterDict()
    model.patch_embeds = nn.ModuleDict()
    if model.pos_embed is not None:
        from timm.layers import resample_abs_pos_embed

        n_pos = 0 if model.no_embed_class else model.num_prefix_tokens
        with torch.no_grad():
            for g in grids:
                if g != gh:
                    table = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[g, g], old_size=[gh, gw],
                                                   num_prefix_tokens=n_pos)[0, n_pos:]
                    model.pos_tables[str(g)] = nn.Parameter(table.clone())
    if own_patch_embed:
        for g in grids:
            if g != gh:
                model.patch_embeds[str(g)] = copy.deepcopy(model.patch_embed)
    if distill_token and len(grids) > 1:
        model.dist_token = nn.Parameter(torch.zeros(1, 1, C, device=ref.device, dtype=ref.dtype))
        trunc_normal_(model.dist_token, std=0.02)
        model.head_dist = copy.deepcopy(model.head)  # starts predicting what the head does
    else:
        model.dist_token = None
        model.head_dist = None
    model.assigner = None
    model.clear_position_cache()
    return model


def create(model_name: str, grids: Sequence[int] = GRIDS, *, tal_ln: bool = True, distill_token: bool = True,
           own_patch_embed: bool = False, checkpoint: Optional[str] = None, **timm_kwargs) -> nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` (``pretrained=True``
    loads timm's weights) converted to a ReViT (:func:`convert`).
    ``checkpoint``: a lab checkpoint or state dict of a ReViT trained with
    the same grids and options."""
    import timm

    model = convert(timm.create_model(model_name, **timm_kwargs), grids, tal_ln=tal_ln,
                    distill_token=distill_token, own_patch_embed=own_patch_embed)
    if checkpoint is not None:
        from ..train.loop import load_weights, read_checkpoint

        ckpt = read_checkpoint(checkpoint)
        trained = ckpt.get("method") if isinstance(ckpt, dict) else None
        if isinstance(trained, dict) and trained.get("method") == "revit":
            want = dict(grids=list(model.revit_grids), tal_ln=tal_ln, distill_token=distill_token,
                        own_patch_embed=own_patch_embed)
            have = {k: list(trained[k]) if k == "grids" else trained.get(k) for k in want}
            if have != want:
                raise ValueError(f"checkpoint {checkpoint!r} holds a ReViT with {have}, not the {want} asked for "
                                 f"(grids and options must match)")
        load_weights(model, checkpoint)
    return model


# ------------------------------------------------------------------ training


def _student_loss(out, teacher: Tensor, targets: Tensor, criterion, lam: float, tau: float,
                  distillation: str) -> Tensor:
    cls, dist = out if isinstance(out, tuple) else (out, out)
    loss = criterion(cls, targets)
    if lam == 0:
        return loss
    t = teacher.detach().float()
    if distillation == "soft":
        kl = F.kl_div(F.log_softmax(dist.float() / tau, -1), F.log_softmax(t / tau, -1), reduction="batchmean",
                      log_target=True)
        return (1 - lam) * loss + lam * tau * tau * kl
    return (1 - lam) * loss + lam * F.cross_entropy(dist.float(), t.argmax(-1))


def losses(outputs: dict, targets: Tensor, criterion, lam: float = LAMBDA, tau: float = TAU,
           distillation: str = "soft") -> dict:
    """The loss of every length: ``{g: scalar}``.

    ``outputs``: ``{g: logits}`` as ``model(images, grid="all")`` returns
    (the largest grid first: the teacher). The teacher takes ``criterion``
    against ``targets``; every student ``(1 - lam) * criterion(head) +
    lam * tau^2 * KL(teacher || head_dist)`` at temperature ``tau``
    (``"soft"``), or ``lam * CE(head_dist, teacher's argmax)`` for the KL
    term (``"hard"``, the paper's "computational-free" variant). The
    teacher's logits are detached."""
    check_loss_args(lam, tau, distillation)
    grids = list(outputs)
    teacher = outputs[grids[0]]
    teacher = teacher[0] if isinstance(teacher, tuple) else teacher
    out = {grids[0]: criterion(teacher, targets)}
    for g in grids[1:]:
        out[g] = _student_loss(outputs[g], teacher, targets, criterion, lam, tau, distillation)
    return out


def loss(model, images: Tensor, targets: Tensor, criterion, lam: float = LAMBDA, tau: float = TAU,
         distillation: str = "soft") -> Tensor:
    """The one-pass training loss: every image at every length in one packed
    forward (``model(images, grid="all")``), the losses of :func:`losses`
    summed (what Algorithm 1 accumulates)."""
    return sum(losses(model(images, grid="all"), targets, criterion, lam, tau, distillation).values())


def algorithm1_backward(model, images: Tensor, targets: Tensor, criterion, lam: float = LAMBDA, tau: float = TAU,
                        distillation: str = "soft") -> float:
    """The paper's Algorithm 1 as written: for each length, largest first,
    one forward at that grid and one ``backward``, gradients accumulating
    (the caller zeroes them before and steps after). Every length is run:
    the paper's loop bound ``len(R) - 1`` would skip the last. Returns the
    summed loss."""
    grids = model.module.revit_grids if hasattr(model, "module") else model.revit_grids
    total, teacher = 0.0, None
    for g in grids:
        out = model(images, grid=g)
        if teacher is None:
            teacher = (out[0] if isinstance(out, tuple) else out).detach()
            value = criterion(out, targets)
        else:
            value = _student_loss(out, teacher, targets, criterion, lam, tau, distillation)
        value.backward()
        total += float(value.detach())
    return total


# ------------------------------------------------------------- the assigner


@torch.no_grad()
def token_length_labels(model: nn.Module, loader, device=None) -> Tensor:
    """The token-length label of every image of ``loader`` (in its order;
    use an unshuffled loader with evaluation transforms): the shortest grid
    at which ``model`` classifies it correctly, the longest when none does.
    One packed pass per batch runs every length. Returns ``[N]`` int64 grid
    sides."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    for images, targets in loader:
        logits = model(images.to(dev), grid="all")
        targets = targets.to(dev)
        ascending = sorted(logits, key=int)
        correct = torch.stack([logits[g].argmax(-1) == targets for g in ascending], 1)  # [b, G]
        out.append(torch.tensor(ascending)[cheapest_correct(correct.cpu())])
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
