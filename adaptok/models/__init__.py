"""The adaptive model families built on the patched timm ViT, one module
each: :mod:`.evit` and :mod:`.revit` (which imports timm) today; routed
models, the early-exit cascade and CF-ViT land beside them. Importing this
package imports no family (nor timm)."""
import importlib

_FAMILIES = ("evit", "revit")


def __getattr__(name):
    if name in _FAMILIES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_FAMILIES)
