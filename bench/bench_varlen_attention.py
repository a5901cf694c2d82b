"""Variable-length attention: adaptok's backends side by side with what a
PyTorch user has for a batch of sequences of different lengths.

Providers (each skipped with its reason where it cannot run):

- ``adaptok <backend>``: ``adaptok.varlen_attention`` forced to a backend, and
  ``adaptok <backend> +cls_attn`` also returning the class attention (the
  backward then also flows through it, as in EViT training);
- ``sdpa loop``: ``F.scaled_dot_product_attention`` once per sequence;
- ``sdpa padded``: SDPA on the batch padded to the longest sequence with a key
  mask (padding done beforehand, so only attention is timed);
- ``sdpa nested``: SDPA on nested (jagged) tensors;
- ``torch varlen``: ``torch.nn.attention.varlen.varlen_attn``, where torch has it;
- ``flex``: compiled FlexAttention with a document mask built beforehand, and
  ``flex +mask``, which also builds the mask, as a model must when its
  batch's lengths change;
- ``flash-attn``: ``flash_attn_varlen_func``, when installed.

Shapes: D = 64, mixes of 50- and 197-token sequences. On a GPU, bf16, H = 6
and 12, 64, 256 and 1024 images, all 50, all 197 and 50/50. On the CPU,
fp32, H = 6, 64 images 50/50, plus a 4-image shape on which the Triton
interpreter runs too (a check that it runs, not a timing). Each result carries
its FLOPs and bytes (``adaptok.bench.timing.attention_work``);
``bench/report.py`` turns the json into a table against the floors.
"""
import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import adaptok
from adaptok.backends import BACKENDS
from adaptok.bench.timing import attention_work
from adaptok.ops.varlen_attention import VARLEN_ATTENTION
from adaptok.ops.common import cu_seqlens as cu_seqlens_of

from conftest import DEVICE, ON_GPU

HEAD_DIM = 64
MIXES = {"50": (50,), "197": (197,), "50/50": (50, 197)}
if ON_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(images, heads, mix) for heads in (6, 12) for images in (64, 256, 1024) for mix in MIXES]
else:
    DTYPE = torch.float32
    SHAPES = [(4, 2, "50/50"), (64, 6, "50/50")]
SMOKE = (4, 2, "50/50")  # the CPU shape the Triton interpreter also runs

ADAPTOK = [f"adaptok {b}{cls}" for b in BACKENDS for cls in ("", " +cls_attn")]
PROVIDERS = [*ADAPTOK, "sdpa loop", "sdpa padded", "sdpa nested", "torch varlen", "flex", "flex +mask", "flash-attn"]
MODES = ["fwd", "fwd+bwd"]


def shape_id(shape):
    images, heads, mix = shape
    return f"{images}img-H{heads}-{mix.replace('/', '_')}"


@functools.lru_cache(maxsize=1)
def inputs(shape, backward):
    """Packed q, k, v ``[T, H, D]``, the upstream gradient and the lengths."""
    images, heads, mix = shape
    lengths = [MIXES[mix][i % len(MIXES[mix])] for i in range(images)]
    g = torch.Generator().manual_seed(0)
    T = sum(lengths)
    q, k, v, grad = (torch.randn(T, heads, HEAD_DIM, generator=g).to(DEVICE, DTYPE) for _ in range(4))
    if backward:
        for t in (q, k, v):
            t.requires_grad_()
    cu = cu_seqlens_of(lengths, DEVICE)
    return q, k, v, grad, cu, lengths


def _step(forward, leaves, backward):
    """``forward() -> (outputs, upstream grads)``; fwd+bwd also computes the
    gradients of ``leaves`` (torch.autograd.grad: nothing accumulates)."""
    def step():
        outputs, grads = forward()
        if backward:
            torch.autograd.grad(outputs, leaves, grads)
    return step


def provider_fn(provider, shape, backward):
    """The timed callable, or a ``str`` saying why the provider cannot run."""
    q, k, v, grad, cu, lengths = inputs(shape, backward)
    T, H, D = q.shape
    L = max(lengths)
    leaves = (q, k, v)

    if provider.startswith("adaptok"):
        name, cls = provider.split()[1], provider.endswith("+cls_attn")
        reason = VARLEN_ATTENTION.why_not(name, q, k, v, cu, L, D ** -0.5, cls)
        if reason is None and name == "triton" and not ON_GPU and shape != SMOKE:
            reason = "the Triton interpreter runs only the small CPU shape"
        if reason is not None:
            return reason
        cls_grad = torch.randn(T, device=DEVICE)

        def forward():
            with adaptok.backend(name):
                if cls:
                    out, cls_attn = adaptok.varlen_attention(q, k, v, cu, L, return_cls_attn=True)
                    return [out, cls_attn], [grad, cls_grad]
                return [adaptok.varlen_attention(q, k, v, cu, L)], [grad]
        return _step(forward, leaves, backward)

    if provider == "sdpa loop":
        bounds = cu.tolist()

        def forward():
            outs = [F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1) for x in leaves))
                    for s, e in zip(bounds[:-1], bounds[1:])]
            return [torch.cat([o.transpose(0, 1) for o in outs])], [grad]
        return _step(forward, leaves, backward)

    if provider == "sdpa padded":
        padded = [adaptok.ops.unpack(x.detach(), cu, L).transpose(1, 2).contiguous().requires_grad_(backward)
                  for x in leaves]  # [B, H, L, D]
        keep = torch.arange(L, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
        mask = keep[:, None, None, :]
        g_padded = adaptok.ops.unpack(grad, cu, L).transpose(1, 2).contiguous()
        return _step(lambda: ([F.scaled_dot_product_attention(*padded, attn_mask=mask)], [g_padded]), padded, backward)

    if provider == "sdpa nested":
        offsets = cu.long()
        nested = [torch.nested.nested_tensor_from_jagged(x.detach(), offsets).transpose(1, 2).requires_grad_(backward)
                  for x in leaves]
        g_nested = torch.nested.nested_tensor_from_jagged(grad, offsets).transpose(1, 2)
        return _step(lambda: ([F.scaled_dot_product_attention(*nested)], [g_nested]), nested, backward)

    if provider == "torch varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        from torch.nn.attention.varlen import varlen_attn

        if not ON_GPU:
            return "varlen_attn runs on CUDA only"
        return _step(lambda: ([varlen_attn(q, k, v, cu, cu, L, L)], [grad]), leaves, backward)

    if provider in ("flex", "flex +mask"):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if backward and not ON_GPU:
            return f"FlexAttention has no CPU backward in torch {torch.__version__}"

        doc = torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE))

        def same_sequence(b, h, qi, ki):
            return doc[qi] == doc[ki]

        flat = [x.detach().transpose(0, 1)[None].contiguous().requires_grad_(backward) for x in leaves]  # [1, H, T, D]
        g_flat = grad.transpose(0, 1)[None].contiguous()
        torch._dynamo.reset()  # a fresh, static-shape compile for every shape
        attend = torch.compile(flex_attention, dynamic=False)
        fixed = create_block_mask(same_sequence, None, None, T, T, device=str(DEVICE))

        def forward():
            block_mask = create_block_mask(same_sequence, None, None, T, T, device=str(DEVICE)) if provider == "flex +mask" else fixed
            return [attend(*flat, block_mask=block_mask)], [g_flat]
        return _step(forward, flat, backward)

    if provider == "flash-attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed"
        if not ON_GPU:
            return "flash-attn runs on CUDA only"
        from flash_attn import flash_attn_varlen_func

        return _step(lambda: ([flash_attn_varlen_func(q, k, v, cu, cu, L, L)], [grad]), leaves, backward)

    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def bench_varlen_attention(bench, benchmark, shape, mode, provider):
    backward = mode == "fwd+bwd"
    fn = provider_fn(provider, shape, backward)
    if isinstance(fn, str):
        pytest.skip(fn)
    images, heads, mix = shape
    lengths = inputs(shape, backward)[5]
    benchmark.group = f"varlen_attention {mode} {shape_id(shape)}"
    benchmark.extra_info.update(
        op="varlen_attention", provider=provider, mode=mode, images=images, heads=heads, head_dim=HEAD_DIM,
        mix=mix, dtype=str(DTYPE).replace("torch.", ""), tokens=sum(lengths),
        interpreted=provider.startswith("adaptok triton") and not ON_GPU,
        **attention_work(lengths, heads, HEAD_DIM, DTYPE.itemsize, backward=backward,
                         cls=provider.endswith("+cls_attn")),
    )
    bench(fn)
