"""Training schedules of the adaptive models."""
from __future__ import annotations

import math


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
