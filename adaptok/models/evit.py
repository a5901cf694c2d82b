"""EViT (Liang et al., 2022) on a patched timm ViT: the keep rate and the
prune layers, checked and set on the blocks. The selection itself is
:func:`adaptok.nn.prune.evit_select`; the blocks that run it are
:mod:`adaptok.timm_vit`'s.

Example::

    >>> model = adaptok.models.evit.create("deit_small_patch16_224", keep_rate=0.7)   # blocks 3, 6, 9
    >>> model.keep_rate = 0.5                                                        # settable while training
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..ops import common

KeepRate = Union[float, Sequence[float], None]

# EViT's prune layers on a 12-block DeiT (0-indexed).
PRUNE_LAYERS = (3, 6, 9)


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


def check_keep_rate(keep_rate: KeepRate, prune_layers: Sequence[int], model: nn.Module) -> Optional[tuple]:
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


def configure(model: nn.Module, keep_rate: KeepRate, prune_layers: Sequence[int], fuse: bool) -> KeepRate:
    """Set every block's ``keep_rate`` (None outside ``prune_layers``),
    ``fuse`` and ``num_prefix_tokens`` on a patched model; returns the keep rate as the model reports it (a float,
    a tuple per prune layer, or None)."""
    pairs = check_keep_rate(keep_rate, prune_layers, model)
    rates = dict(pairs or ())
    for i, blk in enumerate(model.blocks):
        blk.keep_rate = rates.get(i)
        blk.fuse = fuse
        blk.num_prefix_tokens = model.num_prefix_tokens
    if keep_rate is None:
        return None
    host = _host_rates(keep_rate)
    return host[0] if _one_rate(keep_rate) else host


def create(model_name: str, keep_rate: KeepRate = 0.7, prune_layers: Sequence[int] = PRUNE_LAYERS,
           fuse_inattentive: bool = True, **timm_kwargs) -> nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` (``pretrained=True``
    and ``checkpoint_path=`` load weights as timm does), patched as EViT."""
    import timm

    from ..timm_vit import patch

    return patch(timm.create_model(model_name, **timm_kwargs), keep_rate=keep_rate, prune_layers=prune_layers,
                 fuse_inattentive=fuse_inattentive)
