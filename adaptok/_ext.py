"""The one place that loads the compiled extension ``adaptok._C``.

Loading is lazy (the first time a ``cpu`` or ``cuda`` backend is considered),
so ``import adaptok`` never touches it. A missing or mismatched build logs one
message and every op falls back to its other backends.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

logger = logging.getLogger("adaptok")

_error: str | None = None


@functools.lru_cache(maxsize=None)
def load():
    """Return the ``adaptok._C`` module, or ``None`` if it cannot be loaded."""
    global _error
    try:
        module = importlib.import_module("adaptok._C")
    except ModuleNotFoundError as e:
        if e.name != "adaptok._C":
            raise
        _error = "not built (installed with ADAPTOK_NO_EXTENSION=1, or not installed with pip)"
        logger.info("adaptok: C++/CUDA extension %s; using the triton and torch backends", _error)
        return None
    except (ImportError, OSError) as e:  # built against another torch, missing libraries...
        _error = f"failed to load: {type(e).__name__}: {e}"
        logger.warning("adaptok: C++/CUDA extension %s; using the triton and torch backends", _error)
        return None
    return module


def error() -> str | None:
    """Why the extension is unavailable, or ``None`` when it is loaded."""
    load()
    return _error


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """``{"cuda": bool, "cuda_archs": str, "torch": str}``, or ``{}`` without the extension."""
    module = load()
    return dict(module.build_info()) if module is not None else {}


@functools.lru_cache(maxsize=None)
def has_op(name: str) -> bool:
    """Whether the loaded extension registered ``torch.ops.adaptok.<name>``."""
    return load() is not None and hasattr(torch.ops.adaptok, name)
