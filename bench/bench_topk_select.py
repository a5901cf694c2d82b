"""Top-k class-attention token selection with fusion: adaptok's backends side
by side with the PyTorch path EViT's code takes.

Providers (each skipped with its reason where it cannot run):

- ``adaptok <backend>``: ``adaptok.topk_select`` forced to a backend, with host
  lengths (as a RaggedBatch passes them): the whole call, output sizing and
  offset upload included;
- ``evit path``: on a uniform batch ``[B, N, C]``, ``topk`` (sorted) + ``gather``
  + the complement of the kept set found by a sort + ``gather`` + the weighted
  sum, the sequence of PyTorch ops EViT runs per pruning layer;
- ``evit padded``: the same on a ragged batch padded to its longest sequence
  (padding done beforehand; padded tokens score -1 so they rank last, and
  every sequence keeps the longest one's count, which a padded batch forces).

Shapes: N = 197 (uniform) and a 50/50 mix of 50 and 197 tokens (ragged),
C = 384, keep rate 0.7. On a GPU, bf16 at 1, 64, 256 and 1024 images. On the
CPU, fp32 at 1, 64 and 256 images, plus a 4-image shape on which the Triton
interpreter runs too (a check that it runs, not a timing).
"""
import functools
import math

import pytest
import torch

import adaptok
from adaptok.backends import BACKENDS
from adaptok.ops.topk_select import TOPK_SELECT, keep_counts, output_lengths
from adaptok.ops.common import cu_seqlens as cu_seqlens_of

from conftest import DEVICE, ON_GPU

CHANNELS = 384
KEEP_RATE = 0.7
MIXES = {"197": (197,), "50/50": (50, 197)}
if ON_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(images, mix) for images in (1, 64, 256, 1024) for mix in MIXES]
else:
    DTYPE = torch.float32
    SHAPES = [(4, "50/50"), *[(images, mix) for images in (1, 64, 256) for mix in MIXES]]
SMOKE = (4, "50/50")
PROVIDERS = [*(f"adaptok {b}" for b in BACKENDS), "evit path", "evit padded"]


def shape_id(shape):
    images, mix = shape
    return f"{images}img-{mix.replace('/', '_')}"


@functools.lru_cache(maxsize=1)
def inputs(shape):
    """Packed x ``[T, C]``, scores ``[T]`` (a softmax row per sequence, as
    class attention is), cu_seqlens and the lengths."""
    images, mix = shape
    lengths = [MIXES[mix][i % len(MIXES[mix])] for i in range(images)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), CHANNELS, generator=g).to(DEVICE, DTYPE)
    scores = torch.cat([torch.randn(n, generator=g).softmax(0) for n in lengths]).to(DEVICE)
    cu = cu_seqlens_of(lengths, DEVICE)
    return x, scores, cu, lengths


def evit_path(x, scores, k):
    """EViT's reorganization of ``x [B, N, C]`` with scores ``[B, N - 1]``
    (CLS excluded), as PyTorch ops: top-k, gather, complement by a sort,
    gather, weighted sum, concatenation."""
    B, N, C = x.shape
    tokens = x[:, 1:]
    top = scores.topk(k, dim=1, largest=True, sorted=True).indices  # [B, k]
    kept = tokens.gather(1, top[..., None].expand(-1, -1, C))
    # The complement: mark the kept positions with N (past every index),
    # sort, and take the first N - 1 - k.
    positions = torch.arange(N - 1, device=x.device).expand(B, -1)
    marked = positions.scatter(1, top, N - 1)
    rest = marked.sort(dim=1).values[:, :N - 1 - k]
    dropped = tokens.gather(1, rest[..., None].expand(-1, -1, C))
    weights = scores.gather(1, rest)
    fused = (dropped * weights[..., None]).sum(1, keepdim=True)
    return torch.cat([x[:, :1], kept, fused], dim=1)


def provider_fn(provider, shape):
    """The timed callable, or a ``str`` saying why the provider cannot run."""
    x, scores, cu, lengths = inputs(shape)
    if provider.startswith("adaptok"):
        name = provider.split()[1]
        keep = keep_counts(lengths, KEEP_RATE)
        out_lengths = output_lengths(lengths, keep, True)
        cu_out = cu_seqlens_of(out_lengths, DEVICE)
        reason = TOPK_SELECT.why_not(name, x, cu, scores, torch.tensor(keep, dtype=torch.int32, device=DEVICE),
                                     cu_out, sum(out_lengths), max(lengths), True, False)
        if reason is None and name == "triton" and not ON_GPU and shape != SMOKE:
            reason = "the Triton interpreter runs only the small CPU shape"
        if reason is not None:
            return reason

        def run():
            with adaptok.backend(name):
                adaptok.topk_select(x, cu, max(lengths), scores, keep_rate=KEEP_RATE, lengths=lengths)
        return run

    longest = max(lengths)
    k = math.ceil(KEEP_RATE * (longest - 1))
    if provider == "evit path":
        if len(set(lengths)) > 1:
            return "EViT's path needs a uniform batch (see evit padded)"
        # Scores in x's dtype, as in EViT's model (mixing would promote the output).
        xb, sb = x.view(len(lengths), longest, CHANNELS), scores.to(x.dtype).view(len(lengths), longest)[:, 1:]
        return lambda: evit_path(xb, sb, k)
    if provider == "evit padded":
        if len(set(lengths)) == 1:
            return "the batch is uniform (see evit path)"
        xb = adaptok.ops.unpack(x, cu, longest)
        sb = adaptok.ops.unpack(scores.to(x.dtype)[:, None], cu, longest, -1.0)[:, 1:, 0]
        return lambda: evit_path(xb, sb, k)
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def bench_topk_select(bench, benchmark, shape, provider):
    fn = provider_fn(provider, shape)
    if isinstance(fn, str):
        pytest.skip(fn)
    images, mix = shape
    x, _, _, lengths = inputs(shape)
    keep = keep_counts(lengths, KEEP_RATE)
    out_tokens = sum(output_lengths(lengths, keep, True))
    dropped = sum(n - 1 - k for n, k in zip(lengths, keep))
    benchmark.group = f"topk_select {shape_id(shape)}"
    benchmark.extra_info.update(
        op="topk_select", provider=provider, images=images, mix=mix, channels=CHANNELS, keep_rate=KEEP_RATE,
        dtype=str(DTYPE).replace("torch.", ""), tokens=sum(lengths), tokens_out=out_tokens,
        interpreted=provider == "adaptok triton" and not ON_GPU,
        # The fewest bytes: read x and the scores, write the output and its index.
        flops=2 * CHANNELS * dropped,
        bytes=(sum(lengths) + out_tokens) * CHANNELS * x.element_size() + 4 * sum(lengths) + 8 * out_tokens,
    )
    bench(fn)
