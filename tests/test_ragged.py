"""RaggedBatch and its ops (pack, unpack, cls_tokens, select_sequences) on
every backend, against expectations built sequence by sequence in Python."""
import pytest
import torch

import adaptok
from adaptok.backends import REGISTRY
from adaptok.ops.common import poison_outputs

from conftest import require

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_lengths(seed, batch=7, longest=600):
    """Lengths in [1, longest], always including 1 and longest."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, longest] + torch.randint(1, longest + 1, (batch - 2,), generator=g).tolist()
    return [lengths[i] for i in torch.randperm(batch, generator=g).tolist()]


def random_sequences(lengths, features, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *features, generator=g).to(device, dtype) for n in lengths]


def nan_padded(xs, length):
    """[B, length, *F] with NaN past each sequence: a kernel that reads past a
    sequence's end leaks NaN into its output."""
    out = torch.full((len(xs), length, *xs[0].shape[1:]), float("nan"), dtype=xs[0].dtype, device=xs[0].device)
    for b, x in enumerate(xs):
        out[b, : x.shape[0]] = x
    return out


def assert_same(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(actual, expected), (actual - expected).abs().max()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip(device_backend, dtype, seed):
    """from_list -> to_padded -> from_padded -> to_list, cls_tokens and
    index_select, on random lengths from 1 to 600, every output poisoned."""
    device, backend = device_backend
    dtype = DTYPES[dtype]
    lengths = random_lengths(seed)
    xs = random_sequences(lengths, (24,), dtype, device, seed)
    idx = [3, 0, 6, 3, 1]  # repeats allowed
    with adaptok.backend(backend), poison_outputs():
        rb = adaptok.RaggedBatch.from_list(xs, grid=[7 + b for b in range(len(xs))])
        require(REGISTRY["unpack"], backend, rb.values, rb.cu_seqlens, rb.max_seqlen, -1.0)
        assert rb.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
        assert rb.max_seqlen == 600 and rb.total_tokens == sum(lengths)

        padded = rb.to_padded(pad_value=-1.0)
        expected = torch.full((len(xs), 600, 24), -1.0, dtype=dtype, device=device)
        for b, x in enumerate(xs):
            expected[b, : x.shape[0]] = x
        assert_same(padded, expected)
        assert_same(rb.to_padded(length=611)[:, 600:], torch.zeros(len(xs), 11, 24, dtype=dtype, device=device))

        again = adaptok.RaggedBatch.from_padded(nan_padded(xs, 600), lengths)
        assert_same(again.values, torch.cat(xs))
        assert again.cu_seqlens.tolist() == rb.cu_seqlens.tolist()
        for got, x in zip(again.to_list(), xs):
            assert_same(got, x)

        assert_same(rb.cls_tokens(), torch.stack([x[0] for x in xs]))

        sub = rb.index_select(idx)
        assert sub.lengths == tuple(lengths[i] for i in idx) and sub.max_seqlen == max(sub.lengths)
        assert sub.grid.tolist() == [7 + i for i in idx]
        assert_same(sub.values, torch.cat([xs[i] for i in idx]))


def test_multidim_features_and_any_dtype(device_backend):
    """Rows may be [H, D] (packed qkv-style) and, for the C++/CUDA kernels and
    the reference, of any dtype (they move bytes)."""
    device, backend = device_backend
    dtypes = [torch.float32] if backend == "triton" else [torch.float64, torch.int64, torch.bool]
    for dtype in dtypes:
        xs = [torch.randint(0, 2, (n, 3, 8)).to(device, dtype) for n in (5, 1, 17)]
        with adaptok.backend(backend), poison_outputs():
            rb = adaptok.RaggedBatch.from_list(xs)
            padded = rb.to_padded()
            assert padded.shape == (3, 17, 3, 8)
            assert_same(adaptok.RaggedBatch.from_padded(padded, [5, 1, 17]).values, rb.values)
            assert_same(rb.cls_tokens(), torch.stack([x[0] for x in xs]))
            assert_same(rb.index_select([2, 0]).values, torch.cat([xs[2], xs[0]]))


@pytest.mark.parametrize("dtype,width", [(torch.float16, 3), (torch.float32, 5), (torch.int8, 5)],
                         ids=["fp16-C3", "fp32-C5", "int8-C5"])
def test_narrow_and_misaligned_rows(device_backend, dtype, width):
    """Rows of 5-10 bytes and a base address one element off alignment: the
    CUDA kernel falls back to narrow vectors, the pad value must survive."""
    device, backend = device_backend
    if backend == "triton" and dtype == torch.int8:
        pytest.skip("triton serves floating-point rows only")
    big = torch.randint(-50, 50, (1 + 4 + 7 + 2, width)).to(device, dtype)
    values = big[1:]  # contiguous, base pointer off by one row
    cu = torch.tensor([0, 4, 11, 13], dtype=torch.int32, device=device)
    xs = [values[0:4], values[4:11], values[11:13]]
    with adaptok.backend(backend), poison_outputs():
        padded = adaptok.ops.unpack(values, cu, 8, -1.0)
        expected = torch.full((3, 8, width), -1, dtype=dtype, device=device)
        for b, x in enumerate(xs):
            expected[b, : x.shape[0]] = x
        assert_same(padded, expected)
        assert_same(adaptok.ops.pack(padded, cu, 13), values)
        assert_same(adaptok.ops.cls_tokens(values, cu), torch.stack([x[0] for x in xs]))


def test_non_contiguous_offsets(device_backend):
    """Strided cu_seqlens and seq_idx are read correctly."""
    device, backend = device_backend
    xs = random_sequences([2, 5, 3], (4,), torch.float32, device)
    values = torch.cat(xs)
    cu = torch.tensor([0, -1, 2, -1, 7, -1, 10], dtype=torch.int32, device=device)[::2]
    idx = torch.tensor([2, 9, 0, 9], device=device)[::2]
    cu_out = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    with adaptok.backend(backend), poison_outputs():
        assert_same(adaptok.ops.cls_tokens(values, cu), torch.stack([x[0] for x in xs]))
        assert_same(adaptok.ops.select_sequences(values, cu, idx, cu_out, 5), torch.cat([xs[2], xs[0]]))


def test_triton_refuses_integer_rows():
    rb = adaptok.RaggedBatch.from_list([torch.zeros(3, 4, dtype=torch.int64)])
    reason = REGISTRY["cls_tokens"].why_not("triton", rb.values, rb.cu_seqlens)
    assert reason is not None and "int64" in reason


def test_index_select_with_device_indices_and_mask(device_backend):
    device, backend = device_backend
    xs = random_sequences([4, 9, 1, 6], (8,), torch.float32, device)
    with adaptok.backend(backend), poison_outputs():
        rb = adaptok.RaggedBatch.from_list(xs)
        by_tensor = rb.index_select(torch.tensor([3, -4, 3], device=device))
        assert_same(by_tensor.values, torch.cat([xs[3], xs[0], xs[3]]))
        by_mask = rb.index_select(torch.tensor([False, True, True, False], device=device))
        assert_same(by_mask.values, torch.cat([xs[1], xs[2]]))
        assert by_mask.max_seqlen == 9


def test_from_padded_with_device_lengths(device_backend):
    device, backend = device_backend
    xs = random_sequences([3, 8, 5], (4,), torch.float32, device)
    with adaptok.backend(backend), poison_outputs():
        rb = adaptok.RaggedBatch.from_padded(nan_padded(xs, 8), torch.tensor([3, 8, 5], device=device))
        assert rb.max_seqlen == 8 and rb.lengths == (3, 8, 5)
        assert_same(rb.values, torch.cat(xs))


# --------------------------------------------------------------------- autograd


def _grad_cases(device, dtype):
    """(op name, function of the differentiable tensor, its value)."""
    lengths = [3, 1, 6]
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=device)
    values = torch.randn(10, 5, device=device, dtype=dtype)
    padded = torch.randn(3, 6, 5, device=device, dtype=dtype)
    idx = torch.tensor([2, 0, 2], device=device)
    cu_out = torch.tensor([0, 6, 9, 15], dtype=torch.int32, device=device)
    rows = torch.tensor([4, 5, 6, 7, 8, 9, 0, 1, 2, 4, 5, 6, 7, 8, 9], device=device)
    b_of = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    return [
        ("pack", lambda x: adaptok.ops.pack(x, cu, 10), lambda x: x[b_of, pos], padded),
        ("unpack", lambda v: adaptok.ops.unpack(v, cu, 7, 2.0),
         lambda v: torch.full((3, 7, 5), 2.0, dtype=dtype, device=device).index_put((b_of, pos), v), values),
        ("cls_tokens", lambda v: adaptok.ops.cls_tokens(v, cu), lambda v: v[torch.tensor([0, 3, 4], device=device)], values),
        ("select_sequences", lambda v: adaptok.ops.select_sequences(v, cu, idx, cu_out, 15), lambda v: v[rows], values),
    ]


@pytest.mark.parametrize("op_name", ["pack", "unpack", "cls_tokens", "select_sequences"])
def test_gradients(device_backend, op_name):
    """Forward and backward against the same computation written with plain
    indexing (autograd of PyTorch's own ops)."""
    device, backend = device_backend
    case = {name: (f, ref, x) for name, f, ref, x in _grad_cases(device, torch.float32)}
    f, ref, x = case[op_name]
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    with adaptok.backend(backend), poison_outputs():
        out = f(x1)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    expected = ref(x2)
    expected.backward(grad_out)
    assert_same(out.detach(), expected.detach())
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("op_name", ["pack", "unpack", "cls_tokens", "select_sequences"])
def test_gradcheck_float64(op_name):
    """Finite differences through the reference and the C++ kernels."""
    for backend in ("torch", "cpu"):
        f, _, x = {n: (f, r, x) for n, f, r, x in _grad_cases("cpu", torch.float64)}[op_name]
        if REGISTRY[op_name].why_not(backend, *_op_args(op_name, x)) is not None:
            continue
        with adaptok.backend(backend):
            assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))


def _op_args(op_name, x):
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    return {
        "pack": (x, cu, 10),
        "unpack": (x, cu, 7, 0.0),
        "cls_tokens": (x, cu),
        "select_sequences": (x, cu, torch.tensor([2, 0, 2]), torch.tensor([0, 6, 9, 15], dtype=torch.int32), 15),
    }[op_name]


@pytest.mark.parametrize("op_name", ["pack", "unpack", "cls_tokens", "select_sequences"])
def test_opcheck(device_backend, op_name):
    """torch.library.opcheck: schema, fake tensor, autograd registration and
    AOT dispatch, with the backend forced."""
    device, backend = device_backend
    x = {n: x for n, _, _, x in _grad_cases(device, torch.float32)}[op_name].requires_grad_()
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _op_args(op_name, x))
    require(REGISTRY[op_name], backend, *args)
    with adaptok.backend(backend):
        torch.library.opcheck(getattr(torch.ops.adaptok, op_name).default, args)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_stay_in_bounds_for_malformed_offsets(backend):
    """Values of cu_seqlens and seq_idx are not checked on the GPU (that would
    sync): the kernels must still never touch memory outside their tensors.
    Guard rows around the output must keep their values."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    op = REGISTRY["select_sequences"]
    values = torch.randn(10, 8, device="cuda")
    guarded = torch.full((2 + 6 + 2, 8), 7.0, device="cuda")
    out = guarded[2:8]
    cu = torch.tensor([0, 9, 3, 10_000_000], dtype=torch.int32, device="cuda")  # not monotonic, past T
    seq_idx = torch.tensor([5, -3, 2], device="cuda")  # out of range
    cu_out = torch.tensor([0, -4, 1_000_000, 6], dtype=torch.int32, device="cuda")
    require(op, backend, values, cu, seq_idx, cu_out, 6)
    if backend == "cuda":
        torch.ops.adaptok.ext_select_sequences(values, cu, seq_idx, cu_out, out)
        torch.ops.adaptok.ext_unpack(values, cu, 0.0, guarded[2:8].view(3, 2, 8))
        torch.ops.adaptok.ext_pack(values.view(2, 5, 8), cu[:3], out)
    else:
        from adaptok.kernels import ragged as kernels

        kernels.select_sequences(values, cu, seq_idx, cu_out, out, 8)
        kernels.unpack(values, cu, 0.0, guarded[2:8].view(3, 2, 8), 8)
        kernels.pack(values.view(2, 5, 8), cu[:3], out, 8)
    torch.cuda.synchronize()
    assert torch.all(guarded[:2] == 7.0) and torch.all(guarded[8:] == 7.0)


def test_gpu_ops_do_not_sync(device_backend):
    """pack, unpack, cls_tokens and select_sequences with device tensors and
    host sizes never wait for the GPU."""
    device, backend = device_backend
    if device != "cuda":
        pytest.skip("a CUDA sync check")
    xs = random_sequences([5, 2, 9], (16,), torch.float32, device)
    rb = adaptok.RaggedBatch.from_list(xs)
    padded = rb.to_padded()
    sub = rb.index_select([2, 0])
    idx = torch.tensor([2, 0], device=device)
    torch.cuda.synchronize()
    with adaptok.backend(backend):
        torch.cuda.set_sync_debug_mode("error")
        try:
            adaptok.ops.pack(padded, rb.cu_seqlens, rb.total_tokens)
            adaptok.ops.unpack(rb.values, rb.cu_seqlens, 9)
            adaptok.ops.cls_tokens(rb.values, rb.cu_seqlens)
            adaptok.ops.select_sequences(rb.values, rb.cu_seqlens, idx, sub.cu_seqlens, sub.total_tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(device_backend, compiler):
    """A function that packs, unpacks, gathers CLS tokens and selects
    sequences traces into one graph and matches eager."""
    device, backend = device_backend
    xs = random_sequences([5, 2, 9], (16,), torch.float32, device)
    rb = adaptok.RaggedBatch.from_list(xs)
    idx = torch.tensor([2, 0], device=device)
    sub = rb.index_select([2, 0])

    def f(values):
        padded = adaptok.ops.unpack(values * 2, rb.cu_seqlens, 9, 0.0)
        packed = adaptok.ops.pack(padded + 1, rb.cu_seqlens, rb.total_tokens)
        chosen = adaptok.ops.select_sequences(packed, rb.cu_seqlens, idx, sub.cu_seqlens, sub.total_tokens)
        return adaptok.ops.cls_tokens(packed, rb.cu_seqlens).sum() + chosen.sum(0)

    with adaptok.backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=compiler)
        torch.testing.assert_close(compiled(rb.values), f(rb.values))


# -------------------------------------------------------------------- bad input


def test_python_errors_name_the_argument():
    x = torch.randn(2, 4, 3)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    cases = [
        (TypeError, "cu_seqlens must be int32", lambda: adaptok.ops.pack(x, cu.long(), 5)),
        (ValueError, "cu_seqlens must start at 0", lambda: adaptok.ops.pack(x, torch.tensor([1, 3, 5], dtype=torch.int32), 5)),
        (ValueError, "strictly increasing", lambda: adaptok.ops.pack(x, torch.tensor([0, 3, 3], dtype=torch.int32), 3)),
        (ValueError, "strictly increasing", lambda: adaptok.ops.pack(x, torch.tensor([0, 4, 3], dtype=torch.int32), 3)),
        (ValueError, r"cu_seqlens\[-1\] must equal .*total", lambda: adaptok.ops.pack(x, cu, 6)),
        (ValueError, "more than x.shape\\[1\\]", lambda: adaptok.ops.pack(x, torch.tensor([0, 5, 6], dtype=torch.int32), 6)),
        (ValueError, "B \\+ 1 = 3 entries", lambda: adaptok.ops.pack(x, torch.tensor([0, 5], dtype=torch.int32), 5)),
        (ValueError, "empty batch", lambda: adaptok.ops.cls_tokens(x[0], torch.tensor([0], dtype=torch.int32))),
        (ValueError, "cu_seqlens must be on the same device", lambda: adaptok.ops.pack(x, cu.to("meta"), 5)),
        (ValueError, "more than .*length", lambda: adaptok.ops.unpack(torch.randn(5, 3), cu, 2)),
        (TypeError, "seq_idx must be int64",
         lambda: adaptok.ops.select_sequences(torch.randn(5, 3), cu, torch.tensor([0], dtype=torch.int32), cu[:2], 3)),
        (ValueError, "seq_idx\\[0\\] = 2 is out of range",
         lambda: adaptok.ops.select_sequences(torch.randn(5, 3), cu, torch.tensor([2]), cu[:2], 3)),
        (ValueError, "cu_seqlens_out (must give|gives) .*sequence",
         lambda: adaptok.ops.select_sequences(torch.randn(5, 3), cu, torch.tensor([1]), cu[:2], 3)),
        (ValueError, "xs\\[1\\] must have shape \\[N, C\\] with N >= 1",
         lambda: adaptok.RaggedBatch.from_list([torch.randn(2, 3), torch.randn(0, 3)])),
        (ValueError, "does not match xs\\[0\\]", lambda: adaptok.RaggedBatch.from_list([torch.randn(2, 3), torch.randn(2, 4)])),
        (ValueError, "xs must hold at least one sequence", lambda: adaptok.RaggedBatch.from_list([])),
        (ValueError, "lengths must lie in \\[1, x.shape\\[1\\] = 4\\]", lambda: adaptok.RaggedBatch.from_padded(x, [5, 1])),
        (ValueError, "lengths must lie in", lambda: adaptok.RaggedBatch.from_padded(x, [0, 1])),
        (ValueError, "lengths must have one entry per sequence", lambda: adaptok.RaggedBatch.from_padded(x, [1])),
        (ValueError, "max_seqlen = 2 is smaller than the longest", lambda: adaptok.RaggedBatch(torch.randn(5, 3), cu, 2)),
        (ValueError, "grid must have one entry per sequence", lambda: adaptok.RaggedBatch(torch.randn(5, 3), cu, 3, grid=[7])),
        (ValueError, "seq_idx 2 is out of range", lambda: adaptok.RaggedBatch(torch.randn(5, 3), cu, 3).index_select([2])),
        (ValueError, "length must be at least max_seqlen", lambda: adaptok.RaggedBatch(torch.randn(5, 3), cu, 3).to_padded(length=2)),
        (TypeError, "x must be a torch.Tensor", lambda: adaptok.ops.pack([1, 2], cu, 5)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_cpp_errors_name_the_argument():
    """The extension's own checks (TORCH_CHECK) guard direct callers."""
    if adaptok._ext.error() is not None:
        pytest.skip(f"extension unavailable: {adaptok._ext.error()}")
    ext = torch.ops.adaptok
    x = torch.randn(2, 4, 3)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    out = torch.empty(5, 3)
    cases = [
        (TypeError, "cu_seqlens must be int32", lambda: ext.ext_pack(x, cu.long(), out)),
        (ValueError, "cu_seqlens must start at 0", lambda: ext.ext_pack(x, torch.tensor([1, 3, 5], dtype=torch.int32), out)),
        (ValueError, "strictly increasing", lambda: ext.ext_pack(x, torch.tensor([0, 3, 3], dtype=torch.int32), out)),
        (ValueError, "must equal out.shape\\[0\\]", lambda: ext.ext_pack(x, cu, torch.empty(6, 3))),
        (ValueError, "more than x.shape\\[1\\]", lambda: ext.ext_pack(x, torch.tensor([0, 5, 6], dtype=torch.int32), torch.empty(6, 3))),
        (TypeError, "out must have the dtype of x", lambda: ext.ext_pack(x, cu, out.double())),
        (ValueError, "feature dims of x", lambda: ext.ext_pack(x, cu, torch.empty(5, 4))),
        (ValueError, "x must be contiguous", lambda: ext.ext_pack(x.transpose(0, 1), cu, out)),
        (ValueError, "length B \\+ 1 with B >= 1", lambda: ext.ext_cls_tokens(out, cu[:1], torch.empty(0, 3))),
        (ValueError, "more than out.shape\\[1\\]", lambda: ext.ext_unpack(out, cu, 0.0, torch.empty(2, 2, 3))),
        (ValueError, "seq_idx\\[0\\] = 5 is out of range",
         lambda: ext.ext_select_sequences(out, cu, torch.tensor([5]), cu[:2], torch.empty(3, 3))),
        (TypeError, "seq_idx must be int64",
         lambda: ext.ext_select_sequences(out, cu, torch.tensor([0], dtype=torch.int32), cu[:2], torch.empty(3, 3))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_mixed_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(2, 4, 3, device="cuda")
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must be on the same device"):
        adaptok.ops.pack(x, cu, 5)
    if adaptok._ext.error() is None:
        with pytest.raises(ValueError, match="cu_seqlens must be on the same device"):
            torch.ops.adaptok.ext_pack(x, cu, torch.empty(5, 3, device="cuda"))
