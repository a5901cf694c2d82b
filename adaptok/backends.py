"""One backend registry for every adaptok op.

Each op (:class:`Op`) holds implementations for some of the backends

- ``cuda``:   CUDA C++ kernels from the extension (CUDA tensors),
- ``triton``: Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``),
- ``cpu``:    C++ kernels from the extension (CPU tensors),
- ``torch``:  the plain PyTorch reference (any device, always there).

Each implementation declares what it supports and answers *why not* for given
inputs. Automatic choice takes the first backend, in the device's order of
preference (fastest first, from measurements), that can serve the inputs.
``ADAPTOK_BACKEND=<name>`` or ``with adaptok.backend("<name>"):`` forces one;
a forced backend that cannot serve the inputs raises :class:`BackendError`
listing every backend and its reason.

On CUDA tensors, automatic choice takes a kernel backend (``cuda``,
``triton``) only once that op's GPU tests have passed with it on hardware:
the validated ``(op, backend)`` pairs are listed, with the GPU and commit,
in ``adaptok/gpu_validated.json`` (written by ``bench/gpu_validation.py``
from a GPU test run). The others stay reachable by forcing them, and
``python -m adaptok.info --device cuda`` marks them "not yet validated on
a GPU".

Example::

    with adaptok.backend("torch"):
        out = adaptok.ops.pack(x, cu_seqlens, total)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "cpu", "torch")

# Order of preference per device type, fastest first.
PREFERENCE = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch", "triton"),  # triton on the CPU is the (slow) interpreter
}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "adaptok_backend", default=os.environ.get("ADAPTOK_BACKEND") or None
)


class BackendError(RuntimeError):
    """No backend (or not the forced one) can serve an op's inputs."""


def _check_name(name: Optional[str]) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown adaptok backend {name!r}; choose one of {', '.join(BACKENDS)} (or None for automatic)")


@contextlib.contextmanager
def backend(name: Optional[str]) -> Iterator[None]:
    """Force backend ``name`` for every adaptok op called inside the block
    (``None``: automatic choice). Overrides ``ADAPTOK_BACKEND``."""
    _check_name(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`backend` or ``ADAPTOK_BACKEND``, if any."""
    return _forced.get()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_missing() -> Optional[str]:
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def backend_unavailable(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run at all on this install, or ``None``."""
    if name in ("cpu", "cuda"):
        err = _ext.error()
        if err is not None:
            return f"extension {err}"
        if name == "cuda" and not _ext.build_info().get("cuda"):
            return "extension built without CUDA"
    if name == "triton":
        return _triton_missing()
    return None


def _device_reason(name: str, device: torch.device) -> Optional[str]:
    kind = device.type
    if name == "torch":
        return None
    if name == "cpu":
        return None if kind == "cpu" else f"runs on CPU tensors, got {kind}"
    if name == "cuda":
        return None if kind == "cuda" else f"runs on CUDA tensors, got {kind}"
    if kind == "cuda" or (kind == "cpu" and triton_interpreted()):
        return None
    if kind == "cpu":
        return "runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"runs on CUDA tensors, got {kind}"


# Kernel backends that automatic choice on CUDA tensors takes only once validated.
GPU_KERNEL_BACKENDS = ("cuda", "triton")
VALIDATION_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_validated.json")


@functools.lru_cache(maxsize=None)
def gpu_validated() -> frozenset:
    """``{(op, backend)}``: the pairs whose GPU tests passed on hardware, read
    once from :data:`VALIDATION_FILE` (a missing file validates nothing)."""
    try:
        with open(VALIDATION_FILE) as f:
            data = json.load(f)
    except FileNotFoundError:
        return frozenset()
    return frozenset((entry["op"], entry["backend"]) for entry in data.get("validated", ()))


def unvalidated(op: str, backend: str, device_type: str) -> Optional[str]:
    """Why automatic choice skips ``backend`` for ``op`` on ``device_type``
    tensors although it can run them, or ``None``."""
    if device_type == "cuda" and backend in GPU_KERNEL_BACKENDS and (op, backend) not in gpu_validated():
        return "not yet validated on a GPU (runs only when forced)"
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op.

    ``dtypes``: dtypes served (``None``: any). ``ext_op``: the extension op it
    calls, checked to exist. ``check(*args) -> reason | None``: further limits
    (head dims, sizes...). ``note``: shown by ``python -m adaptok.info`` next
    to "ok", e.g. when the backend runs another backend's code.
    """

    backend: str
    fn: Callable
    dtypes: Optional[frozenset] = None
    ext_op: Optional[str] = None
    check: Optional[Callable[..., Optional[str]]] = None
    note: Optional[str] = None


class Op:
    """The backends of one op.

    ``subject(*args)`` returns the tensor whose device and dtype decide which
    backends qualify; ``example(device, dtype)`` returns sample arguments for
    ``python -m adaptok.info``; ``preference`` overrides :data:`PREFERENCE`
    for some device types.
    """

    def __init__(self, name: str, subject: Callable[..., torch.Tensor], example: Callable[..., tuple],
                 preference: Optional[dict[str, tuple[str, ...]]] = None):
        self.name = name
        self.subject = subject
        self.example = example
        self.preference = {**PREFERENCE, **(preference or {})}
        self.impls: dict[str, Impl] = {}
        REGISTRY[name] = self

    def register(self, backend: str, *, dtypes=None, ext_op=None, check=None, note=None):
        """Decorator: register ``fn`` as this op's ``backend`` implementation."""
        _check_name(backend)

        def wrap(fn):
            self.impls[backend] = Impl(backend, fn, frozenset(dtypes) if dtypes else None, ext_op, check, note)
            return fn

        return wrap

    def why_not(self, backend: str, *args) -> Optional[str]:
        """Every reason ``backend`` cannot serve ``args``, joined by "; ", or
        ``None`` if it can."""
        reasons = list(self._refusals(backend, args))
        return "; ".join(reasons) if reasons else None

    def _refusals(self, backend: str, args):
        """The reasons ``backend`` cannot serve ``args``, one at a time (so
        that choosing a backend stops at the first)."""
        impl = self.impls.get(backend)
        if impl is None:
            yield f"no {backend} implementation of {self.name}"
            return
        missing = backend_unavailable(backend)
        if missing is None and impl.ext_op is not None and not _ext.has_op(impl.ext_op):
            missing = f"extension lacks {impl.ext_op} (rebuild adaptok)"
        t = self.subject(*args)
        elsewhere = _device_reason(backend, t.device)
        wrong_dtype = impl.dtypes is not None and t.dtype not in impl.dtypes
        for reason in (missing, elsewhere):
            if reason is not None:
                yield reason
        if wrong_dtype:
            served = ", ".join(sorted(_dtype_name(d) for d in impl.dtypes))
            yield f"supports {served}, got {_dtype_name(t.dtype)}"
        elif impl.check is not None and missing is None and elsewhere is None:
            # The backend's own limits (head dims, sizes), asked only of a
            # backend that runs here on this device.
            reason = impl.check(*args)
            if reason is not None:
                yield reason

    def serves(self, backend: str, *args) -> bool:
        """Whether ``backend`` can serve ``args`` (:meth:`why_not` is None)."""
        return next(self._refusals(backend, args), None) is None

    def reasons(self, *args) -> dict[str, Optional[str]]:
        """``{backend: reason or None}`` for every backend name."""
        return {b: self.why_not(b, *args) for b in BACKENDS}

    def select(self, *args) -> Impl:
        """The implementation that runs ``args``: the forced backend, or the
        first qualifying one in the device's order of preference (on CUDA
        tensors, kernel backends only once validated on a GPU)."""
        forced = _forced.get()
        if forced is not None:
            _check_name(forced)
            if self.serves(forced, *args):
                return self.impls[forced]
            raise BackendError(self._report(f"backend {forced!r} is forced but cannot serve these inputs", args))
        device = self.subject(*args).device.type
        for name in self.preference.get(device, ("torch",)):
            if unvalidated(self.name, name, device) is None and self.serves(name, *args):
                return self.impls[name]
        raise BackendError(self._report("no backend can serve these inputs", args))

    def __call__(self, *args):
        return self.select(*args).fn(*args)

    def _report(self, headline: str, args) -> str:
        t = self.subject(*args)
        lines = [f"adaptok.{self.name}: {headline} ({t.device.type}, {_dtype_name(t.dtype)}):"]
        for name, reason in self.reasons(*args).items():
            lines.append(f"  {name:7s} {reason or 'ok'}")
        return "\n".join(lines)


# Every op, by name, in registration order (filled as op modules are imported).
REGISTRY: dict[str, Op] = {}
