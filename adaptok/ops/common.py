"""Helpers shared by every op: the dtypes the kernels serve, the lazy Triton
loader, ``cu_seqlens`` from lengths, output allocation and input validation.

Validation that reads only metadata (dtype, device, shape) always runs, also
while tracing under ``torch.compile``. Validation that reads ``cu_seqlens``
values runs for CPU tensors (free) and, because it forces a host-device sync,
for CUDA tensors only with ``ADAPTOK_DEBUG=1``; the CUDA kernels stay in
bounds for any ``cu_seqlens``.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import operator
import os
from typing import Iterator, Optional, Sequence

import torch

# The floating dtypes the compiled and Triton kernels serve.
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def triton_kernels(op: str):
    """The Triton kernel module of ``op`` (``adaptok.kernels.<op>``),
    imported on first use so that ``import adaptok`` never imports triton."""
    return importlib.import_module(f"adaptok.kernels.{op}")


def cu_seqlens(lengths: Sequence[int], device) -> torch.Tensor:
    """int32 ``[B + 1]`` running sum of host ``lengths``, copied to ``device``
    without a sync."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32).to(device, non_blocking=True)


_poison = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every output the kernels allocate with NaN (or the dtype's max for
    integers) so that elements a kernel fails to write show up in tests."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape: Sequence[int], like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.empty`` on ``like``'s device with ``dtype`` (default: ``like``'s),
    poisoned in tests."""
    out = torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device)
    if _poison:
        if out.is_floating_point() or out.is_complex():
            out.fill_(float("nan"))
        else:
            out.fill_(True if out.dtype == torch.bool else torch.iinfo(out.dtype).max)
    return out


def check_values_now(t: torch.Tensor) -> bool:
    """Whether value checks on ``t`` run (they would force a sync on a GPU)."""
    return t.device.type == "cpu" or os.environ.get("ADAPTOK_DEBUG") == "1"


def check_values_in_python(impl, cu_seqlens: torch.Tensor) -> bool:
    """Whether the op layer checks ``cu_seqlens`` values before running
    ``impl``: the C++ CPU kernels check them themselves (TORCH_CHECK)."""
    return impl.backend != "cpu" and check_values_now(cu_seqlens)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_tensors(**tensors) -> None:
    """TypeError naming the first argument that is not a tensor."""
    for name, t in tensors.items():
        check_tensor(t, name)


INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def host_int(value, name: str, low: int = 0, high: int = INT32_MAX) -> int:
    """``value`` (an int, a numpy int or a 0-d integer tensor, not a bool) as
    a host int in ``[low, high]``; otherwise a TypeError or ValueError naming
    ``name``. SymInts (``torch.compile``) pass through."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{name} must be <= {high} (int32 offsets), got {value}")
    return value


def host_float(value, name: str) -> float:
    """``value`` (a Python, numpy or 0-d tensor real number, not a bool or a
    string) as a Python float; otherwise a TypeError naming ``name``."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_float32_scalar(value: float, name: str) -> None:
    """The rule every backend shares for a scalar the kernels compute with in
    fp32 (an attention scale): finite and within the float32 range."""
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ValueError(f"{name} must be finite and within the float32 range (|{name}| <= {FLOAT32_MAX:.4g}), "
                         f"got {value}")


def check_fill_value(value: float, dtype: torch.dtype, name: str) -> None:
    """A fill value must be representable in ``dtype``: a finite value past
    the dtype's range would overflow (to inf on some backends, to an error
    on others); inf and NaN themselves are representable."""
    if dtype.is_floating_point and math.isfinite(value) and abs(value) > torch.finfo(dtype).max:
        raise ValueError(f"{name} = {value:g} overflows {str(dtype).replace('torch.', '')} "
                         f"(largest finite value {torch.finfo(dtype).max:.6g})")


def check_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_cu_seqlens(cu: torch.Tensor, ref: torch.Tensor, ref_name: str, name: str = "cu_seqlens") -> None:
    """Metadata of a ``cu_seqlens``: int32, 1-D of length B + 1 with B >= 1, on ``ref``'s device."""
    check_tensor(cu, name)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D of length B + 1 with B >= 1 (an empty batch is not allowed), got shape {tuple(cu.shape)}")
    check_same_device(cu, name, ref, ref_name)


def check_cu_seqlens_values(cu: torch.Tensor, total: int, name: str = "cu_seqlens", total_name: str = "the token count") -> None:
    """Values of a ``cu_seqlens``: starts at 0, strictly increasing (every
    sequence holds at least one token), ends at ``total``."""
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"{name} must start at 0, got {c[0]}")
    for i in range(1, len(c)):
        if c[i] <= c[i - 1]:
            raise ValueError(
                f"{name} must be strictly increasing (every sequence needs at least one token), got {c[i - 1]} then {c[i]} at index {i}"
            )
    if c[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {c[-1]}")


def check_max_len(cu: torch.Tensor, limit: int, what: str, name: str = "cu_seqlens") -> None:
    longest = int(cu.diff().max())
    if longest > limit:
        raise ValueError(f"{name} holds a sequence of {longest} tokens, more than {what} = {limit}")


def seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]`` int64: the sequence each packed token belongs to (no sync)."""
    batch = cu_seqlens.shape[0] - 1
    return torch.repeat_interleave(
        torch.arange(batch, device=cu_seqlens.device), cu_seqlens.diff(), output_size=total
    )


def positions(cu_seqlens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[total]`` int64: each packed token's position inside its sequence."""
    return torch.arange(ids.shape[0], device=ids.device) - cu_seqlens[ids].long()


def dispatcher_needed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op call must go through ``torch.ops`` (the dispatcher) to be
    right: to record autograd, while ``torch.compile``/``torch.export`` or
    ``torch.jit`` trace, under a Python dispatch or function mode, or on a
    tensor subclass (fake tensors...). Otherwise the hot paths of the model
    call the op's body directly: the dispatcher's round trip through Python
    costs about 20 us a call on the CPU (measured), a sixth of a small ViT
    block at batch size 1. Checks and backend choice are the same either way."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._is_torch_function_mode_enabled():
        return True
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None or (
            torch.utils._python_dispatch._get_current_dispatch_mode() is not None):
        return True
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return True
        if torch._C._functorch.is_functorch_wrapped_tensor(t):  # vmap, grad transforms
            return True
        if grad and t.requires_grad:
            return True
    return False

