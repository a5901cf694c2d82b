"""Routed models and the early-exit cascade they are compared with.

- :class:`RoutedModel`: a router (:class:`adaptok.routing.Router`) picks
  one model per image, each model runs only on its own images, and the
  logits come back in input order: every image is computed by exactly one
  model (the seed paper's proposal, built).
- :class:`Cascade`: DVT-style early exit without feature or relation reuse.
  Each stage runs only on the images that no earlier stage let leave (max
  softmax at least that stage's threshold); the last stage takes the rest,
  so a hard image pays for every stage.

Both take ``{grid: model}``: each model is a timm ViT (patched in place if
it is not yet) called as ``model(images, grid=grid)``, so one model trained
at 7x7 tokens and another at 14x14 can be two grids of one architecture or
two different ViTs. Both report the MACs each image spent, as executed
(router included), through ``forward_with_macs`` for
:func:`adaptok.evaluate.evaluate`. Host syncs: the routed model takes one
per batch (the route, which sets every group's size; empty groups are
skipped), the cascade one per stage but the last (how many images leave
there) and one for the exit stages it returns.

Example::

    >>> p7, p14 = create_model(checkpoint="p7.pth"), create_model(checkpoint="p14.pth")
    >>> routed = RoutedModel({7: p7, 14: p14}, Router.from_checkpoint("router.pth", threshold=0.5))
    >>> logits = routed(images)                         # [B, K], in input order
    >>> logits, macs = routed.forward_with_macs(images)  # macs [B] int64, router included
    >>> cascade = Cascade({7: p7, 10: p10, 14: p14}, thresholds=[0.9, 0.8])
    >>> logits, exits = cascade(images, return_exits=True)
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..cost import macs
from ..errors import UnsupportedModelError
from ..layout import host_grid
from ..routing import Router, check_grids


def _stages(models: Mapping[int, nn.Module]) -> tuple:
    """``models`` checked: ``(grids ascending, ModuleDict, num_classes)``;
    timm ViTs not yet patched are patched in place."""
    from ..timm_vit import AdaptiveViTMixin, patch

    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty {{grid: model}} mapping, got {models!r}")
    grids = check_grids(list(models), "models")
    classes = {}
    out = nn.ModuleDict()
    for g in grids:
        m = models[g]
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{g}] must be a timm ViT, got {type(m).__name__}")
        if not isinstance(m, AdaptiveViTMixin):
            try:
                patch(m)
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f"models[{g}]: {e}") from None
        classes[g] = getattr(m, "num_classes", None)
        out[str(g)] = m
    if len(set(classes.values())) != 1:
        raise ValueError(f"models must all have the same number of classes, got {classes}")
    return grids, out, next(iter(classes.values()))


class _PerGridCost:
    """Per-image MACs of each model at its grid, counted once per keep-rate
    setting of that model."""

    def grid_macs(self, g: int) -> int:
        m = self.models[str(g)]
        key = (g, getattr(m, "keep_rate", None), getattr(m, "prune_layers", None))
        cache = self.__dict__.setdefault("_adaptok_macs", {})
        if key not in cache:
            cache[key] = macs(m, g)
        return cache[key]


class RoutedModel(nn.Module, _PerGridCost):
    """Each image to one model, chosen per image.

    Args:
        models: ``{grid: model}``, at least one (e.g. ``{7: p7, 14: p14}``);
            the same number of classes each.
        router: a :class:`adaptok.routing.Router` for these grids (None:
            the route must be given to every call).

    ``model(images)`` asks the router; ``model(images, route=r)`` takes the
    route: a grid for the whole batch or one per image (``[B]``, e.g. an
    oracle's). Returns logits ``[B, K]`` in input order.
    """

    def __init__(self, models: Mapping[int, nn.Module], router: Optional[Router] = None):
        super().__init__()
        self.grids, self.models, self.num_classes = _stages(models)
        self.router = None
        self.set_router(router)

    def set_router(self, router: Optional[Router]) -> None:
        """Attach ``router`` (None detaches it); it must pick among this
        model's grids."""
        if router is not None:
            if not isinstance(router, Router):
                raise TypeError(f"router must be an adaptok.routing.Router, got {type(router).__name__}")
            if set(router.grids) != set(self.grids):
                raise ValueError(f"router picks grids {router.grids}, the models run {self.grids}")
        self.router = router

    def route(self, images: Tensor, threshold: Optional[float] = None) -> Tensor:
        """The router's grid for every image, ``[B]`` int64."""
        if self.router is None:
            raise ValueError("this RoutedModel has no router: attach one (set_router) or pass route=")
        return self.router.assign(images, threshold)

    def _route(self, images: Tensor, route) -> Tensor:
        b = images.shape[0]
        if route is None:
            return self.route(images).cpu()
        try:
            sides = torch.tensor(host_grid(route, b), dtype=torch.int64)
        except (TypeError, ValueError) as e:  # host_grid names "grid": here the argument is the route
            raise type(e)(str(e).replace("grid must", "route must", 1)) from None
        bad = sorted(set(sides.tolist()) - set(self.grids))
        if bad:
            raise ValueError(f"route must pick grids from {self.grids}, got {bad}")
        return sides

    def forward(self, images: Tensor, route=None) -> Tensor:
        return self._forward(images, route)[0]

    def _forward(self, images: Tensor, route) -> tuple:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        sides = self._route(images, route) if images.shape[0] else torch.zeros(0, dtype=torch.int64)
        if sides.numel() and bool((sides == sides[0]).all()):  # one model takes the batch as it is
            g = int(sides[0])
            return self.models[str(g)](images, grid=g), sides
        out = None
        for g in self.grids:
            idx = (sides == g).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            idx = idx.to(images.device, non_blocking=True)
            logits = self.models[str(g)](images.index_select(0, idx), grid=g)
            if out is None:
                out = logits.new_empty(images.shape[0], logits.shape[1])
            out.index_copy_(0, idx, logits.to(out.dtype))
        if out is None:  # an empty batch: what the models return for one
            out = self.models[str(self.grids[0])](images, grid=self.grids[0])
        return out, sides

    @torch.no_grad()
    def forward_with_macs(self, images: Tensor, grid=None) -> tuple[Tensor, Tensor]:
        """``(logits [B, K], macs [B] int64)``: each image's model at its grid,
        plus the router's MACs when the router chose (``grid`` None); a
        ``grid`` (an int or one per image) is the route, given."""
        logits, sides = self._forward(images, grid)
        per = {g: self.grid_macs(g) for g in self.grids}
        extra = self.router.macs() if grid is None else 0
        return logits, torch.tensor([per[g] + extra for g in sides.tolist()], dtype=torch.int64)

    def extra_repr(self) -> str:
        return f"grids={self.grids}"


class Cascade(nn.Module, _PerGridCost):
    """An early-exit cascade over models of increasing grid.

    Args:
        stages: ``{grid: model}``, at least two, run in ascending grid order;
            the same number of classes each.
        thresholds: one per stage but the last: an image leaves after stage
            ``s`` when its max softmax there is at least ``thresholds[s]``
            (0: every image leaves; ``adaptok.routing.NEVER`` or any value
            above 1: none does).

    ``model(images, return_exits=False)`` -> logits ``[B, K]`` in input
    order (and with ``return_exits`` the stage index each image left at,
    ``[B]`` int64).
    """

    def __init__(self, stages: Mapping[int, nn.Module], thresholds: Sequence[float]):
        super().__init__()
        self.grids, self.models, self.num_classes = _stages(stages)
        if len(self.grids) < 2:
            raise ValueError(f"stages must hold at least 2 models for a cascade, got {len(self.grids)}")
        self.thresholds = thresholds

    @property
    def thresholds(self) -> tuple:
        return self._thresholds

    @thresholds.setter
    def thresholds(self, values: Sequence[float]) -> None:
        if isinstance(values, Tensor):
            values = values.tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"thresholds must be a sequence of numbers, got {values!r}")
        if len(values) != len(self.grids) - 1:
            raise ValueError(f"thresholds must have one value per stage but the last "
                             f"({len(self.grids) - 1} for stages {self.grids}), got {len(values)}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise ValueError(f"thresholds must be numbers >= 0, got {list(values)!r}")
        self._thresholds = tuple(float(v) for v in values)

    def forward(self, images: Tensor, return_exits: bool = False):
        logits, exits = self._forward(images)
        return (logits, exits) if return_exits else logits

    def _forward(self, images: Tensor) -> tuple:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        b = images.shape[0]
        exits = torch.full((b,), len(self.grids) - 1, dtype=torch.int64, device=images.device)
        left = torch.arange(b, device=images.device)
        out = None
        for s, g in enumerate(self.grids):
            logits = self.models[str(g)](images if s == 0 else images.index_select(0, left), grid=g)
            if out is None:
                out = logits.new_empty(b, logits.shape[1])
            logits = logits.to(out.dtype)
            if s == len(self.grids) - 1:
                out.index_copy_(0, left, logits)
                break
            probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
            leave = probs.amax(-1) >= self._thresholds[s]
            k = int(leave.sum())  # the stage's one host sync: how many images leave
            order = torch.argsort((~leave).to(torch.int8), stable=True)  # those that leave first, in order
            gone, kept = order[:k], order[k:]
            out.index_copy_(0, left.index_select(0, gone), logits.index_select(0, gone))
            exits.index_fill_(0, left.index_select(0, gone), s)
            left = left.index_select(0, kept)
            if k == len(order):
                break
        return out, exits.cpu()

    @torch.no_grad()
    def forward_with_macs(self, images: Tensor, grid=None) -> tuple[Tensor, Tensor]:
        """``(logits [B, K], macs [B] int64)``: the MACs of every stage each
        image reached. ``grid`` must be None (the cascade picks)."""
        if grid is not None:
            raise ValueError(f"a Cascade decides each image's stages itself: grid must be None, got {grid!r}")
        logits, exits = self._forward(images)
        cum = torch.tensor([self.grid_macs(g) for g in self.grids], dtype=torch.int64).cumsum(0)
        return logits, cum[exits]

    def extra_repr(self) -> str:
        return f"grids={self.grids}, thresholds={self.thresholds}"
