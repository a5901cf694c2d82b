"""Routing: which model (or token grid) runs on which image.

This module owns the per-image choice between models of different cost,
from saved outputs (the offline analysis) and from a trained router (the
deployable decision); the models that act on it are
:class:`adaptok.models.routed.RoutedModel` and
:class:`adaptok.models.routed.Cascade`.

Offline, everything is vectorized over images (and thresholds):

- :func:`confidence`: the seed paper's three metrics between each image's
  softmax and its one-hot label (Euclidean and Manhattan distance, cosine
  similarity);
- :func:`sweep`: a threshold on the cheap model's score moved across its
  range; images on the confident side go to the cheap model, the rest to
  the costly one; a point (top-1, GMACs per image) per threshold;
- :func:`cheapest_correct` and :func:`oracle`: each image to the cheapest
  model that classifies it correctly (the costliest when none does);
- :func:`cascade_outcome`, :func:`cascade_thresholds` (DVT's choice of
  exit thresholds for a budget) and :func:`stage_fractions` (its Fig. 2).

The metrics, the sweep and the oracle read the labels, so what they give is
an upper bound on what a deployable rule reaches. The deployable rule is
:class:`Router`: a small classifier trained (by the lab, on
:func:`save_labels`' targets) to predict each image's cheapest correct
grid, with a threshold that trades accuracy for cost.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .layout import host_grid

# Each metric, and whether a *small* value means confident (the distances)
# or a large one (the cosine similarity).
METRICS = {"euclidean": "low", "manhattan": "low", "cosine": "high"}
# A cascade exit threshold no confidence reaches: no image leaves there.
NEVER = math.inf


# ------------------------------------------------------------------ checks


def check_grids(grids: Sequence[int], name: str = "grids") -> tuple:
    """``grids`` as distinct ints >= 1, in ascending order; errors name
    ``name``."""
    if isinstance(grids, (str, bytes)) or not isinstance(grids, Sequence) or not grids:
        raise TypeError(f"{name} must be a non-empty sequence of token grid sides, got {grids!r}")
    try:
        sides = host_grid(list(grids), len(grids))
    except (TypeError, ValueError) as e:  # host_grid names "grid": here the argument is ``name``
        raise type(e)(str(e).replace("grid must", f"{name} must", 1)) from None
    if len(set(sides)) != len(sides):
        raise ValueError(f"{name} must be distinct, got {tuple(grids)}")
    return tuple(sorted(sides))


def check_logits_labels(logits: Tensor, labels: Tensor, name: str = "logits") -> None:
    """``logits [N, K]`` floating and ``labels [N]`` integer in ``[0, K)``;
    errors name the argument."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating [N, classes] tensor, got "
                         f"{_describe(logits)}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer [N] tensor, got {_describe(labels)}")
    if labels.numel() != logits.shape[0]:
        raise ValueError(f"{name} and labels must have one row per image: {name} has {logits.shape[0]} rows, "
                         f"labels {labels.numel()}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1]}), got values from "
                         f"{int(labels.min())} to {int(labels.max())}")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# ----------------------------------------------------------------- metrics


def confidence(logits: Tensor, labels: Tensor) -> dict:
    """The seed paper's metrics between each image's softmax ``p`` and its
    one-hot label ``y``: ``euclidean = ||p - y||_2``, ``manhattan =
    ||p - y||_1`` and ``cosine = p.y / ||p||`` (``||y|| = 1``), computed in
    float64.

    Args:
        logits: ``[N, K]``.
        labels: ``[N]`` class indices.

    Returns:
        ``{metric: [N] float64}``; :data:`METRICS` says which end is
        confident.
    """
    check_logits_labels(logits, labels)
    p = logits.double().softmax(-1)
    y = torch.zeros_like(p).scatter_(1, labels.long().view(-1, 1).to(p.device), 1.0)
    at_label = p.gather(1, labels.long().view(-1, 1).to(p.device)).squeeze(1)
    return {"euclidean": (p - y).norm(dim=1), "manhattan": (p - y).abs().sum(1),
            "cosine": at_label / p.norm(dim=1)}


def _correct(logits: Tensor, labels: Tensor, name: str) -> Tensor:
    check_logits_labels(logits, labels, name)
    return logits.argmax(-1).cpu() == labels.cpu()


# ------------------------------------------------------------- the sweep


def thresholds_across(score: Tensor, step: float = 0.01) -> Tensor:
    """Thresholds every ``step`` from below ``score``'s minimum to its
    maximum (float64), so that the first sends no image to the cheap side
    and the last sends them all (for a score whose small values are
    confident)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0 or not math.isfinite(step):
        raise ValueError(f"step must be a finite number > 0, got {step!r}")
    if not isinstance(score, Tensor) or score.dim() != 1 or score.numel() == 0:
        raise ValueError(f"score must be a non-empty [N] tensor, got {_describe(score)}")
    lo = math.floor(float(score.min()) / step) * step - step
    hi = float(score.max())
    t = torch.arange(int(math.ceil((hi - lo) / step)) + 1, dtype=torch.float64) * step + lo
    t[-1] = max(float(t[-1]), hi)  # rounding must not leave the last one below the maximum
    return t


def sweep(score: Tensor, correct: Tensor, macs: Tensor, thresholds: Tensor, confident: str = "low") -> list:
    """Two-model partitions by a threshold on the cheap model's ``score``.

    An image goes to the cheap model (column 0) when its score is on the
    confident side of the threshold (``score <= t`` for ``confident="low"``,
    ``score >= t`` for ``"high"``), else to the costly one (column 1).

    Args:
        score: ``[N]``, e.g. a :func:`confidence` metric of the cheap model.
        correct: ``[N, 2]`` bool: whether each model classifies each image
            correctly.
        macs: ``[N, 2]`` (or ``[2]``): each image's MACs through each model.
        thresholds: ``[T]``.

    Returns:
        One point per threshold: ``{"threshold", "top1" (%), "gmacs" (mean
        per image), "cheap_share" (%)}``.
    """
    if confident not in ("low", "high"):
        raise ValueError(f"confident must be 'low' or 'high', got {confident!r}")
    n = _check_models_table(correct, models=2)
    if not isinstance(score, Tensor) or score.shape != (n,):
        raise ValueError(f"score must be an [N] tensor with one value per image ({n}), got {_describe(score)}")
    t = torch.as_tensor(thresholds, dtype=torch.float64).cpu().reshape(-1)
    s = score.double().cpu().unsqueeze(0)
    cheap = s <= t.unsqueeze(1) if confident == "low" else s >= t.unsqueeze(1)  # [T, N]
    macs = _macs_table(macs, n, 2)
    right = torch.where(cheap, correct[:, 0].cpu(), correct[:, 1].cpu()).double()
    spent = torch.where(cheap, macs[:, 0], macs[:, 1])
    return [{"threshold": float(t[i]), "top1": 100.0 * float(right[i].mean()), "gmacs": float(spent[i].mean()) / 1e9,
             "cheap_share": 100.0 * float(cheap[i].double().mean())} for i in range(t.numel())]


def _check_models_table(correct: Tensor, models: Optional[int] = None) -> int:
    if not isinstance(correct, Tensor) or correct.dim() != 2 or correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool [N, models] tensor, got {_describe(correct)}")
    if models is not None and correct.shape[1] != models:
        raise ValueError(f"correct must have {models} columns (one per model), got {correct.shape[1]}")
    if correct.shape[1] < 1:
        raise ValueError("correct must have at least one column (one per model)")
    return correct.shape[0]


def _macs_table(macs, n: int, models: int) -> Tensor:
    m = torch.as_tensor(macs, dtype=torch.float64).cpu()
    if m.shape == (models,):
        m = m.expand(n, models)
    if m.shape != (n, models):
        raise ValueError(f"macs must be [models] ({models}) or [N, models] ({n}, {models}), got shape "
                         f"{tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("macs must be finite and >= 0")
    return m


# ------------------------------------------------------------- the oracle


def cheapest_correct(correct: Tensor) -> Tensor:
    """``correct [N, M]`` bool, its columns ordered from the cheapest model
    -> ``[N]`` int64: the first column that is correct, the last (the
    costliest model) when none is."""
    _check_models_table(correct)
    m = correct.shape[1]
    first = correct.int().argmax(1)
    return torch.where(correct.any(1), first, torch.full_like(first, m - 1)).long()


def oracle(logits: Sequence[Tensor], labels: Tensor, macs) -> dict:
    """Each image to the cheapest model that classifies it correctly (the
    costliest when none does): an upper bound, it reads the labels.

    Args:
        logits: one ``[N, K]`` per model, from the cheapest.
        labels: ``[N]``.
        macs: ``[M]`` or ``[N, M]``: each image's MACs through each model.

    Returns:
        ``{"top1", "gmacs", "images", "choice": [N] int64 model index,
        "shares": [% per model]}``.
    """
    if isinstance(logits, Tensor) or not isinstance(logits, Sequence) or not logits:
        raise ValueError(f"logits must be a non-empty sequence of [N, K] tensors, one per model, got "
                         f"{_describe(logits)}")
    correct = torch.stack([_correct(lg, labels, f"logits[{i}]") for i, lg in enumerate(logits)], 1)
    n, m = correct.shape
    choice = cheapest_correct(correct)
    spent = _macs_table(macs, n, m).gather(1, choice.view(-1, 1)).squeeze(1)
    right = correct.gather(1, choice.view(-1, 1)).squeeze(1)
    return {"top1": 100.0 * float(right.double().mean()), "gmacs": float(spent.mean()) / 1e9, "images": n,
            "choice": choice, "shares": [100.0 * float((choice == i).double().mean()) for i in range(m)]}


# ----------------------------------------------------------- the cascade


def cascade_outcome(conf: Tensor, correct: Tensor, stage_macs, thresholds: Tensor) -> tuple:
    """What an early-exit cascade does with each threshold setting.

    An image leaves after stage ``s < S - 1`` when its confidence there is
    at least ``thresholds[s]``; the last stage takes every image left. Its
    MACs are those of every stage it reached.

    Args:
        conf: ``[N, S]`` each stage's confidence (max softmax) per image.
        correct: ``[N, S]`` bool.
        stage_macs: ``[S]`` or ``[N, S]``: MACs of each stage on each image.
        thresholds: ``[C, S - 1]`` (or ``[S - 1]``): C settings.

    Returns:
        ``(right [C, N] bool, macs [C, N] float64, exit [C, N] int64)``.
    """
    n = _check_models_table(correct)
    s = correct.shape[1]
    if not isinstance(conf, Tensor) or conf.shape != (n, s):
        raise ValueError(f"conf must be [N, stages] ({n}, {s}) like correct, got {_describe(conf)}")
    t = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
    t = t.unsqueeze(0) if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[1] != s - 1:
        raise ValueError(f"thresholds must have one value per stage but the last ({s - 1}), got shape "
                         f"{tuple(t.shape)}")
    leaves = conf.double().cpu()[:, :-1].unsqueeze(0) >= t.unsqueeze(1)  # [C, N, S-1]
    leaves = torch.cat([leaves, leaves.new_ones(leaves.shape[:2] + (1,))], 2)
    exit_ = leaves.int().argmax(2)
    cum = _macs_table(stage_macs, n, s).cumsum(1)  # [N, S]
    spent = cum.unsqueeze(0).expand(t.shape[0], n, s).gather(2, exit_.unsqueeze(2)).squeeze(2)
    right = correct.cpu().unsqueeze(0).expand(t.shape[0], n, s).gather(2, exit_.unsqueeze(2)).squeeze(2)
    return right, spent, exit_.long()


def cascade_thresholds(conf: Tensor, correct: Tensor, stage_macs, budget: Optional[float] = None, *,
                       min_top1: Optional[float] = None, candidates: int = 51, chunk: int = 2048) -> dict:
    """The exit thresholds of a cascade, chosen on these (held-out) images.

    With ``budget`` (GMACs per image), DVT's rule: the best top-1 with mean
    GMACs at most the budget (ties: the cheaper). With ``min_top1`` (%):
    the cheapest setting whose top-1 reaches it (ties: the more accurate),
    e.g. a cascade at another model's accuracy. Every combination of
    ``candidates`` values per exit is scored: the quantiles of that stage's
    confidences, 0 (every image leaves) and :data:`NEVER` (none does).

    Args:
        conf, correct, stage_macs: as :func:`cascade_outcome` takes them.

    Returns:
        ``{"thresholds": [S - 1] floats, "top1", "gmacs", "met"}``. When no
        setting meets the goal (``"met": False``): for a budget, the
        cheapest setting; for an accuracy, the most accurate.
    """
    n = _check_models_table(correct)
    s = correct.shape[1]
    if s < 2:
        raise ValueError("a cascade needs at least 2 stages (correct has 1 column)")
    if (budget is None) == (min_top1 is None):
        raise ValueError("give exactly one of budget (GMACs per image) and min_top1 (%)")
    goal = budget if budget is not None else min_top1
    if isinstance(goal, bool) or not isinstance(goal, (int, float)) or not (goal > 0 if budget is not None
                                                                             else 0 <= goal <= 100):
        name = "budget must be a number of GMACs per image > 0" if budget is not None else \
            "min_top1 must be a number in [0, 100]"
        raise ValueError(f"{name}, got {goal!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise ValueError(f"candidates must be an int >= 2, got {candidates!r}")
    if not isinstance(conf, Tensor) or conf.shape != (n, s):
        raise ValueError(f"conf must be [N, stages] ({n}, {s}) like correct, got {_describe(conf)}")
    q = torch.linspace(0, 1, candidates, dtype=torch.float64)
    c = conf.double().cpu()
    ends = torch.tensor([0.0, NEVER], dtype=torch.float64)
    values = [torch.unique(torch.cat([torch.quantile(c[:, k], q), ends])) for k in range(s - 1)]
    grid = torch.cartesian_prod(*values) if s > 2 else values[0].unsqueeze(1)
    acc, g = [], []
    for start in range(0, grid.shape[0], chunk):
        right, spent, _ = cascade_outcome(conf, correct, stage_macs, grid[start:start + chunk])
        acc.append(100.0 * right.double().mean(1))
        g.append(spent.mean(1) / 1e9)
    acc, g = torch.cat(acc), torch.cat(g)
    if budget is not None:
        ok = g <= budget * (1 + 1e-12)
        first, second = (-acc, g) if bool(ok.any()) else (g, -acc)  # best top-1, then cheaper; else cheapest
    else:
        ok = acc >= min_top1 - 1e-9
        first, second = (g, -acc) if bool(ok.any()) else (-acc, g)  # cheapest, then more accurate; else best
    pool = ok if bool(ok.any()) else torch.ones_like(ok)
    inf = torch.full_like(first, math.inf)
    first = torch.where(pool, first, inf)
    second = torch.where(pool & (first == first.min()), second, inf)
    i = int(second.argmin())
    return {"thresholds": grid[i].tolist(), "top1": float(acc[i]), "gmacs": float(g[i]), "met": bool(ok.any())}


def stage_fractions(exits: Tensor, stages: int) -> list:
    """``exits [N]`` stage indices -> the % of images that reach each stage
    (DVT's Fig. 2)."""
    e = torch.as_tensor(exits).reshape(-1)
    return [100.0 * float((e >= s).double().mean()) for s in range(stages)]


# -------------------------------------------------------------- the router


def _check_threshold(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {value!r}")
    return float(value)


class Router(nn.Module):
    """A small classifier that picks a token grid (or the model that runs
    it) per image. Its classes are ``grids`` in ascending order: class
    ``i`` means "``grids[i]`` is the cheapest grid that classifies this
    image correctly" (:func:`cheapest_correct`'s labels, written for the lab
    by :func:`save_labels`).

    The knob ``threshold`` trades accuracy for cost: each image gets the
    smallest grid whose cumulative probability (from the smallest up)
    reaches it, i.e. the cheapest grid the router is at least ``threshold``
    sure suffices; none reaching it gives the largest. ``threshold=0``
    sends every image to the smallest grid; values towards 1 send more
    images to larger grids. ReViT's Token-Length Assigner is this class
    (:class:`adaptok.models.revit.TokenLengthAssigner`).

    Args:
        net: any image classifier with ``len(grids)`` outputs (a timm CNN,
            or a timm ViT, patched or not), fed the images resized to
            ``img_size``.
        grids: the grid sides its classes stand for.
        img_size: the side of the images the router sees (others are
            resized to it).
        threshold: in [0, 1].
    """

    def __init__(self, net: nn.Module, grids: Sequence[int], img_size: int, threshold: float = 0.5):
        super().__init__()
        self.net = net
        self.grids = check_grids(grids)
        # the grid of each class, moved with the module (no host-to-device copy per call)
        self.register_buffer("grid_sides", torch.tensor(self.grids, dtype=torch.int64), persistent=False)
        outputs = getattr(net, "num_classes", None)
        if outputs is not None and outputs != len(self.grids):
            raise ValueError(f"net must have one output per grid ({len(self.grids)}), it has {outputs}")
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"img_size must be a positive int, got {img_size!r}")
        self.img_size = img_size
        self.threshold = threshold

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = _check_threshold(value)

    @classmethod
    def from_checkpoint(cls, path: str, threshold: float = 0.5) -> "Router":
        """The router the lab trained on :func:`save_labels`' targets (its
        checkpoint keeps the grids its classes stand for, and its input
        size)."""
        from .data import model_input
        from .train.loop import create_model, read_checkpoint

        ckpt = read_checkpoint(path)
        grids = ckpt.get("classes") if isinstance(ckpt, dict) else None
        if not grids:
            raise ValueError(f"checkpoint {path!r} is not a router's: it names no grids (train it on "
                             f"save_labels' targets)")
        net = create_model(checkpoint=path)
        side = ckpt["config"].get("img_size") or model_input(net)[1]
        return cls(net.eval(), grids, side, threshold)

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` -> logits ``[B, len(grids)]``."""
        if tuple(images.shape[-2:]) != (self.img_size,) * 2:
            from .layout import resize_images

            images = resize_images(images, (self.img_size, self.img_size))
        return self.net(images)

    def choose(self, probs: Tensor, threshold: Optional[float] = None) -> Tensor:
        """``probs [B, len(grids)]`` -> the class index of each image ``[B]``
        under ``threshold`` (default: the router's)."""
        t = self.threshold if threshold is None else _check_threshold(threshold)
        reached = probs.float().cumsum(-1) >= t
        reached[:, -1] = True  # the largest grid when none reaches t (also when rounding keeps the sum below 1)
        return reached.int().argmax(-1)

    @torch.no_grad()
    def assign(self, images: Tensor, threshold: Optional[float] = None) -> Tensor:
        """The grid side of every image, ``[B]`` int64 on the images' device."""
        probs = self(images).float().softmax(-1)
        return self.grid_sides[self.choose(probs, threshold)]

    def macs(self) -> int:
        """The multiply-accumulates of one image: :func:`adaptok.cost.macs`
        for a ViT, else PyTorch's FLOP counter on a forward at the router's
        input size (computed once)."""
        cached = self.__dict__.get("_macs")
        if cached is None:
            from .cost import macs as vit_macs
            from .data import model_input

            if hasattr(self.net, "patch_embed") and hasattr(self.net, "blocks"):
                ph, pw = self.net.patch_embed.patch_size
                if self.img_size % ph or self.img_size % pw or ph != pw:
                    raise ValueError(f"img_size {self.img_size} is not a whole number of the router's square "
                                     f"patches ({ph}x{pw})")
                cached = vit_macs(self.net, self.img_size // ph)
            else:
                from torch.utils.flop_counter import FlopCounterMode

                p = next(self.parameters())
                x = torch.zeros(1, model_input(self.net)[0], self.img_size, self.img_size, device=p.device,
                                dtype=p.dtype)
                was = self.training
                self.eval()
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    self.net(x)
                self.train(was)
                cached = counter.get_total_flops() // 2
            self.__dict__["_macs"] = cached
        return cached


def save_labels(path: str, grids: Sequence[int], train: Tensor, val: Optional[Tensor] = None) -> dict:
    """Write routing labels (grid sides, as :func:`route_labels` or ReViT's
    ``token_length_labels`` give them) as a lab targets file
    (``TrainConfig.targets``): class ``i`` is the ``i``-th smallest of
    ``grids``, as :class:`Router` reads it. Returns what was written."""
    ascending = check_grids(grids)
    index = {g: i for i, g in enumerate(ascending)}

    def classes(sides):
        bad = sorted(set(sides.tolist()) - set(index))
        if bad:
            raise ValueError(f"labels must be grid sides from {ascending}, got {bad}")
        return torch.tensor([index[g] for g in sides.tolist()], dtype=torch.int64)

    out = {"train": classes(train), "num_classes": len(ascending), "classes": list(ascending)}
    if val is not None:
        out["val"] = classes(val)
    torch.save(out, path)
    return out


@torch.no_grad()
def route_labels(models: Mapping[int, nn.Module], loader, device=None) -> Tensor:
    """The routing label of every image of ``loader`` (in its order; use an
    unshuffled loader with evaluation transforms): the smallest grid whose
    model classifies it correctly, the largest when none does.

    Args:
        models: ``{grid: model}``; each is called as ``model(images,
            grid=grid)``.

    Returns:
        ``[N]`` int64 grid sides.
    """
    grids = check_grids(list(models), "models")
    dev = torch.device(device) if device is not None else next(models[grids[0]].parameters()).device
    states = {g: models[g].training for g in grids}
    for g in grids:
        models[g].eval()
    out = []
    try:
        for images, targets in loader:
            images, targets = images.to(dev), targets.to(dev)
            correct = torch.stack([models[g](images, grid=g).argmax(-1) == targets for g in grids], 1)
            out.append(torch.tensor(grids)[cheapest_correct(correct.cpu())])
    finally:
        for g in grids:
            models[g].train(states[g])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
