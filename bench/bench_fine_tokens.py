"""CF-ViT's fine-stage sequences (``adaptok.ops.fine_tokens``): adaptok's
backends next to the official code's chain and a plain copy of the op's
bytes, the floor the issue sets (within 1.2x of it).

Providers (skipped with a reason where they cannot run):

- ``adaptok <backend>``: the op forced to a backend (``adaptok torch`` is
  its reference, ``fine_tokens_reference``);
- ``official chain``: what the official code does, in plain PyTorch:
  argsort of the scores, index arithmetic for the four children, a gather
  of the fine patches (the reuse features and positions added to every
  fine patch first, as it adds them before choosing), a gather of the
  other coarse patches, and a concatenation behind the CLS token;
- ``plain copy``: ``dst.copy_(src)`` of half the op's fewest bytes each
  way, so the copy moves exactly as many bytes as the op must.

Shape: DeiT-S-like, C = 384, a 7x7 coarse grid (14x14 fine), alpha 0.5
(K = 25), one prefix token: 256 images in bfloat16 on a GPU, 64 in float32
on the CPU, plus a 4-image shape on which the Triton interpreter runs too
(a check that it runs, not a timing).
"""
import functools

import pytest
import torch

import adaptok
from adaptok.backends import BACKENDS
from adaptok.ops.fine_tokens import FINE_TOKENS, children

from conftest import DEVICE, ON_GPU

CHANNELS, GRID, KEEP = 384, 7, 25
DTYPE, IMAGES = (torch.bfloat16, (256,)) if ON_GPU else (torch.float32, (4, 64))
SMOKE = 4
PROVIDERS = [*(f"adaptok {b}" for b in BACKENDS), "official chain", "plain copy"]


@functools.lru_cache(maxsize=None)
def inputs(images):
    """``(fine [B, 4 Nc, C]`` as the channels-last convolution leaves it,
    ``coarse [B, Nc, C]``, ``score [B, Nc]`` fp32, ``pos [4 Nc, C]``,
    ``prefix [1, C]``, ``reuse [B, Nc, C])``."""
    g = torch.Generator().manual_seed(0)
    Nc = GRID * GRID
    conv = torch.randn(images, 2 * GRID, 2 * GRID, CHANNELS, generator=g).to(DEVICE, DTYPE)
    fine = conv.flatten(1, 2)
    coarse, reuse = (torch.randn(images, Nc, CHANNELS, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    score = torch.rand(images, Nc, generator=g).to(DEVICE)
    pos = torch.randn(4 * Nc, CHANNELS, generator=g).to(DEVICE, DTYPE)
    prefix = torch.randn(1, CHANNELS, generator=g).to(DEVICE, DTYPE)
    return fine, coarse, score, pos, prefix, reuse


def fewest_bytes(images) -> int:
    """Read the 4K chosen fine rows and their positions, the K reuse rows,
    the Nc - K other coarse rows and the prefix; write every output row."""
    fine, coarse, *_ = inputs(images)
    Nc, e = GRID * GRID, fine.element_size()
    rows_read = images * (4 * KEEP + KEEP + Nc - KEEP) + 4 * Nc + 1
    rows_written = images * (1 + Nc + 3 * KEEP)
    return (rows_read + rows_written) * CHANNELS * e


def official(fine, coarse, score, pos, prefix, reuse):
    B, Nc, C = coarse.shape
    w = GRID
    up = reuse.reshape(B, GRID, 1, w, 1, C).expand(-1, -1, 2, -1, 2, -1).reshape(B, 4 * Nc, C)
    full = fine + up + pos
    order = torch.argsort(score, dim=1, descending=True)
    top, rest = order[:, :KEEP], order[:, KEEP:]
    idx = children(top, w).reshape(B, 4 * KEEP)
    chosen = torch.gather(full, 1, idx[..., None].expand(-1, -1, C))
    kept = torch.gather(coarse, 1, rest[..., None].expand(-1, -1, C))
    return torch.cat([prefix.expand(B, 1, C), chosen, kept], dim=1)


def provider_fn(provider, images):
    """The timed callable, or a ``str`` saying why the provider cannot run."""
    fine, coarse, score, pos, prefix, reuse = inputs(images)
    if provider.startswith("adaptok"):
        name = provider.split()[1]
        reason = FINE_TOKENS.why_not(name, fine, coarse, score, KEEP, GRID, GRID, pos, prefix, reuse)
        if reason is None and name == "triton" and not ON_GPU and images != SMOKE:
            reason = "the Triton interpreter runs only the small CPU shape"
        if reason is not None:
            return reason

        def run():
            with adaptok.backend(name):
                return adaptok.ops.fine_tokens(fine, coarse, score, KEEP, GRID, pos=pos, prefix=prefix, reuse=reuse)
        return run
    if provider == "official chain":
        return lambda: official(fine, coarse, score, pos, prefix, reuse)
    if provider == "plain copy":
        n = fewest_bytes(images) // 2 // fine.element_size()
        src, dst = torch.randn(n).to(DEVICE, DTYPE), torch.empty(n, device=DEVICE, dtype=DTYPE)
        return lambda: dst.copy_(src)
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("images", IMAGES, ids=lambda n: f"{n}img-grid7-keep25")
def bench_fine_tokens(bench, benchmark, images, provider):
    fn = provider_fn(provider, images)
    if isinstance(fn, str):
        pytest.skip(fn)
    benchmark.group = f"fine_tokens {images}img-grid7-keep25"
    benchmark.extra_info.update(
        op="fine_tokens", provider=provider, images=images, grid=GRID, keep=KEEP, channels=CHANNELS,
        dtype=str(DTYPE).replace("torch.", ""), interpreted=provider == "adaptok triton" and not ON_GPU,
        family="floor" if provider == "plain copy" else None,
        flops=images * 4 * KEEP * CHANNELS * 2, bytes=fewest_bytes(images),
    )
    if benchmark.extra_info["family"] is None:
        del benchmark.extra_info["family"]
    bench(fn)
