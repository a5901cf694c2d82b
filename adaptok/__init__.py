"""adaptok: kernels that let Vision Transformers spend compute per image.

``import adaptok`` is cheap: it registers the ops, but never initializes CUDA,
loads the compiled extension, compiles a Triton kernel or imports timm; those
happen on the first call that needs them (``adaptok.patch`` and the rest of
:mod:`adaptok.timm_vit` load on first use). The rooms, and the one path
from images to logits, are described in ``docs/structure.md``.
"""
__version__ = "0.1.0"

import importlib

from . import nn, ops, tuning
from .backends import BACKENDS, BackendError, backend
from .errors import UnsupportedModelError
from .layout import TokenLayout
from .ops import topk_select, varlen_attention
from .ragged import RaggedBatch
from .train.schedules import keep_rate_schedule

# Served on first use (timm_vit imports timm; the packages import it lazily).
_LAZY = {"patch": ("timm_vit", "patch"), "timm_vit": ("timm_vit", None), "models": ("models", None),
         "bench": ("bench", None), "train": ("train", None), "data": ("data", None),
         "evaluate": ("evaluate", None)}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(f".{module}", __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "BackendError", "RaggedBatch", "TokenLayout", "UnsupportedModelError", "backend", "bench",
           "data", "evaluate", "keep_rate_schedule", "models", "nn", "ops", "patch", "timm_vit", "topk_select",
           "train", "tuning", "varlen_attention", "__version__"]
