"""adaptok: kernels that let Vision Transformers spend compute per image.

``import adaptok`` is cheap: it registers the ops, but never initializes CUDA,
loads the compiled extension, compiles a Triton kernel or imports timm; those
happen on the first call that needs them (``adaptok.patch`` and the rest of
:mod:`adaptok.vit` load on first use).
"""
__version__ = "0.1.0"

import importlib

from . import nn, ops
from .backends import BACKENDS, BackendError, backend
from .ops import topk_select, varlen_attention
from .ragged import RaggedBatch

# Names served by adaptok.vit, which imports timm.
_VIT = ("UnsupportedModelError", "keep_rate_schedule", "patch")


def __getattr__(name):
    if name == "vit" or name in _VIT:
        vit = importlib.import_module(".vit", __name__)
        return vit if name == "vit" else getattr(vit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "BackendError", "RaggedBatch", "UnsupportedModelError", "backend", "keep_rate_schedule", "nn",
           "ops", "patch", "topk_select", "varlen_attention", "vit", "__version__"]
