"""adaptok.topk_select on every backend, against a reference written from
EViT's description (plain Python ranking, float64 sums): the kept tokens and
their order exactly, kept rows bit for bit, the fused token to rounding."""
import math

import pytest
import torch

import adaptok
from adaptok.ops.common import cu_seqlens as cu_seqlens_of, poison_outputs
from adaptok.ops.topk_select import TOPK_SELECT

from conftest import backend_pairs, device_backend_id, require, use_device_backend

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LENGTHS = {
    "one": [1],
    "short": [2, 1, 3],
    "vit": [1, 2, 3, 50, 197],
    "random": None,  # drawn per seed below
}
RATES = [0.1, 0.5, 0.7, 1.0]


@pytest.fixture(params=backend_pairs(TOPK_SELECT), ids=device_backend_id)
def select_backend(request):
    return use_device_backend(request.param)


def supported(device, backend, dtype):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 Triton runs on a GPU (the interpreter truncates bf16 casts)")


def lengths_for(name, seed=0):
    if LENGTHS[name] is not None:
        return LENGTHS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 130, (6,), generator=g).tolist()


def make(lengths, channels, dtype, device, seed=0, ties=True, strided=False):
    """x ``[T, C]`` (a column slice of a wider tensor when ``strided``), fp32
    scores (few distinct values when ``ties``) and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    wide = torch.randn(T, channels + (5 if strided else 0), generator=g).to(device, dtype)
    x = wide[:, 2:2 + channels] if strided else wide
    scores = (torch.randint(0, 5, (T,), generator=g) / 8) if ties else torch.rand(T, generator=g)
    cu = cu_seqlens_of(lengths, device)
    return x, scores.to(device), cu


def reference(x, scores, lengths, keep, fuse=True, renormalize=False):
    """EViT's reorganization, sequence by sequence in plain Python: rank the
    candidates 1..N-1 by descending score (lower index first among equals),
    keep the first k, fuse the rest with their raw scores (float64)."""
    xs, a = x.double().cpu(), scores.double().cpu().tolist()
    rows, index, start = [], [], 0
    for n, k in zip(lengths, keep):
        seq = list(range(start, start + n))
        if k == n - 1:
            chosen, dropped = seq, []
        else:
            ranked = sorted(seq[1:], key=lambda j: (-a[j], j))
            chosen, dropped = [seq[0]] + ranked[:k], ranked[k:]
        rows += [xs[j] for j in chosen]
        index += chosen
        if k < n - 1 and fuse:
            total = sum(a[j] for j in dropped)
            scale = (1 / total if total > 0 else 0.0) if renormalize else 1.0
            rows.append(sum((a[j] * scale * xs[j] for j in dropped), torch.zeros(x.shape[1], dtype=torch.float64)))
            index.append(-1)
        start += n
    return torch.stack(rows), torch.tensor(index)


def run(backend, *args, **kwargs):
    with adaptok.backend(backend), poison_outputs():
        return adaptok.topk_select(*args, **kwargs)


def check(result, x, scores, cu, lengths, keep, fuse=True, renormalize=False):
    x_out, cu_out, max_out, kept = result
    ref_out, ref_index = reference(x, scores, lengths, keep, fuse, renormalize)
    ref_lengths = out_tokens(lengths, keep, fuse)
    assert cu_out.tolist() == [0, *torch.tensor(ref_lengths).cumsum(0).tolist()]
    assert max_out == max(ref_lengths)
    assert x_out.dtype == x.dtype and kept.dtype == torch.int64
    assert torch.equal(kept.cpu(), ref_index)
    copies = ref_index >= 0
    assert torch.equal(x_out.cpu()[copies], x.cpu()[ref_index[copies]])  # copies are exact
    if (~copies).any():  # fused rows: the float64 sum rounded to x's dtype (fp32 accumulation)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x.dtype]
        torch.testing.assert_close(x_out.cpu()[~copies].double(), ref_out[~copies], rtol=tol, atol=tol)


# ----------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("keep_rate", RATES)
def test_keep_rate(select_backend, dtype, lengths, keep_rate):
    device, backend = select_backend
    dtype = DTYPES[dtype]
    supported(device, backend, dtype)
    lengths = lengths_for(lengths)
    x, scores, cu = make(lengths, 40, dtype, device)
    keep = [math.ceil(keep_rate * (n - 1)) for n in lengths]
    require(TOPK_SELECT, backend, *_op_args(x, scores, cu, lengths, keep))
    result = run(backend, x, cu, max(lengths), scores, keep_rate=keep_rate)
    check(result, x, scores, cu, lengths, keep)


@pytest.mark.parametrize("fuse,renormalize", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("ties", [True, False])
def test_per_sequence_keep(select_backend, fuse, renormalize, ties):
    """keep per sequence, from nothing kept to nothing dropped; fusion modes;
    strided x; scores with and without ties."""
    device, backend = select_backend
    lengths = [1, 2, 3, 50, 197, 9, 9]
    keep = [0, 0, 2, 17, 0, 8, 3]
    x, scores, cu = make(lengths, 24, torch.float32, device, seed=1, ties=ties, strided=True)
    result = run(backend, x, cu, max(lengths), scores, keep=keep, fuse=fuse, renormalize=renormalize)
    check(result, x, scores, cu, lengths, keep, fuse, renormalize)
    keep_t = torch.tensor(keep, dtype=torch.int32, device=device)
    again = run(backend, x, cu, max(lengths), scores, keep=keep_t, fuse=fuse, renormalize=renormalize)
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(result, again))


def test_renormalized_zero_weights_give_a_zero_token(select_backend):
    """Dropped tokens whose scores are all 0 fuse to 0, not NaN."""
    device, backend = select_backend
    x, _, cu = make([6], 8, torch.float32, device)
    scores = torch.tensor([0.5, 0.9, 0.8, 0.0, 0.0, 0.0], device=device)
    x_out, _, _, kept = run(backend, x, cu, 6, scores, keep=[2], renormalize=True)
    assert kept.tolist() == [0, 1, 2, -1]
    assert torch.equal(x_out[3].cpu(), torch.zeros(8))


def test_nan_and_signed_zero_scores(select_backend):
    """NaN ranks above every number (as in a descending torch.sort), -0 equals
    +0: the same selection on every backend."""
    device, backend = select_backend
    x, _, cu = make([7], 8, torch.float32, device)
    scores = torch.tensor([1.0, -0.0, math.nan, 0.9, 0.0, math.nan, 0.5], device=device)
    _, _, _, kept = run(backend, x, cu, 7, scores, keep=[5], fuse=False)
    assert kept.tolist() == [0, 2, 5, 3, 6, 1]


def test_lengths_hint_and_ragged_batch(select_backend):
    """Host lengths (given, or carried by a RaggedBatch) size the output
    without reading cu_seqlens; the RaggedBatch form carries the grid."""
    device, backend = select_backend
    lengths = [50, 197, 101]
    x, scores, cu = make(lengths, 16, torch.float32, device, ties=False)
    expected = run(backend, x, cu, 197, scores, keep_rate=0.5)
    hinted = run(backend, x, cu, 197, scores, keep_rate=0.5, lengths=lengths)
    for a, b in zip(expected, hinted):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    rb = adaptok.RaggedBatch(x, cu, 197, grid=[7, 14, 10], lengths=lengths)
    with adaptok.backend(backend):
        out, kept = rb.topk_select(scores, keep_rate=0.5)
    assert out.lengths == (27, 100, 52) and out.max_seqlen == 100
    assert torch.equal(out.values, expected[0]) and torch.equal(kept, expected[3])
    assert out.grid.tolist() == [7, 14, 10]


# ---------------------------------------------------------------------- backward


def reference_autograd(x, scores, lengths, keep, renormalize, fuse=True):
    """The selection of :func:`reference`, then torch ops that autograd
    differentiates with respect to x and the scores (float64)."""
    _, index = reference(x.detach(), scores.detach(), lengths, keep, fuse, renormalize)
    out_rows, start = [], 0
    for n, k in zip(lengths, keep):
        kept = index[(index >= start) & (index < start + n)].tolist()
        out_rows += [x[j] for j in kept]
        if k < n - 1 and fuse:
            dropped = sorted(set(range(start + 1, start + n)) - set(kept))
            w = scores[dropped]
            if renormalize:
                w = w / w.sum()
            out_rows.append((w[:, None] * x[dropped]).sum(0))
        start += n
    return torch.stack(out_rows)


def out_tokens(lengths, keep, fuse=True):
    return [n if k == n - 1 else 1 + k + int(fuse) for n, k in zip(lengths, keep)]


@pytest.mark.parametrize("fuse,renormalize", [(True, False), (True, True), (False, False)])
def test_gradients(select_backend, fuse, renormalize):
    """Gradients of x and cls_attn against autograd on the float64 reference."""
    device, backend = select_backend
    lengths = [1, 2, 50, 30]
    keep = [0, 0, 20, 29]
    x, scores, cu = make(lengths, 16, torch.float32, device, seed=2, ties=False)
    scores = scores + 0.01  # renormalized weights stay away from a zero sum
    g = torch.randn(sum(out_tokens(lengths, keep, fuse)), 16, generator=torch.Generator().manual_seed(3)).to(device)
    leaves = [x.detach().requires_grad_(), scores.detach().requires_grad_()]
    with adaptok.backend(backend), poison_outputs():
        out = adaptok.topk_select(leaves[0], cu, 50, leaves[1], keep=keep, fuse=fuse, renormalize=renormalize)[0]
    actual = torch.autograd.grad(out, leaves, g, allow_unused=True)
    actual = [a if a is not None else torch.zeros_like(t) for a, t in zip(actual, leaves)]
    ref = [t.detach().double().cpu().requires_grad_() for t in (x, scores)]
    expected = torch.autograd.grad(reference_autograd(*ref, lengths, keep, renormalize, fuse), ref, g.double().cpu(),
                                   allow_unused=True)
    expected = [e if e is not None else torch.zeros_like(t) for e, t in zip(expected, ref)]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-5, atol=1e-6)


def test_gradients_ignore_non_finite_scores_elsewhere(select_backend):
    """An infinite score (a forced keep) and a NaN CLS score leave every
    gradient finite: masks select, they do not multiply."""
    device, backend = select_backend
    x, scores, cu = make([6, 5], 8, torch.float32, device, ties=False)
    scores = scores.clone()
    scores[2], scores[0], scores[6] = math.inf, math.nan, math.nan  # a kept token, two CLS scores
    leaves = [x.detach().requires_grad_(), scores.detach().requires_grad_()]
    for renormalize in (False, True):
        with adaptok.backend(backend):
            out, _, _, kept = adaptok.topk_select(leaves[0], cu, 6, leaves[1], keep=[2, 1], renormalize=renormalize)
        g = torch.randn_like(out)
        grad_x, grad_a = torch.autograd.grad(out, leaves, g)
        assert torch.isfinite(grad_x).all()
        # Copied rows (CLS and kept) get exactly their output row's gradient.
        for row, source in enumerate(kept.tolist()):
            if source >= 0:
                assert torch.equal(grad_x[source], g[row])
        dropped = [j for j in range(11) if j not in kept.tolist()]
        assert torch.isfinite(grad_a[dropped]).all()


def test_float64_runs_where_a_backend_serves_it():
    """fp64 (gradcheck, references) is not a kernel dtype: automatic choice
    falls back to the torch backend."""
    x, scores, cu = make([4, 6], 8, torch.float64, "cpu", ties=False)
    check(adaptok.topk_select(x, cu, 6, scores.double(), keep_rate=0.5), x, scores, cu, [4, 6], [2, 3])


def test_layout_check_knows_whether_rows_are_fused(select_backend):
    """Offsets laid out for one fuse setting are rejected under the other."""
    device, backend = select_backend
    if device != "cpu":
        pytest.skip("offsets are checked where reading them is free")
    lengths, keep = [5, 4], [2, 1]
    x, scores, cu = make(lengths, 8, torch.float32, device)
    args = list(_op_args(x, scores, cu, lengths, keep, fuse=False))
    args[7] = True  # fuse, with offsets laid out without fused rows
    with adaptok.backend(backend), pytest.raises(ValueError, match="cu_seqlens_out gives sequence 0 3 tokens"):
        torch.ops.adaptok.topk_select(*args)


def test_wide_rows_and_long_sequences(select_backend):
    """Several channel blocks and more than 512 tokens (the Triton kernel's
    wide-block configuration)."""
    device, backend = select_backend
    lengths = [600, 3, 1]
    x, scores, cu = make(lengths, 300, torch.float32, device, ties=True)
    keep = [math.ceil(0.7 * (n - 1)) for n in lengths]
    result = run(backend, x, cu, 600, scores, keep_rate=0.7)
    check(result, x, scores, cu, lengths, keep)


def test_gradcheck_float64():
    """The backward formula against finite differences (torch backend)."""
    x, scores, cu = make([4, 1, 6], 3, torch.float64, "cpu", ties=False)
    scores = scores.double() + 0.1
    for renormalize in (False, True):
        def f(x, scores):
            return adaptok.topk_select(x, cu, 6, scores, keep=[1, 0, 2], renormalize=renormalize)[0]
        with adaptok.backend("torch"):
            assert torch.autograd.gradcheck(f, [x.detach().requires_grad_(), scores.detach().requires_grad_()])


# ------------------------------------------------------------ custom op, compile


def _op_args(x, scores, cu, lengths, keep, fuse=True, renormalize=False):
    out_lengths = out_tokens(lengths, keep, fuse)
    cu_out = cu_seqlens_of(out_lengths, x.device)
    keep = torch.tensor(keep, dtype=torch.int32, device=x.device)
    return x, cu, scores.float(), keep, cu_out, sum(out_lengths), max(lengths), fuse, renormalize


def test_opcheck(select_backend):
    device, backend = select_backend
    lengths, keep = [5, 1, 9, 3], [2, 0, 3, 2]
    x, scores, cu = make(lengths, 8, torch.float32, device, ties=False)
    with adaptok.backend(backend):
        for fuse, renormalize in ((True, False), (False, False), (True, True)):
            torch.library.opcheck(torch.ops.adaptok.topk_select.default,
                                  _op_args(x, scores, cu, lengths, keep, fuse, renormalize))


def test_compile_fullgraph(select_backend):
    """With host lengths, a pruning step traces into one graph."""
    device, backend = select_backend
    lengths = [9, 1, 17]
    x, scores, cu = make(lengths, 8, torch.float32, device, ties=False)
    x = x.detach().requires_grad_()

    def f(x, scores):
        x_out, cu_out, _, _ = adaptok.topk_select(x * 2, cu, 17, scores, keep_rate=0.5, lengths=lengths)
        return x_out.sin()

    with adaptok.backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        actual, expected = compiled(x, scores), f(x, scores)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(torch.autograd.grad(actual.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


# ------------------------------------------------------------------------- GPU


def test_gpu_does_not_sync(select_backend):
    """With host lengths and a keep rate, forward and backward never wait for
    the GPU."""
    device, backend = select_backend
    if device != "cuda":
        pytest.skip("a CUDA sync check")
    if backend == "torch":
        pytest.skip("the torch reference reads offsets on the host by design")
    lengths = [50, 197, 1]
    x, scores, cu = make(lengths, 64, torch.float16, device, ties=False)
    leaves = [x.detach().requires_grad_(), scores.detach().requires_grad_()]
    torch.cuda.synchronize()
    with adaptok.backend(backend):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = adaptok.topk_select(leaves[0], cu, 197, leaves[1], keep_rate=0.7, lengths=lengths)[0]
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")


# -------------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    lengths = [3, 5]
    x, scores, cu = make(lengths, 4, torch.float32, "cpu")
    cases = [
        (dict(keep_rate=0.0), ValueError, r"keep_rate must be in \(0, 1\], got 0.0"),
        (dict(keep_rate=1.5), ValueError, r"keep_rate must be in \(0, 1\], got 1.5"),
        (dict(keep_rate=math.nan), ValueError, r"keep_rate must be in \(0, 1\]"),
        (dict(keep_rate=True), TypeError, "keep_rate must be a real number"),
        (dict(), ValueError, "exactly one of keep_rate and keep, got neither"),
        (dict(keep_rate=0.5, keep=[1, 1]), ValueError, "exactly one of keep_rate and keep, got both"),
        (dict(keep=[3, 1]), ValueError, r"keep\[0\] = 3 must lie in \[0, N_b - 1 = 2\]"),
        (dict(keep=[-1, 1]), ValueError, r"keep\[0\] = -1 must lie in"),
        (dict(keep=[1]), ValueError, "keep must have one entry per sequence"),
        (dict(keep=torch.tensor([1.0, 1.0])), TypeError, "keep must be a 1-D integer tensor"),
        (dict(keep_rate=0.5, lengths=[8]), ValueError, "lengths must have one entry per sequence"),
        (dict(keep_rate=0.5, lengths=[3, 6]), ValueError, r"lengths must sum to x.shape\[0\] = 8"),
        (dict(keep_rate=0.5, lengths=[4, 4]), ValueError, "lengths must match cu_seqlens"),
    ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            adaptok.topk_select(x, cu, 5, scores, **kwargs)
    with pytest.raises(ValueError, match=r"cls_attn must have shape \[T\] = \[8\]"):
        adaptok.topk_select(x, cu, 5, scores[:7], keep_rate=0.5)
    with pytest.raises(TypeError, match="cls_attn must be floating point"):
        adaptok.topk_select(x, cu, 5, scores.int(), keep_rate=0.5)
    with pytest.raises(ValueError, match="more than max_seqlen = 4"):
        adaptok.topk_select(x, cu, 4, scores, keep_rate=0.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        adaptok.topk_select(x, torch.tensor([0, 3, 3, 8], dtype=torch.int32), 5, scores, keep_rate=0.5,
                            lengths=[3, 1, 4])
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        adaptok.topk_select(x, cu.long(), 5, scores, keep_rate=0.5)
    with pytest.raises(TypeError, match="max_seqlen must be a host int"):
        adaptok.topk_select(x, cu, torch.tensor(5), scores, keep_rate=0.5)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_extension_checks_name_the_argument(device):
    """The C++ kernels check their own inputs (TORCH_CHECK) before any work."""
    use_device_backend((device, "cpu" if device == "cpu" else "cuda"))
    lengths, keep = [3, 5], [1, 2]
    x, scores, cu = make(lengths, 4, torch.float32, device)
    x, cu, scores, keep_t, cu_out, total_out, max_seqlen, fuse, renormalize = _op_args(x, scores, cu, lengths, keep)

    def call(x=x, cu=cu, scores=scores, keep=keep_t, cu_out=cu_out, max_seqlen=max_seqlen, out=None, index=None):
        torch.ops.adaptok.ext_topk_select(
            x, cu, scores, keep, cu_out, max_seqlen, True, False,
            torch.empty(total_out, 4, device=device) if out is None else out,
            torch.empty(total_out, dtype=torch.int64, device=device) if index is None else index)

    cases = [
        (dict(x=x[0]), ValueError, r"x must have shape \[T, C\]"),
        (dict(x=x.double()), TypeError, "x must be float32, float16 or bfloat16"),
        (dict(scores=scores.double()), TypeError, "cls_attn must be float32"),
        (dict(scores=scores[:7]), ValueError, r"cls_attn must have shape \[T\] = \[8\]"),
        (dict(keep=keep_t.long()), TypeError, "keep must be int32"),
        (dict(keep=keep_t[:1]), ValueError, r"keep must have shape \[B\] = \[2\]"),
        (dict(cu=cu.long()), TypeError, "cu_seqlens must be int32"),
        (dict(out=torch.empty(total_out, 5, device=device)), ValueError, r"out must have shape \[T_out, 4\]"),
        (dict(out=torch.empty(total_out, 4, device=device).half()), TypeError, "out must have the dtype of x"),
        (dict(index=torch.empty(total_out, dtype=torch.int32, device=device)), TypeError, "kept_index must be int64"),
    ]
    if device == "cpu":  # values are checked where reading them is free
        cases += [
            (dict(keep=torch.tensor([3, 2], dtype=torch.int32)), ValueError, r"keep\[0\] = 3 must lie in"),
            (dict(cu=torch.tensor([0, 2, 8], dtype=torch.int32)), ValueError, "cu_seqlens_out gives sequence 0"),
            (dict(max_seqlen=4), ValueError, "more than max_seqlen = 4"),
        ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            call(**kwargs)
