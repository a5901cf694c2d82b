"""Patch packing (a ViT's embedding step for a batch that mixes grids):
adaptok's backends next to the way it is written in plain PyTorch.

Providers, each turning the patch convolutions' outputs into one packed
batch with the CLS token in front of every image and each grid's position
embeddings added (skipped with a reason where they cannot run):

- ``adaptok <backend>``: ``adaptok.ops.pack_patches`` forced to a backend
  (``adaptok torch`` is the op's reference, ``pack_patches_reference``);
- ``plain pytorch``: per grid, ``torch.cat([cls.expand(B, -1, -1), x + pos],
  1)``, then ``torch.cat`` of the grids' rows.

Shape: DeiT-S-like, C = 384, one prefix token, the patches as the
convolution leaves them (``[B, C, h, w]`` seen as ``[B, P, C]``), half the
images on a 7x7 grid and half on 14x14: 256 images in bfloat16 on a GPU, 32
in float32 on the CPU, plus a 4-image shape on which the Triton interpreter
runs too (a check that it runs, not a timing).
"""
import functools

import pytest
import torch

import adaptok
from adaptok.backends import BACKENDS
from adaptok.ops.pack_patches import PACK_PATCHES, output_rows

from conftest import DEVICE, ON_GPU

CHANNELS = 384
GRIDS = (7, 14)
DTYPE, IMAGES = (torch.bfloat16, (256,)) if ON_GPU else (torch.float32, (4, 32))
SMOKE = 4
PROVIDERS = [*(f"adaptok {b}" for b in BACKENDS), "plain pytorch"]


@functools.lru_cache(maxsize=None)
def inputs(images):
    """Per grid: the patches ``[B, P, C]`` (a view of the convolution's
    ``[B, C, h, w]`` output) and pos ``[P, C]``; the CLS token ``[1, C]``."""
    g = torch.Generator().manual_seed(0)
    per_grid = images // len(GRIDS)
    convs = [torch.randn(per_grid, CHANNELS, s, s, generator=g).to(DEVICE, DTYPE) for s in GRIDS]
    patches = [c.flatten(2).transpose(1, 2) for c in convs]
    pos = [torch.randn(s * s, CHANNELS, generator=g).to(DEVICE, DTYPE) for s in GRIDS]
    return patches, pos, torch.randn(1, CHANNELS, generator=g).to(DEVICE, DTYPE)


def provider_fn(provider, images):
    """The timed callable, or a ``str`` saying why the provider cannot run."""
    patches, pos, cls = inputs(images)
    if provider.startswith("adaptok"):
        name = provider.split()[1]
        reason = PACK_PATCHES.why_not(name, patches, pos, cls)
        if reason is None and name == "triton" and not ON_GPU and images != SMOKE:
            reason = "the Triton interpreter runs only the small CPU shape"
        if reason is not None:
            return reason

        def run():
            with adaptok.backend(name):
                return adaptok.ops.pack_patches(patches, pos, cls)
        return run

    if provider == "plain pytorch":
        def run():
            rows = [torch.cat([cls.expand(x.shape[0], -1, -1), x + p], 1).flatten(0, 1) for x, p in zip(patches, pos)]
            return torch.cat(rows)
        return run
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("images", IMAGES, ids=lambda n: f"{n}img-grids7_14")
def bench_pack_patches(bench, benchmark, images, provider):
    fn = provider_fn(provider, images)
    if isinstance(fn, str):
        pytest.skip(fn)
    patches, pos, cls = inputs(images)
    T = output_rows(patches, cls)
    element = patches[0].element_size()
    benchmark.group = f"pack_patches {images}img-grids7_14"
    benchmark.extra_info.update(
        op="pack_patches", provider=provider, images=images, grids=list(GRIDS), channels=CHANNELS,
        dtype=str(DTYPE).replace("torch.", ""), tokens=T,
        interpreted=provider == "adaptok triton" and not ON_GPU,
        # The fewest bytes: read the patches and each table once, write out.
        flops=sum(x.numel() for x in patches),
        bytes=(sum(x.numel() for x in patches) + sum(p.numel() for p in pos) + cls.numel() + T * CHANNELS) * element,
    )
    bench(fn)
