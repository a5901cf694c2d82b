"""Choices between formulations of one computation that give the same result
(to rounding) at different speeds, made per shape by measurement on the
machine that runs them, as cuDNN's benchmark mode does.

A :class:`Choice` names its options. The first call of a shape that can be
timed soundly (:func:`measurable`: no autograd graph, no random draws, no
tracing or compiling) runs every option on its own inputs, interleaved,
:data:`MEASURE_CALLS` timed calls each after one untimed call, and keeps the
one with the smallest time for the rest of the process; it returns that
option's result. Calls that cannot be timed always take the choice's
default (timm's formulation), so that training, compiled graphs and exported
programs never depend on what the process measured before. Which option wins depends on the machine, so the
choice is measured where it runs, not written down.

``ADAPTOK_<NAME>=<option>`` (e.g. ``ADAPTOK_ATTENTION=sdpa``) or ``with
choice.force("<option>"):`` fixes an option (reproducible numerics, or a
benchmark of one formulation). :func:`measured` lists every measured choice
(``adaptok-bench`` records them with its results).

The choices: :data:`adaptok.nn.attention.ATTENTION` (SDPA or explicit
matmuls), :data:`adaptok.nn.patch_embed.PATCH_EMBED` (timm's convolution
or one matmul over unfolded patches) and :data:`adaptok.nn.linear.LINEAR`
(``F.linear`` or oneDNN's matmul with the weight prepacked).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

# Timed calls per option when a shape is measured, after one untimed call each.
MEASURE_CALLS = 5

_CHOICES: dict[str, "Choice"] = {}


def measurable(x: Tensor, random: bool = False, params: tuple = ()) -> bool:
    """Whether timing every option on inputs like ``x`` (and parameters
    ``params``, None entries allowed) is sound and free of side effects: no
    autograd graph (backward or forward mode), no
    ``torch.func`` transform (``vmap``, ``jvp``, ``grad``), no random draws
    (``random``: the call would draw, e.g. dropout), no tracing or
    compiling, real non-empty CPU tensors. Calls that are not take the
    choice's default and never read the measurements, so that training,
    compiled graphs and exported programs do not depend on what the process
    measured before."""
    return (not random and type(x) is Tensor and x.is_cpu
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad
                                                                         for p in params)))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and x.numel() > 0
            and not transformed())


def transformed() -> bool:
    """Whether a forward-mode AD level or a ``torch.func`` transform is
    active: their tensors look plain, and formulations without a forward
    derivative or batching rule would drop tangents or fail."""
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a CPU matmul or convolution on ``x`` computes in: CPU
    autocast's dtype for an fp32 ``x`` under it, else ``x.dtype``."""
    if x.dtype is torch.float32 and x.is_cpu and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def values_key(t: Tensor) -> tuple:
    """A key that changes when ``t``'s values are replaced or changed in
    place, for caches derived from a parameter: its storage, its version
    counter, dtype and device. A cache must keep ``t.detach()`` alive with
    its entry, so that no new tensor can take the same storage address
    while the key is compared. Inference tensors (made under
    ``torch.inference_mode``) have no version counter: their in-place
    changes are not seen."""
    return (t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device)


def bucket(n: int) -> int:
    """``n`` rounded up to a power of 2: batch sizes share a measurement
    per octave."""
    return 1 << max(0, n - 1).bit_length()


class Choice:
    """A measured choice among ``options`` (the first is the default),
    keyed by shape tuples; fixed by ``ADAPTOK_<NAME>`` or :meth:`force`."""

    def __init__(self, name: str, options: tuple[str, ...]):
        self.name, self.options = name, tuple(options)
        self.env = f"ADAPTOK_{name.upper()}"
        self._forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
            f"adaptok_{name}", default=os.environ.get(self.env) or None)
        if self._forced.get() not in (None, *self.options):
            raise ValueError(f"{self.env} must be one of {', '.join(self.options)} (or unset), "
                             f"got {self._forced.get()!r}")
        self._measured: dict[tuple, str] = {}
        self._lock = threading.Lock()
        _CHOICES[name] = self

    def __repr__(self) -> str:
        return f"Choice({self.name!r}, options={self.options})"

    @property
    def default(self) -> str:
        return self.options[0]

    @contextlib.contextmanager
    def force(self, option: Optional[str]) -> Iterator[None]:
        """Take ``option`` for every call inside the block (None: the
        measured choice). Overrides the environment variable."""
        if option is not None and option not in self.options:
            raise ValueError(f"unknown {self.name} option {option!r}; choose one of {', '.join(self.options)} "
                             "(or None for the measured choice)")
        token = self._forced.set(option)
        try:
            yield
        finally:
            self._forced.reset(token)

    def forced(self) -> Optional[str]:
        """The option fixed by :meth:`force` or the environment, if any."""
        return self._forced.get()

    def get(self, key: tuple) -> Optional[str]:
        """The forced option, else the one measured for ``key``, else None."""
        forced = self._forced.get()
        return forced if forced is not None else self._measured.get(key)

    def measure(self, key: tuple, run: Callable[[str], Any]) -> Any:
        """Time ``run(option)`` for every option (interleaved, the best of
        :data:`MEASURE_CALLS` calls each), keep the fastest for ``key`` and
        return its result."""
        best_time = {o: float("inf") for o in self.options}
        results = {}
        for r in range(1 + MEASURE_CALLS):
            for option in (self.options if r % 2 == 0 else self.options[::-1]):
                start = time.perf_counter()
                results[option] = run(option)
                if r:
                    best_time[option] = min(best_time[option], time.perf_counter() - start)
        best = min(self.options, key=best_time.__getitem__)
        with self._lock:
            best = self._measured.setdefault(key, best)
        return results[best]

    def settle(self, key: tuple, option: str) -> None:
        """Record ``option`` for ``key`` without timing (the others cannot
        run there)."""
        with self._lock:
            self._measured.setdefault(key, option)

    def measured(self) -> dict[tuple, str]:
        """``{key: option}`` measured so far in this process."""
        return dict(self._measured)

    def clear(self) -> None:
        """Forget the measurements (the next call of each shape measures
        again)."""
        with self._lock:
            self._measured.clear()


def measured() -> dict[str, dict[tuple, str]]:
    """Every choice's measurements so far: ``{name: {key: option}}``."""
    return {name: c.measured() for name, c in _CHOICES.items()}


def clear() -> None:
    """Forget every measurement."""
    for c in _CHOICES.values():
        c.clear()
