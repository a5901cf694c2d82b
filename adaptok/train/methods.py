"""Training methods: the lab's hook that turns a batch into a loss.

The loop (:func:`adaptok.train.train`) owns data, optimizer, schedule,
precision, DDP and checkpoints; a :class:`Method` owns what the model does
with a batch. A new family (ReViT's multi-length self-distillation, CF-ViT's
coarse + fine loss, a router) is a new ``Method``, not a copy of the loop::

    class MyMethod(Method):
        name = "mine"
        def loss(self, model, images, targets, criterion):
            return criterion(model(images, grid=7), targets)

    adaptok.train.train(config, method=MyMethod())

``model`` is what the loop calls (the DDP wrapper under ``torchrun``);
:meth:`Method.setup` and :meth:`Method.step` get the bare module to
configure. Methods registered in :data:`METHODS` are reachable as
``adaptok-train --method NAME --method-arg key=value``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..layout import host_grid
from .schedules import keep_rate_schedule


class Method:
    """Plain supervised training at the model's grid, or at ``grid``.

    Args:
        grid: the token grid side every image runs at, in training and in
            evaluation (None: the model's own).
    """

    name = "ce"

    def __init__(self, grid: Optional[int] = None):
        if grid is not None:
            host_grid(grid, 1)  # a clear error naming grid, before any training
        self.grid = grid

    def setup(self, model: nn.Module) -> None:
        """Once, before training or evaluation, on the bare patched model."""

    def step(self, model: nn.Module, epoch: float) -> None:
        """Before every training step; ``epoch`` counts fractionally
        (epoch 2, a quarter through: 2.25)."""

    def forward(self, model, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` -> logits ``[B, classes]`` as this method
        runs the model (also what evaluation calls)."""
        return model(images) if self.grid is None else model(images, grid=self.grid)  # any classifier at None

    def loss(self, model, images: Tensor, targets: Tensor, criterion) -> Tensor:
        """The scalar training loss of one batch. ``targets`` are class
        indices ``[B]``, or soft targets ``[B, classes]`` under mixup;
        ``criterion`` is the loop's (label smoothing, soft targets)."""
        return criterion(self.forward(model, images), targets)

    def state(self) -> dict:
        """What describes this method in records and checkpoints."""
        return {"method": self.name, "grid": self.grid}


class EViT(Method):
    """EViT: train with a keep rate in the model's prune layers.

    Args:
        keep_rate: the target keep rate in (0, 1] (EViT: 0.7).
        start, end: with both, the keep rate follows EViT's schedule
            (:func:`adaptok.keep_rate_schedule`): 1 until epoch ``start``, a
            cosine down to ``keep_rate`` at ``end``, then ``keep_rate``
            (EViT from scratch: 10 and 110 of 300 epochs). Without them it
            is fixed (EViT's fine-tuning recipe).
        prune_layers: 0-indexed blocks that prune (default: the model's
            ``prune_layers``, set when it was patched).
        grid: as :class:`Method`.
    """

    name = "evit"

    def __init__(self, keep_rate: float = 0.7, start: Optional[float] = None, end: Optional[float] = None,
                 prune_layers: Optional[tuple] = None, grid: Optional[int] = None):
        super().__init__(grid)
        if (start is None) != (end is None):
            raise ValueError(f"start and end must be given together (the keep-rate schedule), got start={start!r}, "
                             f"end={end!r}")
        if start is not None:
            if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
                raise ValueError(f"keep_rate must be a float in (0, 1] with a schedule, got {keep_rate!r}")
            keep_rate_schedule(0.0, keep_rate, start, end)  # checks start < end
        self.keep_rate, self.start, self.end = keep_rate, start, end
        self.prune_layers = None if prune_layers is None else tuple(prune_layers)

    def setup(self, model: nn.Module) -> None:
        model.set_pruning(self.keep_rate, self.prune_layers)  # errors name keep_rate or prune_layers

    def step(self, model: nn.Module, epoch: float) -> None:
        if self.start is not None:
            model.keep_rate = keep_rate_schedule(epoch, self.keep_rate, self.start, self.end)

    def state(self) -> dict:
        return {**super().state(), "keep_rate": self.keep_rate, "start": self.start, "end": self.end,
                "prune_layers": self.prune_layers}


class ReViT(Method):
    """ReViT: every image at every token length in one packed pass
    (:func:`adaptok.models.revit.loss`); the teacher (largest grid) learns
    from the label, the shorter lengths from the label and the teacher.

    Args:
        grids: the token grid sides (the model is converted at setup, or
            must be a ReViT of these grids already).
        lam, tau, distillation: the student loss
            ``(1 - lam) * CE + lam * tau^2 * KL`` (``"soft"``) or with the
            teacher's predicted label (``"hard"``); ``lam=0``: no
            self-distillation.
        tal_ln, distill_token, own_patch_embed: the model's options
            (:func:`adaptok.models.revit.convert`).
        grid: the grid :meth:`forward` (evaluation) runs (None: the model's).
    """

    name = "revit"

    def __init__(self, grids=(14, 10, 7), lam: float = 0.5, tau: float = 0.9, distillation: str = "soft",
                 tal_ln: bool = True, distill_token: bool = True, own_patch_embed: bool = False,
                 grid: Optional[int] = None):
        from ..models import revit

        super().__init__(grid)
        self.grids = revit.check_grids(grids)
        revit.check_loss_args(lam, tau, distillation)
        if grid is not None and grid not in self.grids:
            raise ValueError(f"grid must be one of grids {self.grids}, got {grid!r}")
        if lam == 0 and distill_token:
            raise ValueError("lam=0 (no self-distillation) leaves the distillation token untrained: "
                             "use distill_token=False with it")
        self.lam, self.tau, self.distillation = lam, tau, distillation
        self.options = dict(tal_ln=bool(tal_ln), distill_token=bool(distill_token),
                            own_patch_embed=bool(own_patch_embed))

    def setup(self, model: nn.Module) -> None:
        from ..models import revit

        if not revit.is_revit(model):
            revit.convert(model, self.grids, **self.options)
        elif model.revit_grids != self.grids:
            raise ValueError(f"grids {self.grids} differ from the model's {model.revit_grids}")
        model.distilled_training = True

    def loss(self, model, images: Tensor, targets: Tensor, criterion) -> Tensor:
        from ..models import revit

        return revit.loss(model, images, targets, criterion, self.lam, self.tau, self.distillation)

    def state(self) -> dict:
        return {**super().state(), "grids": self.grids, "lam": self.lam, "tau": self.tau,
                "distillation": self.distillation, **self.options}


class CFViT(Method):
    """CF-ViT: every image through the coarse and the fine pass, trained
    with :func:`adaptok.models.cfvit.loss` (``CE(fine) + KL(fine || coarse)``,
    the fine side detached).

    Args:
        alpha, beta, start, feature_reuse, selection, resize: the model's
            options (:func:`adaptok.models.cfvit.convert`; the model is
            converted at setup, or must be a CF-ViT already).
        select_from: the epoch from which the informative patches are
            selected (``alpha``); before it every coarse patch is re-split,
            CF-ViT's schedule. 0: selection throughout.
        eta: the exit threshold :meth:`forward` (evaluation) runs with
            (None: no exit, the fine prediction of every image).
    """

    name = "cfvit"

    def __init__(self, alpha: float = 0.5, beta: float = 0.99, start: int = 3, feature_reuse: bool = True,
                 selection: str = "global", resize: str = "antialias", select_from: float = 0.0,
                 eta: Optional[float] = None):
        from ..models import cfvit

        super().__init__(None)
        cfvit.check_options(alpha=alpha, beta=beta, selection=selection, resize=resize)
        if isinstance(select_from, bool) or not isinstance(select_from, (int, float)) or select_from < 0:
            raise ValueError(f"select_from must be an epoch >= 0, got {select_from!r}")
        self.options = dict(alpha=float(alpha), beta=float(beta), start=start, feature_reuse=bool(feature_reuse),
                            selection=selection, resize=resize)
        self.select_from, self.eta = float(select_from), cfvit.check_eta(eta)

    def setup(self, model: nn.Module) -> None:
        from ..models import cfvit

        if not cfvit.is_cfvit(model):
            cfvit.convert(model, **self.options, eta=self.eta)
        else:
            opts = {k: v for k, v in self.options.items() if k != "feature_reuse"}
            if (model.reuse is not None) != self.options["feature_reuse"]:
                raise ValueError(f"feature_reuse={self.options['feature_reuse']} differs from the model's")
            model.configure(**opts, eta=self.eta)

    def step(self, model: nn.Module, epoch: float) -> None:
        model.split_all = epoch < self.select_from

    def forward(self, model, images: Tensor) -> Tensor:
        return model(images, eta=self.eta)

    def loss(self, model, images: Tensor, targets: Tensor, criterion) -> Tensor:
        from ..models import cfvit

        return cfvit.loss(model, images, targets, criterion)

    def state(self) -> dict:
        return {"method": self.name, **self.options, "select_from": self.select_from, "eta": self.eta}


METHODS = {"ce": Method, "evit": EViT, "revit": ReViT, "cfvit": CFViT}


def create_method(name: str = "ce", **kwargs) -> Method:
    """``METHODS[name](**kwargs)``, with errors naming ``method``."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    try:
        return METHODS[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"method {name!r}: {e}") from None
