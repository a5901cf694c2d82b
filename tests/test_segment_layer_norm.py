"""adaptok.ops.segment_layer_norm and adaptok.nn.TokenLengthLayerNorm on every
backend, against per-sequence F.layer_norm in float64."""
import pytest
import torch
import torch.nn.functional as F

import adaptok
from adaptok.nn import TokenLengthLayerNorm
from adaptok.ops.common import cu_seqlens as cu_seqlens_of, poison_outputs
from adaptok.ops.segment_layer_norm import SEGMENT_LAYER_NORM

from conftest import backend_pairs, device_backend_id, require, use_device_backend

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LENGTHS = {"one": [1], "vit": [50, 197, 1, 2, 101], "random": None}
AFFINE = {"weight+bias": (True, True), "weight": (True, False), "none": (False, False)}


@pytest.fixture(params=backend_pairs(SEGMENT_LAYER_NORM), ids=device_backend_id)
def norm_backend(request):
    return use_device_backend(request.param)


def supported(device, backend, dtype):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 Triton runs on a GPU (the interpreter truncates bf16 casts)")


def make(lengths, channels, dtype, device, groups=3, seed=0, strided=False):
    """x (a column slice of a wider tensor when ``strided``), a residual,
    weight and bias ``[groups, C]``, cu_seqlens and group ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or torch.randint(1, 90, (5,), generator=g).tolist()
    T = sum(lengths)
    wide = (3 * torch.randn(T, channels + 3, generator=g) + 1).to(device, dtype)
    x = wide[:, 1:1 + channels] if strided else wide[:, :channels].contiguous()
    residual = torch.randn(T, channels, generator=g).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(groups, channels, generator=g)).to(device, dtype)
    bias = torch.randn(groups, channels, generator=g).to(device, dtype)
    cu = cu_seqlens_of(lengths, device)
    group = torch.randint(0, groups, (len(lengths),), generator=g, dtype=torch.int32).to(device)
    return x, residual, weight, bias, cu, group, lengths


def reference64(x, residual, weight, bias, cu, group, eps):
    """Per sequence, ``F.layer_norm`` in float64 with the sequence's rows."""
    h = x.double() + (residual.double() if residual is not None else 0)
    rows = []
    for s, e, g in zip(cu[:-1].tolist(), cu[1:].tolist(), group.tolist()):
        rows.append(F.layer_norm(h[s:e], (x.shape[1],), None if weight is None else weight[g].double(),
                                 None if bias is None else bias[g].double(), eps))
    return torch.cat(rows), h


def run(backend, *args, **kwargs):
    with adaptok.backend(backend), poison_outputs():
        return adaptok.ops.segment_layer_norm(*args, **kwargs)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_forward(norm_backend, dtype, lengths, affine, with_residual):
    device, backend = norm_backend
    dtype = DTYPES[dtype]
    supported(device, backend, dtype)
    x, residual, weight, bias, cu, group, _ = make(LENGTHS[lengths], 48, dtype, device, strided=True)
    use_w, use_b = AFFINE[affine]
    weight, bias = weight if use_w else None, bias if use_b else None
    residual = residual if with_residual else None
    require(SEGMENT_LAYER_NORM, backend, x, residual, weight, bias, cu, group, 1e-5)
    out = run(backend, x, cu, group, weight, bias, 1e-5, residual=residual)
    y, h = out if with_residual else (out, None)
    expected, h64 = reference64(x, residual, weight, bias, cu, group, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    if with_residual:  # h is x + residual in fp32, rounded once
        assert torch.equal(h, (x.float() + residual.float()).to(dtype))


def test_statistics(norm_backend):
    """The saved mean and rstd (for the backward) against float64."""
    device, backend = norm_backend
    x, residual, weight, bias, cu, group, _ = make([50, 7, 1], 40, torch.float32, device)
    with adaptok.backend(backend), poison_outputs():
        y, h, mean, rstd = torch.ops.adaptok.segment_layer_norm(x, residual, weight, bias, cu, group, 1e-5)
    h64 = x.double() + residual.double()
    var, mean64 = torch.var_mean(h64, dim=1, correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 7, 16, 100, 1030, 4100])
def test_channel_counts(norm_backend, channels):
    """Channel counts that are not multiples of any vector width, and long rows."""
    device, backend = norm_backend
    x, residual, weight, bias, cu, group, _ = make([3, 1, 5], channels, torch.float32, device)
    y = run(backend, x, cu, group, weight, bias, 1e-5)
    torch.testing.assert_close(y.double(), reference64(x, None, weight, bias, cu, group, 1e-5)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [384, 2048])
def test_rows_far_from_zero(norm_backend, channels):
    """Rows whose mean is 1000 times their spread (short rows and the long-row
    paths): the statistics lose nothing beyond fp32 rounding of the input."""
    device, backend = norm_backend
    x, _, weight, bias, cu, group, _ = make([3, 5], channels, torch.float32, device)
    x = 1000 + x / 3
    y = run(backend, x, cu, group, weight, bias, 1e-5)
    torch.testing.assert_close(y.double(), reference64(x, None, weight, bias, cu, group, 1e-5)[0],
                               rtol=5e-4, atol=5e-4)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_gradients(norm_backend, with_residual):
    """Gradients of x, residual, weight and bias against autograd on the
    float64 reference."""
    device, backend = norm_backend
    x, residual, weight, bias, cu, group, _ = make([50, 1, 20, 33], 24, torch.float32, device, seed=1)
    inputs = [x, weight, bias] + ([residual] if with_residual else [])
    leaves = [t.detach().requires_grad_() for t in inputs]
    g_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    g_h = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    with adaptok.backend(backend), poison_outputs():
        out = adaptok.ops.segment_layer_norm(leaves[0], cu, group, leaves[1], leaves[2], 1e-5,
                                             residual=leaves[3] if with_residual else None)
    outputs, grads = ((list(out), [g_y, g_h]) if with_residual else ([out], [g_y]))
    actual = torch.autograd.grad(outputs, leaves, grads)
    ref = [t.detach().double().requires_grad_() for t in inputs]
    y64, h64 = reference64(ref[0], ref[3] if with_residual else None, ref[1], ref[2], cu, group, 1e-5)
    ref_outputs = [y64, h64] if with_residual else [y64]
    expected = torch.autograd.grad(ref_outputs, ref, [g.double() for g in grads])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    x, residual, weight, bias, cu, group, _ = make([3, 1, 4], 5, torch.float64, "cpu")
    leaves = [t.detach().requires_grad_() for t in (x, residual, weight, bias)]

    def f(x, residual, weight, bias):
        return adaptok.ops.segment_layer_norm(x, cu, group, weight, bias, 1e-5, residual=residual)

    with adaptok.backend("torch"):
        assert torch.autograd.gradcheck(f, leaves)


def test_opcheck(norm_backend):
    device, backend = norm_backend
    x, residual, weight, bias, cu, group, _ = make([5, 1, 9], 16, torch.float32, device)
    with adaptok.backend(backend):
        for r, w, b in ((residual, weight, bias), (None, weight, None), (None, None, None)):
            torch.library.opcheck(torch.ops.adaptok.segment_layer_norm.default, (x, r, w, b, cu, group, 1e-5))


def test_compile_fullgraph(norm_backend):
    device, backend = norm_backend
    x, residual, weight, bias, cu, group, _ = make([9, 1, 17], 16, torch.float32, device)
    x = x.detach().requires_grad_()

    def f(x):
        y, h = adaptok.ops.segment_layer_norm(2 * x, cu, group, weight, bias, 1e-5, residual=residual)
        return y.sin() + h

    with adaptok.backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        actual, expected = compiled(x), f(x)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(torch.autograd.grad(actual.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


def test_gpu_does_not_sync(norm_backend):
    device, backend = norm_backend
    if device != "cuda":
        pytest.skip("a CUDA sync check")
    if backend == "torch":
        pytest.skip("the torch reference reads offsets on the host by design")
    x, residual, weight, bias, cu, group, _ = make([50, 197, 1], 64, torch.float16, device)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    torch.cuda.synchronize()
    with adaptok.backend(backend):
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = adaptok.ops.segment_layer_norm(leaves[0], cu, group, leaves[1], leaves[2], 1e-5)
            torch.autograd.grad(y, leaves, torch.ones_like(y))
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------ the module


def test_token_length_layer_norm_uses_each_sequences_grid(norm_backend):
    """Each sequence is normalized with the pair of its grid tag, as
    per-sequence F.layer_norm would; state-dict keys are weight and bias."""
    device, backend = norm_backend
    norm = TokenLengthLayerNorm(32, grids=(14, 10, 7), eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    grids = [7, 14, 10, 7]
    xs = [torch.randn(g * g + 1, 32, device=device) for g in grids]
    rb = adaptok.RaggedBatch.from_list(xs, grid=grids)
    with adaptok.backend(backend):
        out = norm(rb)
    assert out.lengths == rb.lengths and out.grid.tolist() == grids
    for x, g, y in zip(xs, grids, out.to_list()):
        i = norm.grids.index(g)
        torch.testing.assert_close(y, F.layer_norm(x, (32,), norm.weight[i], norm.bias[i], 1e-6), rtol=1e-5, atol=1e-5)
    assert set(norm.state_dict()) == {"weight", "bias"}


def test_token_length_layer_norm_from_layer_norm_and_residual(norm_backend):
    """Initialized from an nn.LayerNorm, every grid computes that LayerNorm;
    the fused residual form returns the normalized sum and the sum."""
    device, backend = norm_backend
    base = torch.nn.LayerNorm(16, eps=1e-6).to(device)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    norm = TokenLengthLayerNorm.from_layer_norm(base, grids=(14, 7))
    rb = adaptok.RaggedBatch.from_list([torch.randn(50, 16, device=device), torch.randn(197, 16, device=device)],
                                       grid=[7, 14])
    residual = torch.randn(247, 16, device=device)
    with adaptok.backend(backend):
        out, h = norm(rb, residual=residual)
    torch.testing.assert_close(h, rb.values + residual)
    torch.testing.assert_close(out.values, base(rb.values + residual), rtol=1e-5, atol=1e-5)


def test_token_length_layer_norm_errors():
    norm = TokenLengthLayerNorm(8, grids=(14, 7))
    rb = adaptok.RaggedBatch.from_list([torch.randn(5, 8), torch.randn(3, 8)], grid=[7, 10])
    with pytest.raises(ValueError, match=r"grid tags must be one of this norm's grids \(14, 7\), got 10"):
        norm(rb)
    with pytest.raises(ValueError, match="must carry grid tags"):
        norm(adaptok.RaggedBatch.from_list([torch.randn(5, 8)]))
    with pytest.raises(TypeError, match="x must be a RaggedBatch"):
        norm(torch.randn(5, 8))
    with pytest.raises(ValueError, match="grids must be distinct positive"):
        TokenLengthLayerNorm(8, grids=(7, 7))


# -------------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    x, residual, weight, bias, cu, group, _ = make([3, 5], 4, torch.float32, "cpu")
    op = adaptok.ops.segment_layer_norm
    cases = [
        (lambda: op(x[0], cu, group), ValueError, r"x must have shape \[T, C\]"),
        (lambda: op(x.int(), cu, group), TypeError, "x must be floating point"),
        (lambda: op(x, cu.long(), group), TypeError, "cu_seqlens must be int32"),
        (lambda: op(x, cu, group.long()), ValueError, "group must be int32 of shape"),
        (lambda: op(x, cu, group[:1]), ValueError, r"group must be int32 of shape \[B\] = \[2\]"),
        (lambda: op(x, cu, group, weight[:, :3]), ValueError, "weight must have shape"),
        (lambda: op(x, cu, group, weight.double()), TypeError, "weight must have the dtype of x"),
        (lambda: op(x, cu, group, weight, bias[:2]), ValueError, "same number of groups"),
        (lambda: op(x, cu, group, residual=residual[:3]), ValueError, "residual must match x"),
        (lambda: op(x, cu, group, eps=-1.0), ValueError, "eps must be finite and >= 0"),
        (lambda: op(x, cu, torch.tensor([0, 3], dtype=torch.int32), weight), ValueError,
         r"group\[1\] = 3 must lie in \[0, G - 1 = 2\]"),
        (lambda: op(x, torch.tensor([0, 3, 7], dtype=torch.int32), group), ValueError,
         r"cu_seqlens\[-1\] must equal x.shape\[0\] = 8"),
    ]
    for fn, kind, message in cases:
        with pytest.raises(kind, match=message):
            fn()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_extension_checks_name_the_argument(device):
    use_device_backend((device, "cpu" if device == "cpu" else "cuda"))
    x, residual, weight, bias, cu, group, _ = make([3, 5], 4, torch.float32, device)
    stat = lambda n=8: torch.empty(n, device=device)  # noqa: E731

    def call(x=x, residual=None, weight=weight, bias=bias, cu=cu, group=group, y=None, h=None, mean=None):
        torch.ops.adaptok.ext_segment_layer_norm(x, residual, weight, bias, cu, group, 1e-5,
                                                 torch.empty_like(x) if y is None else y, h,
                                                 stat() if mean is None else mean, stat())

    cases = [
        (dict(x=x.double()), TypeError, "x must be float32, float16 or bfloat16"),
        (dict(residual=residual), ValueError, "h_out is required with a residual"),
        (dict(h=torch.empty_like(x)), ValueError, "h_out is written only with a residual"),
        (dict(weight=weight[:, :3].contiguous()), ValueError, "weight must have shape"),
        (dict(group=group.long()), TypeError, "group must be int32"),
        (dict(y=torch.empty(8, 5, device=device)), ValueError, "y must have the shape of x"),
        (dict(mean=stat(7)), ValueError, r"mean must have shape \[T\] = \[8\]"),
    ]
    if device == "cpu":
        cases += [(dict(group=torch.tensor([0, 3], dtype=torch.int32)), ValueError, r"group\[1\] = 3 must lie in")]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            call(**kwargs)
