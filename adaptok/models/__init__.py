"""The adaptive model families built on the patched timm ViT, one module
each: :mod:`.evit` today; ReViT, routed models, the early-exit cascade and
CF-ViT land beside it. Importing this package imports no family (nor timm)."""
import importlib

_FAMILIES = ("evit",)


def __getattr__(name):
    if name in _FAMILIES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_FAMILIES)
