"""Segment layer norm (ReViT's token-length-aware LayerNorm): adaptok's
backends side by side with what PyTorch offers for a batch that mixes grids.

Providers, each computing ``h = x + residual`` and ``y = LayerNorm_g(h)``
with the weight and bias of each sequence's grid g (skipped with a reason
where they cannot run):

- ``adaptok <backend>``: ``adaptok.ops.segment_layer_norm`` forced to a
  backend, the residual add fused;
- ``layer_norm per grid``: one ``F.layer_norm`` per grid over that grid's
  rows (gathered with an index built beforehand), scattered back;
- ``gathered affine``: ``F.layer_norm`` without affine, then each row's
  weight and bias gathered by its grid;
- ``layer_norm, one pair``: a single ``F.layer_norm`` over the whole batch
  with one weight and bias: not the same computation (every grid shares the
  pair), the speed a model without per-grid norms gets.

Shapes: C = 384, a 50/50 mix of 7x7 and 14x14 images (50 and 197 tokens) and
a 3-way mix with 10x10 (101 tokens). On a GPU, bf16 at 256 and 1024 images;
on the CPU, fp32 at 64 and 256 images, plus a 4-image shape on which the
Triton interpreter runs too (a check that it runs, not a timing).
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import adaptok
from adaptok.backends import BACKENDS
from adaptok.ops.segment_layer_norm import SEGMENT_LAYER_NORM
from adaptok.ops.common import cu_seqlens as cu_seqlens_of

from conftest import DEVICE, ON_GPU

CHANNELS = 384
EPS = 1e-6
MIXES = {"7_14": (7, 14), "7_10_14": (7, 10, 14)}
GRIDS = (14, 10, 7)  # group g uses weight[g]
if ON_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(images, mix) for images in (256, 1024) for mix in MIXES]
else:
    DTYPE = torch.float32
    SHAPES = [(4, "7_14"), *[(images, mix) for images in (64, 256) for mix in MIXES]]
SMOKE = (4, "7_14")
PROVIDERS = [*(f"adaptok {b}" for b in BACKENDS), "layer_norm per grid", "gathered affine", "layer_norm, one pair"]


def shape_id(shape):
    images, mix = shape
    return f"{images}img-grids{mix}"


@functools.lru_cache(maxsize=1)
def inputs(shape):
    images, mix = shape
    grids = [MIXES[mix][i % len(MIXES[mix])] for i in range(images)]
    lengths = [g * g + 1 for g in grids]
    g = torch.Generator().manual_seed(0)
    T = sum(lengths)
    x, residual = (torch.randn(T, CHANNELS, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(len(GRIDS), CHANNELS, generator=g)).to(DEVICE, DTYPE)
    bias = (0.1 * torch.randn(len(GRIDS), CHANNELS, generator=g)).to(DEVICE, DTYPE)
    cu = cu_seqlens_of(lengths, DEVICE)
    group = torch.tensor([GRIDS.index(n) for n in grids], dtype=torch.int32, device=DEVICE)
    row_group = torch.repeat_interleave(group.long(), torch.tensor(lengths, device=DEVICE))
    return x, residual, weight, bias, cu, group, row_group, lengths


def provider_fn(provider, shape):
    """The timed callable, or a ``str`` saying why the provider cannot run."""
    x, residual, weight, bias, cu, group, row_group, _ = inputs(shape)
    if provider.startswith("adaptok"):
        name = provider.split()[1]
        reason = SEGMENT_LAYER_NORM.why_not(name, x, residual, weight, bias, cu, group, EPS)
        if reason is None and name == "triton" and not ON_GPU and shape != SMOKE:
            reason = "the Triton interpreter runs only the small CPU shape"
        if reason is not None:
            return reason

        def run():
            with adaptok.backend(name):
                adaptok.ops.segment_layer_norm(x, cu, group, weight, bias, EPS, residual=residual)
        return run

    if provider == "layer_norm per grid":
        rows = [(g, (row_group == g).nonzero().squeeze(1)) for g in range(len(GRIDS))]
        rows = [(g, r) for g, r in rows if r.numel()]

        def run():
            h = x + residual
            y = torch.empty_like(h)
            for g, r in rows:
                y[r] = F.layer_norm(h[r], (CHANNELS,), weight[g], bias[g], EPS)
            return y, h
        return run
    if provider == "gathered affine":
        def run():
            h = x + residual
            return F.layer_norm(h, (CHANNELS,), eps=EPS) * weight[row_group] + bias[row_group], h
        return run
    if provider == "layer_norm, one pair":
        def run():
            h = x + residual
            return F.layer_norm(h, (CHANNELS,), weight[0], bias[0], EPS), h
        return run
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def bench_segment_layer_norm(bench, benchmark, shape, provider):
    fn = provider_fn(provider, shape)
    if isinstance(fn, str):
        pytest.skip(fn)
    images, mix = shape
    x = inputs(shape)[0]
    T = x.shape[0]
    benchmark.group = f"segment_layer_norm {shape_id(shape)}"
    benchmark.extra_info.update(
        op="segment_layer_norm", provider=provider, images=images, mix=mix, channels=CHANNELS,
        dtype=str(DTYPE).replace("torch.", ""), tokens=T,
        interpreted=provider == "adaptok triton" and not ON_GPU,
        # The fewest bytes: read x and the residual, write y and h.
        flops=8 * T * CHANNELS, bytes=4 * T * CHANNELS * x.element_size(),
    )
    bench(fn)
