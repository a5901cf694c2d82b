"""Training the adaptive models (the lab): :func:`train` and
``adaptok-train`` (:mod:`.loop`, :mod:`.cli`), the method hook
(:mod:`.methods`) and the schedules (:func:`keep_rate_schedule`). Importing
this package imports no timm (the loop imports it on first use)."""
from .loop import TrainConfig, create_model, load_weights, train
from .methods import METHODS, EViT, Method, create_method
from .schedules import keep_rate_schedule

__all__ = ["METHODS", "EViT", "Method", "TrainConfig", "create_method", "create_model", "keep_rate_schedule",
           "load_weights", "train"]
