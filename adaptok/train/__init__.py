"""Training the adaptive models (the lab): :func:`train` and
``adaptok-train`` (:mod:`.loop`, :mod:`.cli`), the method hook
(:mod:`.methods`) and the schedules (:func:`keep_rate_schedule`).

Importing this package costs nothing beyond the schedules: the loop and the
methods load on first use (``import adaptok`` imports the schedules)."""
import importlib

from .schedules import keep_rate_schedule

_LAZY = {"TrainConfig": "loop", "create_model": "loop", "load_weights": "loop", "train": "loop",
         "METHODS": "methods", "EViT": "methods", "Method": "methods", "create_method": "methods"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["keep_rate_schedule"]
