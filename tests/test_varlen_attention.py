"""adaptok.varlen_attention on every backend that implements it, against a
float64 reference computed sequence by sequence, and against PyTorch's own
error in the same low precision."""
import math

import pytest
import torch
import torch.nn.functional as F

import adaptok
from adaptok.ops.common import cu_seqlens as cu_seqlens_of, poison_outputs
from adaptok.ops.varlen_attention import (CUDA_HEAD_DIMS, VARLEN_ATTENTION, VARLEN_ATTENTION_BACKWARD,
                                          varlen_attention_backward_reference, varlen_attention_reference)

from conftest import backend_pairs, device_backend_id, require, use_device_backend

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LENGTHS = {
    "one": [1],
    "short": [2, 1, 3],
    "vit": [50, 197, 1, 2],
    "random": None,  # drawn per seed below
}


@pytest.fixture(params=backend_pairs(VARLEN_ATTENTION), ids=device_backend_id)
def attn_backend(request):
    return use_device_backend(request.param)


def supported(device, backend, dtype, head_dim=32):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 runs on a GPU")
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel serves fp16 and bf16 (fp32 runs on Triton)")
    if backend == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        pytest.skip(f"the CUDA kernel serves head dims {CUDA_HEAD_DIMS}")


def native_dtype(backend):
    """A dtype every backend's kernel serves: fp16 for the CUDA kernel, fp32
    for the others."""
    return torch.float16 if backend == "cuda" else torch.float32


def lengths_for(name, seed=0):
    if LENGTHS[name] is not None:
        return LENGTHS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 130, (5,), generator=g).tolist()


def make(lengths, heads, head_dim, dtype, device, seed=0, layout="qkv"):
    """q, k, v ``[T, H, D]`` as the views a model produces: ``qkv`` slices of
    ``[T, 3, H, D]`` (timm's layout), ``heads-first`` slices of
    ``[3, H, T, D]``, ``misaligned`` (``qkv`` one element into its storage),
    ``broadcast`` (one token expanded, token stride 0), or ``contiguous``."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = cu_seqlens_of(lengths, device)
    if layout == "broadcast":  # one token's q, k, v repeated: token stride 0
        q, k, v = (torch.randn(1, heads, head_dim, generator=g).to(device, dtype).expand(T, -1, -1)
                   for _ in range(3))
    elif layout == "misaligned":  # views one element into their storage: no 16-byte alignment
        flat = torch.randn(3 * T * heads * head_dim + 1, generator=g).to(device, dtype)
        q, k, v = flat[1:].view(T, 3, heads, head_dim).unbind(1)
    elif layout == "qkv":
        q, k, v = torch.randn(T, 3, heads, head_dim, generator=g).to(device, dtype).unbind(1)
    elif layout == "heads-first":
        q, k, v = torch.randn(3, heads, T, head_dim, generator=g).to(device, dtype).permute(0, 2, 1, 3).unbind(0)
    else:
        q, k, v = (torch.randn(T, heads, head_dim, generator=g).to(device, dtype) for _ in range(3))
    return q, k, v, cu, max(lengths)


def reference64(q, k, v, cu, max_seqlen, scale=None):
    """Float64 out, lse and cls_attn (head mean of the CLS rows)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse, cls = varlen_attention_reference(q.double(), k.double(), v.double(), cu, max_seqlen, scale, True)
    return out, lse, cls.mean(0)


def sdpa_per_sequence(q, k, v, cu, scale=None):
    """PyTorch's fused attention, sequence by sequence, in q's dtype."""
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1)[None] for x in (q, k, v)), scale=scale)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat([o.transpose(0, 1) for o in outs])


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def floor(dtype):
    """Errors below a few units in the last place are not meaningful."""
    return 4 * torch.finfo(dtype).eps


def assert_matches_reference(out, lse, cls_attn, q, k, v, cu, max_seqlen, scale=None):
    """out within twice PyTorch's own error on the same inputs (SDPA in q's
    dtype, against float64); lse and cls_attn, kept in fp32 inside every
    kernel, close to float64."""
    ref_out, ref_lse, ref_cls = reference64(q, k, v, cu, max_seqlen, scale)
    torch_err = max_err(sdpa_per_sequence(q, k, v, cu, scale), ref_out)
    assert max_err(out, ref_out) <= 2 * torch_err + floor(q.dtype), (max_err(out, ref_out), torch_err)
    if lse is not None:
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    if cls_attn is not None:
        torch.testing.assert_close(cls_attn.double(), ref_cls, rtol=1e-5, atol=1e-6)


def run(backend, *args, **kwargs):
    with adaptok.backend(backend), poison_outputs():
        return adaptok.varlen_attention(*args, **kwargs)


# ----------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("lengths", list(LENGTHS))
def test_forward(attn_backend, dtype, lengths):
    """out within twice PyTorch's error for the same inputs; lse and cls_attn
    (kept in fp32 inside the kernel) close to float64 in every dtype."""
    device, backend = attn_backend
    dtype = DTYPES[dtype]
    supported(device, backend, dtype)
    q, k, v, cu, max_seqlen = make(lengths_for(lengths), 2, 32, dtype, device)
    require(VARLEN_ATTENTION, backend, q, k, v, cu, max_seqlen, 0.1, True)
    out, lse, cls_attn = run(backend, q, k, v, cu, max_seqlen, return_lse=True, return_cls_attn=True)

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (2, q.shape[0])
    assert cls_attn.dtype == torch.float32 and cls_attn.shape == (q.shape[0],)
    assert_matches_reference(out, lse, cls_attn, q, k, v, cu, max_seqlen)


@pytest.mark.parametrize("head_dim", [8, 16, 32, 40, 64, 80, 100, 128])
def test_head_dims(attn_backend, head_dim):
    device, backend = attn_backend
    dtype = native_dtype(backend)
    supported(device, backend, dtype, head_dim)
    q, k, v, cu, max_seqlen = make([50, 3, 70], 2, head_dim, dtype, device)
    require(VARLEN_ATTENTION, backend, q, k, v, cu, max_seqlen, 0.1, True)
    out, lse, cls_attn = run(backend, q, k, v, cu, max_seqlen, return_lse=True, return_cls_attn=True)
    assert_matches_reference(out, lse, cls_attn, q, k, v, cu, max_seqlen)


def test_long_sequences(attn_backend):
    """Lengths up to 1024 next to one-token sequences."""
    device, backend = attn_backend
    q, k, v, cu, max_seqlen = make([1, 1024, 1, 300], 1, 32, torch.float16, device)
    out, lse, cls_attn = run(backend, q, k, v, cu, max_seqlen, return_lse=True, return_cls_attn=True)
    assert_matches_reference(out, lse, cls_attn, q, k, v, cu, max_seqlen)


@pytest.mark.parametrize("layout", ["qkv", "heads-first", "misaligned", "broadcast", "contiguous"])
def test_layouts_and_scale(attn_backend, layout):
    """Strided and misaligned views of a packed projection are read in place;
    a custom scale."""
    device, backend = attn_backend
    q, k, v, cu, max_seqlen = make([50, 20, 1], 3, 32, native_dtype(backend), device, layout=layout)
    out, lse = run(backend, q, k, v, cu, max_seqlen, scale=0.3, return_lse=True)
    assert_matches_reference(out, lse, None, q, k, v, cu, max_seqlen, scale=0.3)


def test_head_dim_one_with_any_last_stride(attn_backend):
    """D = 1 views whose last dim has a non-unit stride are read as they are."""
    device, backend = attn_backend
    if backend == "cuda":
        pytest.skip("the CUDA kernel serves head dims 32, 64 and 128")
    q, k, v = torch.randn(3, 7, 1, 2, generator=torch.Generator().manual_seed(0)).to(device).transpose(2, 3).unbind(0)
    assert q.shape == (7, 2, 1) and q.stride(2) != 1
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    out, lse = run(backend, q, k, v, cu, 4, return_lse=True)
    assert_matches_reference(out, lse, None, q, k, v, cu, 4)


def test_qkv_views_are_not_copied():
    from adaptok.ops.varlen_attention import _last_dim_contiguous

    qkv = torch.randn(10, 3, 2, 8)
    for x in qkv.unbind(1):
        assert _last_dim_contiguous(x) is x


def test_return_flags_and_cls_attn_properties(attn_backend):
    """The flags choose the outputs; each sequence's cls_attn sums to 1."""
    device, backend = attn_backend
    q, k, v, cu, max_seqlen = make([50, 7, 1], 2, 32, native_dtype(backend), device)
    out = run(backend, q, k, v, cu, max_seqlen)
    assert isinstance(out, torch.Tensor)
    out2, lse = run(backend, q, k, v, cu, max_seqlen, return_lse=True)
    out3, cls_attn = run(backend, q, k, v, cu, max_seqlen, return_cls_attn=True)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(out3, out)
    sums = torch.stack([cls_attn[s:e].sum() for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch.testing.assert_close(sums, torch.ones_like(sums))


# Max |score| (the softmax's argument, scale * q.k) each case scales q to; None:
# q times 1e20 as it is (fp32 scores near 1e20, still finite).
CLS_LOGITS = {"logits-3e1": 3e1, "logits-3e2": 3e2, "logits-3e3": 3e3, "logits-3e4": 3e4, "q-times-1e20": None}


def cls_rows64(q, k, cu, scale):
    """Float64 CLS rows ``[H, T]``, independently of the library: per
    sequence, the softmax of its first query's scores."""
    rows = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        rows.append(torch.softmax(torch.einsum("hd,jhd->hj", q[s].double(), k[s:e].double()) * scale, -1))
    return torch.cat(rows, -1)


def max_score64(q, k, cu, scale):
    """max |scale * q_i . k_j| over every sequence, in float64."""
    bounds = cu.tolist()
    return max((torch.einsum("ihd,jhd->hij", q[s:e].double(), k[s:e].double()) * scale).abs().max().item()
               for s, e in zip(bounds[:-1], bounds[1:]))


def cls_row_errors(actual, expected, cu):
    """Error of every CLS row (one per sequence and, for ``[H, T]``, head):
    max |actual - expected| over the row over max |expected| of the row (at
    least 1 / N). Elementwise relative error would not be sound: an fp32
    score s carries an absolute error ~ ulp(s), so the small probabilities of
    large-logit rows are only known to ~ulp(s) relative on every backend."""
    errors = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        a, x = actual[..., s:e].double(), expected[..., s:e]
        errors.append(((a - x).abs().amax(-1) / x.abs().amax(-1)).reshape(-1))
    return torch.cat(errors)


@pytest.mark.parametrize("logits", list(CLS_LOGITS))
def test_cls_exact_at_large_logits(attn_backend, logits):
    """The CLS rows stay as exact as fp32 allows however large the scores
    (max |score| 30 to 30,000, and q * 1e20): per-head ``cls`` of the op and
    the head mean ``cls_attn`` within 1e-5 of a float64 softmax, per row."""
    device, backend = attn_backend
    supported(device, backend, torch.float32, 64)
    q, k, v, cu, max_seqlen = make(LENGTHS["vit"], 3, 64, torch.float32, device)
    scale = 64 ** -0.5
    target = CLS_LOGITS[logits]
    q = q * (1e20 if target is None else target / max_score64(q, k, cu, scale))
    top = max_score64(q, k, cu, scale)
    assert top * math.log2(math.e) < torch.finfo(torch.float32).max / 2, top  # fp32 base-2 scores are finite
    expected = cls_rows64(q, k, cu, scale)
    require(VARLEN_ATTENTION, backend, q, k, v, cu, max_seqlen, scale, True)
    with adaptok.backend(backend), poison_outputs():
        _, _, cls = torch.ops.adaptok.varlen_attention(q, k, v, cu, max_seqlen, scale, True)
        _, cls_attn = adaptok.varlen_attention(q, k, v, cu, max_seqlen, scale=scale, return_cls_attn=True)
    for name, actual, reference in (("cls", cls, expected), ("cls_attn", cls_attn, expected.mean(0))):
        assert actual.dtype == torch.float32 and actual.shape == reference.shape, name
        assert torch.isfinite(actual).all(), (name, actual[~torch.isfinite(actual)])
        err = cls_row_errors(actual, reference, cu).max().item()
        assert err <= 1e-5, (name, f"max |score| {top:.3g}", err)


def test_cpu_kernel_is_deterministic_across_thread_counts():
    """The CPU kernel splits (sequence, head) tasks between threads; the split
    must not change a single bit. Lengths sorted so the split is uneven."""
    device, backend = use_device_backend(("cpu", "cpu"))
    q, k, v, cu, max_seqlen = make([1, 7, 50, 50, 197, 300], 3, 64, torch.float32, device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(backend, q, k, v, cu, max_seqlen, return_lse=True, return_cls_attn=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------- backward


def grads64(q, k, v, cu, max_seqlen, g_out, g_lse=None, g_cls=None):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse, cls = reference64(*leaves, cu, max_seqlen)
    loss = (out * g_out.double()).sum()
    if g_lse is not None:
        loss = loss + (lse * g_lse.double()).sum() + (cls * g_cls.double()).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("through", ["out", "out+lse+cls_attn"])
def test_gradients(attn_backend, dtype, through):
    """dq, dk, dv against autograd on the float64 reference, within twice the
    error of PyTorch in the same dtype: SDPA's backward for gradients through
    out, the plain PyTorch backward computed in that dtype when lse and
    cls_attn (which SDPA cannot return) contribute."""
    device, backend = attn_backend
    dtype = DTYPES[dtype]
    supported(device, backend, dtype)
    lengths = [50, 1, 2, 97]
    q, k, v, cu, max_seqlen = make(lengths, 2, 32, dtype, device, seed=3)
    T = q.shape[0]
    g = torch.Generator().manual_seed(4)
    g_out = torch.randn(T, 2, 32, generator=g).to(device, dtype)
    g_lse = torch.randn(2, T, generator=g).to(device) if through != "out" else None
    g_cls = torch.randn(T, generator=g).to(device) if through != "out" else None
    expected = grads64(q, k, v, cu, max_seqlen, g_out, g_lse, g_cls)

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with adaptok.backend(backend), poison_outputs():
        if through == "out":
            out = adaptok.varlen_attention(*leaves, cu, max_seqlen)
            actual = torch.autograd.grad(out, leaves, g_out)
        else:
            out, lse, cls_attn = adaptok.varlen_attention(*leaves, cu, max_seqlen, return_lse=True, return_cls_attn=True)
            actual = torch.autograd.grad([out, lse, cls_attn], leaves, [g_out, g_lse, g_cls])

    if through == "out":
        low = [x.detach().requires_grad_() for x in (q, k, v)]
        baseline = torch.autograd.grad(sdpa_per_sequence(*low, cu), low, g_out)
    else:
        scale = 32 ** -0.5
        g_cls_heads = (g_cls / 2).expand(2, T)
        baseline = varlen_attention_backward_reference(g_out, g_lse, g_cls_heads, q, k, v, None, None, None, cu,
                                                       max_seqlen, scale, compute_dtype=dtype)
    for name, a, e, b in zip("qkv", actual, expected, baseline):
        assert a.dtype == dtype and a.shape == q.shape
        err, torch_err = max_err(a, e), max_err(b, e)
        assert err <= 2 * torch_err + floor(dtype) * e.abs().max().item(), (name, err, torch_err)


def test_gradcheck_float64():
    """The torch backend's analytic backward against finite differences."""
    q, k, v, cu, max_seqlen = make([3, 1, 4], 2, 4, torch.float64, "cpu")

    def f(q, k, v):
        out, lse, cls_attn = adaptok.varlen_attention(q, k, v, cu, max_seqlen, return_lse=True, return_cls_attn=True)
        return out, lse, cls_attn

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with adaptok.backend("torch"):
        assert torch.autograd.gradcheck(f, leaves)


# ------------------------------------------------------------ custom op, compile


def test_opcheck(attn_backend):
    """Schema, fake tensors, autograd registration and AOT dispatch of both ops."""
    device, backend = attn_backend
    q, k, v, cu, max_seqlen = make([5, 1, 9], 2, 32, native_dtype(backend), device)
    T = q.shape[0]
    with adaptok.backend(backend):
        for return_cls in (False, True):
            args = (q, k, v, cu, max_seqlen, 0.25, return_cls)
            torch.library.opcheck(torch.ops.adaptok.varlen_attention.default, args)
            out, lse, cls = torch.ops.adaptok.varlen_attention(*args)
            dcls = torch.randn(2, T, device=device) if return_cls else None
            for dlse in (None, torch.randn(2, T, device=device)):
                torch.library.opcheck(torch.ops.adaptok.varlen_attention_backward.default,
                                      (torch.randn_like(out), dlse, dcls, q, k, v, out, lse, cls, cu, max_seqlen, 0.25))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(attn_backend, compiler):
    """A block-like function around the op (projection views, cls_attn, a
    backward) traces into one graph and matches eager."""
    device, backend = attn_backend
    q, k, v, cu, max_seqlen = make([9, 1, 5], 2, 32, native_dtype(backend), device)
    qkv = torch.stack([q, k, v], 1).detach().requires_grad_()

    def f(qkv):
        out, cls_attn = adaptok.varlen_attention(*(2 * qkv).unbind(1), cu, max_seqlen, return_cls_attn=True)
        return out.sum(-1) * cls_attn[:, None]

    with adaptok.backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=compiler)
        actual = compiled(qkv)
        expected = f(qkv)
        torch.testing.assert_close(actual, expected)
        (g_actual,) = torch.autograd.grad(actual.sum(), qkv)
        (g_expected,) = torch.autograd.grad(expected.sum(), qkv)
        torch.testing.assert_close(g_actual, g_expected)


# ------------------------------------------------------------------------- GPU


def test_gpu_does_not_sync(attn_backend):
    """Forward and backward with device cu_seqlens and a host max_seqlen never
    wait for the GPU."""
    device, backend = attn_backend
    if device != "cuda":
        pytest.skip("a CUDA sync check")
    if backend == "torch":
        pytest.skip("the torch reference reads cu_seqlens on the host by design")
    q, k, v, cu, max_seqlen = make([50, 197, 1], 2, 64, torch.float16, device)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.cuda.synchronize()
    with adaptok.backend(backend):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, cls_attn = adaptok.varlen_attention(*leaves, cu, max_seqlen, return_cls_attn=True)
            torch.autograd.grad([out, cls_attn], leaves, [torch.ones_like(out), torch.ones_like(cls_attn)])
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernel_stays_in_bounds_for_malformed_offsets(backend):
    """cu_seqlens values are not checked on the GPU: the kernels must not
    write outside their outputs. Guard rows around them keep their values."""
    use_device_backend(("cuda", backend))
    T, H, D = 40, 2, 32
    q, k, v = torch.randn(3, T, H, D, device="cuda", dtype=torch.float16).unbind(0)
    cu = torch.tensor([0, 30, 5, 1_000_000, 40], dtype=torch.int32, device="cuda")
    guarded = torch.full((T + 8, H, D), 7.0, device="cuda", dtype=torch.float16)
    flat = torch.full((2 * H * T + 16,), 7.0, device="cuda")  # lse and cls, contiguous, between guards
    out, lse, cls = guarded[4:-4], flat[8:8 + H * T].view(H, T), flat[8 + H * T:-8].view(H, T)
    if backend == "triton":
        from adaptok.kernels import varlen_attention as kernels

        kernels.forward(q, k, v, cu, 64, 0.1, out, lse, cls)
    else:
        torch.ops.adaptok.ext_varlen_attention(q, k, v, cu, 64, 0.1, out, lse, cls)
    torch.cuda.synchronize()
    assert torch.all(guarded[:4] == 7) and torch.all(guarded[-4:] == 7)
    assert torch.all(flat[:8] == 7) and torch.all(flat[-8:] == 7)


# -------------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    q, k, v, cu, max_seqlen = make([3, 2], 2, 8, torch.float32, "cpu")
    cases = [
        (lambda: adaptok.varlen_attention(q, k[:4], v, cu, 3), ValueError, "k must have the shape of q"),
        (lambda: adaptok.varlen_attention(q, k, v.half(), cu, 3), TypeError, "v must have the dtype of q"),
        (lambda: adaptok.varlen_attention(q[0], k, v, cu, 3), ValueError, "q must have shape"),
        (lambda: adaptok.varlen_attention(q.int(), k.int(), v.int(), cu, 3), TypeError, "floating point"),
        (lambda: adaptok.varlen_attention(q, k, v, cu.long(), 3), TypeError, "cu_seqlens must be int32"),
        (lambda: adaptok.varlen_attention(q, k, v, cu[:1], 3), ValueError, "cu_seqlens must be 1-D"),
        (lambda: adaptok.varlen_attention(q, k, v, torch.tensor([0, 3, 4], dtype=torch.int32), 3), ValueError,
         r"cu_seqlens\[-1\] must equal q.shape\[0\] = 5"),
        (lambda: adaptok.varlen_attention(q, k, v, torch.tensor([0, 3, 3, 5], dtype=torch.int32), 3), ValueError,
         "strictly increasing"),
        (lambda: adaptok.varlen_attention(q, k, v, cu, 2), ValueError, "more than max_seqlen = 2"),
        (lambda: adaptok.varlen_attention(q, k, v, cu, 0), ValueError, "max_seqlen must be >= 1"),
        (lambda: adaptok.varlen_attention(q, k, v, cu, torch.tensor(3)), TypeError, "max_seqlen must be a host int"),
        (lambda: adaptok.varlen_attention(q, k, v, cu, 3, scale=math.inf), ValueError, "scale must be finite"),
        (lambda: adaptok.varlen_attention(q, k, v, [0, 3, 5], 3), TypeError, "cu_seqlens must be a torch.Tensor"),
    ]
    for fn, kind, message in cases:
        with pytest.raises(kind, match=message):
            fn()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_extension_checks_name_the_argument(device):
    """The C++ kernels check their own inputs (TORCH_CHECK) before any work,
    for callers of torch.ops.adaptok.ext_varlen_attention."""
    backend = "cpu" if device == "cpu" else "cuda"
    use_device_backend((device, backend))
    dtype = native_dtype(backend)
    q, k, v, cu, max_seqlen = make([3, 2], 2, 32, dtype, device)
    stat = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731

    def call(q=q, k=k, v=v, cu=cu, max_seqlen=max_seqlen, out=None, lse=None, cls=None):
        torch.ops.adaptok.ext_varlen_attention(
            q, k, v, cu, max_seqlen, 0.1, torch.empty_like(q) if out is None else out,
            stat(2, 5) if lse is None else lse, stat(2, 5) if cls is None else cls)

    cases = [
        (dict(k=k[:4]), ValueError, "k must have the shape of q"),
        (dict(v=v.double()), TypeError, "v must have the dtype of q"),
        (dict(q=q[0]), ValueError, r"q must have shape \[T, H, D\]"),
        (dict(out=torch.empty(5, 2, 64, dtype=dtype, device=device)[..., ::2]), ValueError,
         "out must be contiguous along its last dim"),
        (dict(cu=cu.long()), TypeError, "cu_seqlens must be int32"),
        (dict(max_seqlen=0), ValueError, "max_seqlen must be >= 1"),
        (dict(lse=stat(2, 4)), ValueError, r"lse must have shape \[2, 5\]"),
        (dict(lse=stat(2, 5, dtype=torch.float64)), TypeError, "lse must be float32"),
        (dict(cls=stat(2, 3)), ValueError, r"cls must have shape \[H, T\] or \[H, 0\]"),
    ]
    if device == "cpu":  # values of cu_seqlens are checked where reading them is free
        cases += [
            (dict(cu=torch.tensor([0, 3, 3, 5], dtype=torch.int32)), ValueError, "strictly increasing"),
            (dict(cu=torch.tensor([0, 3, 4], dtype=torch.int32)), ValueError,
             r"cu_seqlens\[-1\] must equal q.shape\[0\] = 5"),
            (dict(max_seqlen=2), ValueError, "more than max_seqlen = 2"),
        ]
    else:
        q16 = q[..., :16].contiguous()
        cases += [
            (dict(q=q.float(), k=k.float(), v=v.float(), out=torch.empty_like(q.float())), TypeError,
             "float16 or bfloat16 for the CUDA kernel"),
            (dict(q=q16, k=q16, v=q16, out=torch.empty_like(q16)), ValueError, "head dims 32, 64 and 128"),
            (dict(k=k.cpu()), ValueError, "k must be on the same device as q"),
            (dict(cu=cu.cpu()), ValueError, "cu_seqlens must be on the same device as q"),
        ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            call(**kwargs)


def test_unsupported_head_dim_falls_back_or_names_the_reason():
    """The Triton kernel serves head dims up to 128: larger ones run on
    another backend (the CPU kernel, or torch), and forcing Triton says why
    it cannot."""
    q, k, v, cu, max_seqlen = make([3, 2], 1, 160, torch.float32, "cpu")
    reason = VARLEN_ATTENTION.why_not("triton", q, k, v, cu, max_seqlen, 0.1, False)
    assert reason is not None and "head dim up to 128, got 160" in reason
    with adaptok.backend("triton"), pytest.raises(adaptok.BackendError, match="head dim up to 128"):
        adaptok.varlen_attention(q, k, v, cu, max_seqlen)
    torch.testing.assert_close(adaptok.varlen_attention(q, k, v, cu, max_seqlen).double(),
                               reference64(q, k, v, cu, max_seqlen)[0], rtol=1e-5, atol=1e-5)


def test_mixed_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v, cu, max_seqlen = make([3, 2], 2, 8, torch.float32, "cuda")
    with pytest.raises(ValueError, match="k must be on the same device as q"):
        adaptok.varlen_attention(q, k.cpu(), v, cu, max_seqlen)
    with pytest.raises(ValueError, match="cu_seqlens must be on the same device as q"):
        adaptok.varlen_attention(q, k, v, cu.cpu(), max_seqlen)


def test_backward_op_is_registered_for_the_same_backends():
    assert set(VARLEN_ATTENTION_BACKWARD.impls) == set(VARLEN_ATTENTION.impls)
