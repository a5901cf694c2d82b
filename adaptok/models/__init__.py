"""The adaptive model families built on the patched timm ViT, one module
each: :mod:`.evit`, :mod:`.revit` (which imports timm) and :mod:`.routed`
(routed models and the early-exit cascade); CF-ViT lands beside them.
Importing this package imports no family (nor timm)."""
import importlib

_FAMILIES = ("evit", "revit", "routed")


def __getattr__(name):
    if name in _FAMILIES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_FAMILIES)
