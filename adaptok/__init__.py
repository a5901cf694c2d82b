"""adaptok: kernels that let Vision Transformers spend compute per image.

``import adaptok`` is cheap: it registers the ops, but never initializes CUDA,
loads the compiled extension or compiles a Triton kernel; those happen on the
first call that needs them.
"""
__version__ = "0.1.0"

from . import nn, ops
from .backends import BACKENDS, BackendError, backend
from .ops import topk_select, varlen_attention
from .ragged import RaggedBatch

__all__ = ["BACKENDS", "BackendError", "RaggedBatch", "backend", "nn", "ops", "topk_select", "varlen_attention", "__version__"]
