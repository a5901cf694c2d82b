"""Linear layers on the path measured fastest for the call's shape.

timm's ``nn.Linear`` runs ``addmm`` on the weight as stored, which on the
CPU lays out (and in fp32 hands to a BLAS that re-blocks) the weight on
every call. oneDNN can instead multiply by a copy of the weight reordered
once into its blocked layout. For the small row counts of one image that
saves a third of the time: measured on the 2-core AVX-512 BF16 machine,
DeiT-S's shapes, median of 200 calls, ``[50, 384] @ [384, 1536]`` took
0.48 ms by ``addmm`` against 0.32 ms prepacked in fp32 (0.18 against 0.16
ms in bf16), ``[197, 384] @ [384, 1536]`` 1.31 against 1.16 ms in fp32.
Which is faster depends on the shape and the machine, so the choice is
measured per shape (:data:`LINEAR`, :mod:`adaptok.tuning`). The two give the
same result to rounding (oneDNN sums in another order).

:func:`adapt_linears` (run by :func:`adaptok.patch`) gives a model's
``nn.Linear`` layers this forward in place (:class:`AdaptiveLinear`: same
parameters, state-dict keys and hooks). CUDA, float64 and fp16, calls that
cannot be timed (autograd in either mode, ``torch.func`` transforms,
tracing, compiling), ``torch.backends.mkldnn.flags(enabled=False)`` and
CPUs without oneDNN take ``F.linear``, timm's call; so does a shape oneDNN
fails on when it is measured.

The reordered weight is a cache: one per layer and compute dtype, built on
the first measured call and rebuilt when the weight changes in place (its
version counter: optimizer steps, ``load_state_dict``, EMA updates) or is
replaced (the entry keeps an alias of the weight it was made from, so a new
weight cannot reuse its address). Writes through ``.data``, and in-place
changes of weights made under ``torch.inference_mode`` (no version
counter), are not seen: call :meth:`AdaptiveLinear.clear_packed`. The cache
doubles the memory of the weights it covers, is never saved, copied or
pickled, and ``ADAPTOK_LINEAR=linear`` turns the path off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tuning import Choice, bucket, compute_dtype, measurable, values_key

# timm's F.linear, or oneDNN's matmul with the weight prepacked
# (ADAPTOK_LINEAR=linear|packed fixes it; see adaptok.tuning).
LINEAR = Choice("linear", ("linear", "packed"))


def _onednn_dtypes() -> frozenset:
    """Compute dtypes oneDNN's prepacked linear runs on this CPU."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight")):
        return frozenset()
    supported = {torch.float32}
    if hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported():
        supported.add(torch.bfloat16)
    return frozenset(supported)


_PACKABLE = _onednn_dtypes()


class AdaptiveLinear(nn.Linear):
    """``nn.Linear`` whose forward takes the formulation :data:`LINEAR`
    measured fastest for the call's shape: ``x [..., in] -> [..., out]``."""

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cpu:  # CUDA: timm's call, one check
            return F.linear(x, self.weight, self.bias)
        return linear(self, x)

    def clear_packed(self) -> None:
        """Forget the reordered weights (rebuilt on the next call)."""
        self.__dict__.pop("_adaptok_packed", None)

    def __getstate__(self):  # copies and pickles hold no opaque oneDNN tensor
        state = dict(super().__getstate__())
        state.pop("_adaptok_packed", None)
        return state


def adapt_linears(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` in ``module`` (not its subclasses,
    which may compute something else) into an :class:`AdaptiveLinear`, in
    place; returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = AdaptiveLinear
    return module


def linear(module: nn.Linear, x: Tensor) -> Tensor:
    """``module``'s map on ``x [..., in_features]``: ``F.linear``, or the
    prepacked oneDNN matmul where :data:`LINEAR` measured it faster. The
    checks run on every call of every layer, cheapest first (a few hundred
    ns each on the CPU decide a forward's host overhead)."""
    weight, bias = module.weight, module.bias
    if not _PACKABLE or x.dim() < 2 or not measurable(x, params=(weight, bias)):
        return F.linear(x, weight, bias)  # autograd, tracing, compiling, empty, CUDA: timm's call, even when forced
    dtype = compute_dtype(x)
    if dtype is not x.dtype:  # autocast casts x, weight and bias to its dtype
        if weight.dtype not in (torch.float32, torch.bfloat16):
            return F.linear(x, weight, bias)
    elif weight.dtype is not dtype:
        return F.linear(x, weight, bias)  # F.linear names the mismatch
    if dtype not in _PACKABLE or x.shape[-1] != module.in_features or not module.in_features * module.out_features:
        return F.linear(x, weight, bias)
    if not torch._C._get_mkldnn_enabled():  # torch.backends.mkldnn.flags(enabled=False); read after compiling is ruled out
        return F.linear(x, weight, bias)
    path = LINEAR.forced()
    if path is None:
        key = (dtype, x.dtype is not dtype, bucket(x.numel() // module.in_features), module.in_features,
               module.out_features, bias is not None)
        path = LINEAR.get(key)
        if path is None:
            try:
                packed = _packed(module, dtype)
                return LINEAR.measure(key, lambda p: _run(p, x, weight, bias, packed, dtype))
            except RuntimeError:  # oneDNN cannot run this layer here (a build, a CPU, a shape)
                LINEAR.settle(key, "linear")
                module.__dict__.pop("_adaptok_packed", None)
                return F.linear(x, weight, bias)
    if path == "linear":
        return F.linear(x, weight, bias)
    return _run("packed", x, weight, bias, _packed(module, dtype), dtype)


def _packed(module: nn.Linear, dtype: torch.dtype) -> Tensor:
    """``module``'s weight in ``dtype``, reordered for oneDNN (cached with
    an alias of the weight it was made from, so that no new weight can take
    that storage address while the entry lives)."""
    weight = module.weight
    key = values_key(weight)
    cache = module.__dict__.get("_adaptok_packed")
    if cache is not None and dtype in cache and cache[dtype][0] == key:
        return cache[dtype][2]
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None)
    cache = {d: v for d, v in (cache or {}).items() if v[0] == key}  # drop the packs of old weights
    cache[dtype] = (key, weight.detach(), packed)
    module.__dict__["_adaptok_packed"] = cache
    return packed


def _run(path: str, x: Tensor, weight: Tensor, bias, packed: Tensor, dtype: torch.dtype) -> Tensor:
    if path == "linear":
        return F.linear(x, weight, bias)
    if bias is not None and bias.dtype is not dtype:
        bias = bias.to(dtype)
    if x.dtype is not dtype:
        x = x.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
