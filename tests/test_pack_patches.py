"""adaptok.ops.pack_patches on every backend, against a float64 reference
built image by image: prefix rows and copies bit for bit, sums to half an ulp
of the dtype."""
import pytest
import torch

import adaptok
from adaptok.ops.common import poison_outputs
from adaptok.ops.pack_patches import PACK_PATCHES, output_rows, sequence_lengths

from conftest import backend_pairs, device_backend_id, require, use_device_backend

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Every patch row is the exact sum of two values of the dtype rounded once:
# at most half an ulp away (relative) from the float64 sum, or half the
# subnormal spacing (below the smallest normal) near zero.
TOLERANCE = {dt: (torch.finfo(dt).eps / 2, torch.finfo(dt).tiny) for dt in DTYPES.values()}

# Case: groups as (images, h, w), prefix rows n, pos, layout, channels. Layouts:
#   conv        the [B, C, h, w] output of a patch convolution as [B, P, C]
#               (channel stride P, token stride 1),
#   contiguous  [B, P, C],
#   sliced      every other channel, from token 1 and image 0, 2, ... of a
#               larger tensor (channel stride 2, storage offset),
#   expanded    one image broadcast over B (image stride 0),
#   conv-strided  every other token of a convolution's output (token stride 2),
#   mixed       group g in the g-th of the five layouts above.
VIT = ((3, 7, 7), (1, 10, 10), (2, 14, 14))
CASES = {
    "G1-B1-7x7-n1-pos-conv-C384": (((1, 7, 7),), 1, True, "conv", 384),
    "G1-B2-10x10-n0-conv-C384": (((2, 10, 10),), 0, False, "conv", 384),
    "G3-vit-n1-pos-conv-C384": (VIT, 1, True, "conv", 384),
    "G2-B2,1-7x7,14x14-n2-pos-contiguous-C384": (((2, 7, 7), (1, 14, 14)), 2, True, "contiguous", 384),
    "G3-P1,2,36-n5-pos-conv-C3": (((2, 1, 1), (1, 1, 2), (3, 6, 6)), 5, True, "conv", 3),
    "G3-P1,2,9-n0-contiguous-C40": (((1, 1, 1), (4, 1, 2), (2, 3, 3)), 0, False, "contiguous", 40),
    "G2-n1-sliced-C40": (((3, 7, 7), (1, 1, 2)), 1, False, "sliced", 40),
    "G2-n2-pos-sliced-C40": (((2, 5, 5), (3, 2, 2)), 2, True, "sliced", 40),
    "G5-n1-pos-mixed-C40": (((2, 7, 7), (3, 2, 2), (1, 1, 1), (2, 3, 4), (2, 5, 9)), 1, True, "mixed", 40),
    "G1-B1-1x1-n1-pos-conv-C3": (((1, 1, 1),), 1, True, "conv", 3),
}
LAYOUTS = ("conv", "contiguous", "sliced", "expanded", "conv-strided")


@pytest.fixture(params=backend_pairs(PACK_PATCHES), ids=device_backend_id)
def pack_backend(request):
    return use_device_backend(request.param)


def supported(device, backend, dtype):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 Triton runs on a GPU (the interpreter truncates bf16 casts)")


def patch_tensor(images, h, w, channels, layout, gen):
    """``[images, h * w, channels]`` float32 (on the CPU) in ``layout``."""
    P = h * w
    if layout == "conv":
        return torch.randn(images, channels, h, w, generator=gen).flatten(2).transpose(1, 2)
    if layout == "contiguous":
        return torch.randn(images, P, channels, generator=gen)
    if layout == "sliced":
        return torch.randn(2 * images, P + 1, 2 * channels + 1, generator=gen)[::2, 1:, 1::2]
    if layout == "expanded":
        return torch.randn(1, P, channels, generator=gen).expand(images, P, channels)
    if layout == "conv-strided":
        return torch.randn(images, channels, 2 * P, generator=gen)[..., ::2].transpose(1, 2)
    raise ValueError(layout)


def make(case, dtype, device, seed=0):
    """patches (in the case's layouts), pos (a list, maybe empty) and prefix
    (or None), in ``dtype`` on ``device``; patches keep their strides."""
    groups, n, with_pos, layout, channels = CASES[case] if isinstance(case, str) else case
    gen = torch.Generator().manual_seed(seed)
    patches = []
    for g, (images, h, w) in enumerate(groups):
        x = patch_tensor(images, h, w, channels, LAYOUTS[g % len(LAYOUTS)] if layout == "mixed" else layout, gen)
        # Cast the underlying storage, so the strides survive the move.
        base = x._base if x._base is not None else x
        moved = base.to(device, dtype)
        patches.append(moved.as_strided(x.shape, x.stride(), x.storage_offset()))
    pos = [torch.randn(h * w, channels, generator=gen).to(device, dtype) for _, h, w in groups] if with_pos else []
    prefix = torch.randn(n, channels, generator=gen).to(device, dtype) if n else None
    return patches, pos, prefix


def group_prefixes(prefix, groups):
    """``prefix`` (None, one tensor, or one tensor or None per group) per group."""
    return list(prefix) if isinstance(prefix, (list, tuple)) else [prefix] * groups


def reference64(patches, pos, prefix):
    """Image by image in float64: ``[prefix_g; patches[g][b] + pos[g]]``."""
    rows = []
    prefixes = group_prefixes(prefix, len(patches))
    for g, x in enumerate(patches):
        for b in range(x.shape[0]):
            if prefixes[g] is not None:
                rows.append(prefixes[g].double())
            rows.append(x[b].double() + pos[g].double() if pos else x[b].double())
    return torch.cat(rows)


def run(backend, patches, pos, prefix):
    with adaptok.backend(backend), poison_outputs():
        return adaptok.ops.pack_patches(patches, pos, prefix)


def check(out, patches, pos, prefix):
    """Shape, dtype and layout; every row against the float64 reference:
    prefix rows and plain copies exactly, sums to half an ulp."""
    dtype, C = patches[0].dtype, patches[0].shape[2]
    n = 0 if prefix is None else prefix.shape[0]
    T = sum(x.shape[0] * (n + x.shape[1]) for x in patches)
    assert out.shape == (T, C) and out.dtype == dtype and out.is_contiguous()
    expected = reference64(patches, pos, prefix)
    if not pos:
        assert torch.equal(out, expected.to(dtype))
        return
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
    starts = torch.tensor([0, *sequence_lengths(patches, prefix)]).cumsum(0)[:-1]
    for i in range(n):
        assert torch.equal(out[starts + i], prefix[i].expand(len(starts), C))


# ------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_forward(pack_backend, case, dtype):
    device, backend = pack_backend
    dtype = DTYPES[dtype]
    supported(device, backend, dtype)
    patches, pos, prefix = make(case, dtype, device)
    require(PACK_PATCHES, backend, patches, pos, prefix)
    check(run(backend, patches, pos, prefix), patches, pos, prefix)


def test_layout_helpers():
    patches, _, prefix = make((VIT, 2, True, "conv", 8), torch.float32, "cpu")
    lengths = sequence_lengths(patches, prefix)
    assert lengths == [51] * 3 + [102] + [198] * 2
    assert output_rows(patches, prefix) == sum(lengths)
    assert output_rows(patches, None) == sum(lengths) - 2 * len(lengths)


def test_cpu_kernel_is_the_automatic_choice_on_cpu():
    use_device_backend(("cpu", "cpu"))
    patches, pos, prefix = make("G3-vit-n1-pos-conv-C384", torch.float32, "cpu")
    for dtype in DTYPES.values():
        args = ([x.to(dtype) for x in patches], [t.to(dtype) for t in pos], prefix.to(dtype))
        assert PACK_PATCHES.select(*args).backend == "cpu"


def test_float64_falls_back_to_torch():
    patches, pos, prefix = make("G2-n2-pos-sliced-C40", torch.float64, "cpu")
    assert PACK_PATCHES.select(patches, pos, prefix).backend == "torch"
    torch.testing.assert_close(adaptok.ops.pack_patches(patches, pos, prefix), reference64(patches, pos, prefix),
                               rtol=0, atol=0)


# ----------------------------------------------------- a prefix per group


def per_group_case(dtype, device, seed=3):
    """Three groups in the kernels' layouts, with 2, 0 and 1 prefix rows (a
    distillation token only on some grids): patches, pos, prefixes."""
    patches, pos, _ = make((((2, 3, 3), (3, 2, 2), (1, 4, 4)), 0, True, "mixed", 40), dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    prefixes = [torch.randn(2, 40, generator=gen).to(device, dtype), None,
                torch.randn(1, 40, generator=gen).to(device, dtype)]
    return patches, pos, prefixes


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_prefix_per_group(pack_backend, dtype):
    """Groups with different prefix counts pack as ``[prefix_g; patches +
    pos]``: prefix rows exact, sums to half an ulp; the lengths follow."""
    device, backend = pack_backend
    dtype = DTYPES[dtype]
    supported(device, backend, dtype)
    patches, pos, prefixes = per_group_case(dtype, device)
    require(PACK_PATCHES, backend, patches, pos, [p if p is not None else patches[0].new_empty(0, 40)
                                                  for p in prefixes])
    out = run(backend, patches, pos, prefixes)
    assert sequence_lengths(patches, prefixes) == [11, 11, 4, 4, 4, 17]
    assert out.shape == (output_rows(patches, prefixes), 40) == (51, 40)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), reference64(patches, pos, prefixes), rtol=rtol, atol=atol)
    starts = [0, 11, 22, 26, 30, 34]
    for s, g in zip(starts, [0, 0, 1, 1, 1, 2]):
        if prefixes[g] is not None:
            assert torch.equal(out[s:s + prefixes[g].shape[0]], prefixes[g])


def test_prefix_per_group_gradients(pack_backend):
    device, backend = pack_backend
    patches, pos, prefixes = per_group_case(torch.float32, device)
    kept = [p for p in prefixes if p is not None]
    leaves = [t.detach().requires_grad_() for t in (*patches, *pos, *kept)]

    def split(ts):
        it = iter(ts[6:])
        return list(ts[:3]), list(ts[3:6]), [next(it) if p is not None else None for p in prefixes]

    check_gradients(backend, device, leaves, split)


def test_prefix_per_group_errors_name_the_argument():
    patches, pos, prefixes = per_group_case(torch.float32, "cpu")
    op = adaptok.ops.pack_patches
    cases = [
        (lambda: op(patches, pos, prefixes[:2]), ValueError, r"prefix must hold one entry per group \(3\), got 2"),
        (lambda: op(patches, pos, [prefixes[0], "x", None]), TypeError, r"prefix\[1\] must be a torch.Tensor"),
        (lambda: op(patches, pos, [prefixes[0][:, :3], None, None]), ValueError,
         r"prefix\[0\] must have shape \[n_g, C\] with C = 40"),
        (lambda: op(patches, pos, [None, None, prefixes[2].half()]), TypeError, r"prefix\[2\] must have the dtype"),
        (lambda: op(patches, pos, "cls"), TypeError, r"prefix must be None, a \[n, C\] tensor or one per group"),
    ]
    for fn, kind, message in cases:
        with pytest.raises(kind, match=message):
            fn()


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", ["G5-n1-pos-mixed-C40", "G3-P1,2,9-n0-contiguous-C40", "G2-n2-pos-sliced-C40"])
def test_gradients(pack_backend, case):
    """Gradients of every patches, pos and prefix tensor against autograd on
    the float64 reference."""
    device, backend = pack_backend
    patches, pos, prefix = make(case, torch.float32, device, seed=1)
    leaves = [t.detach().requires_grad_() for t in patches + pos + ([prefix] if prefix is not None else [])]
    G, P = len(patches), len(pos)
    split = lambda ts: (ts[:G], ts[G:G + P], ts[G + P] if prefix is not None else None)  # noqa: E731
    check_gradients(backend, device, leaves, split)


def check_gradients(backend, device, leaves, split):
    """The fp32 gradients of ``leaves`` (``split`` turns them into the op's
    arguments) against autograd on the float64 reference."""
    out = run(backend, *split(leaves))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    actual = torch.autograd.grad(out, leaves, grad_out)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    expected = torch.autograd.grad(reference64(*split(ref)), ref, grad_out.double())
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    patches, pos, prefix = make((((2, 1, 2), (1, 2, 1)), 2, True, "mixed", 3), torch.float64, "cpu")
    leaves = [t.detach().requires_grad_() for t in (*patches, *pos, prefix)]

    def f(x0, x1, p0, p1, prefix):
        return adaptok.ops.pack_patches([x0, x1], [p0, p1], prefix)

    with adaptok.backend("torch"):
        assert torch.autograd.gradcheck(f, leaves)


# ------------------------------------------------------------ custom op, compile


def test_opcheck(pack_backend):
    device, backend = pack_backend
    with adaptok.backend(backend):
        for case in ("G5-n1-pos-mixed-C40", "G3-P1,2,9-n0-contiguous-C40", "G1-B1-1x1-n1-pos-conv-C3"):
            patches, pos, prefix = make(case, torch.float32, device)
            prefix = [] if prefix is None else [prefix] * len(patches)  # the op's form: one per group
            torch.library.opcheck(torch.ops.adaptok.pack_patches.default, (patches, pos, prefix))
        patches, pos, prefixes = per_group_case(torch.float32, device)
        prefixes = [p if p is not None else patches[0].new_empty(0, 40) for p in prefixes]
        torch.library.opcheck(torch.ops.adaptok.pack_patches.default, (patches, pos, prefixes))


def test_compile_fullgraph(pack_backend):
    """A ViT's embedding step (patch convolutions per grid, then packing)
    traces into one graph."""
    device, backend = pack_backend
    gen = torch.Generator().manual_seed(0)
    convs = [torch.randn(b, 16, g, g, generator=gen).to(device).requires_grad_() for b, g in ((3, 3), (2, 5))]
    pos = [torch.randn(g * g, 16, generator=gen).to(device) for g in (3, 5)]
    cls = torch.randn(1, 16, generator=gen).to(device)

    def f(c3, c5):
        patches = [c.flatten(2).transpose(1, 2) for c in (2 * c3, 2 * c5)]
        return adaptok.ops.pack_patches(patches, pos, cls).sin()

    with adaptok.backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        actual, expected = compiled(*convs), f(*convs)
        torch.testing.assert_close(actual, expected)
        for a, e in zip(torch.autograd.grad(actual.sum(), convs), torch.autograd.grad(expected.sum(), convs)):
            torch.testing.assert_close(a, e)


def test_gpu_does_not_sync(pack_backend):
    device, backend = pack_backend
    if device != "cuda":
        pytest.skip("a CUDA sync check")
    patches, pos, prefix = make("G3-vit-n1-pos-conv-C384", torch.float16, device)
    leaves = [t.detach().requires_grad_() for t in (*patches, *pos, prefix)]
    torch.cuda.synchronize()
    with adaptok.backend(backend):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = adaptok.ops.pack_patches(leaves[:3], leaves[3:6], leaves[6])
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")


# -------------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    patches, pos, prefix = make("G2-n2-pos-sliced-C40", torch.float32, "cpu")
    x0, x1 = patches
    meta = torch.empty(x1.shape, device="meta")
    op = adaptok.ops.pack_patches
    cases = [
        (lambda: op([]), ValueError, "patches must hold at least one group"),
        (lambda: op(x0), TypeError, "patches must be a list of"),
        (lambda: op([x0, "x"]), TypeError, r"patches\[1\] must be a torch.Tensor"),
        (lambda: op([x0[0]]), ValueError, r"patches\[0\] must have shape \[B_g, P_g, C\]"),
        (lambda: op([x0[:, :0]]), ValueError, r"patches\[0\] must have shape .* every size >= 1"),
        (lambda: op([x0.int()]), TypeError, r"patches\[0\] must be floating point"),
        (lambda: op([x0, x1[..., :5]]), ValueError, r"patches\[1\] \(5 channels, torch.float32\) must match"),
        (lambda: op([x0, x1.double()]), ValueError, r"patches\[1\] \(40 channels, torch.float64\) must match"),
        (lambda: op([x0, meta]), ValueError, r"patches\[1\] must be on the same device as patches\[0\]"),
        (lambda: op(patches, pos[:1]), ValueError, r"pos must be empty or hold one table per group \(2\), got 1"),
        (lambda: op(patches, pos[0]), TypeError, "pos must be a list of"),
        (lambda: op(patches, [pos[0], pos[0]]), ValueError, r"pos\[1\] must have shape \[P_g, C\] = \[4, 40\]"),
        (lambda: op(patches, [pos[0].half(), pos[1]]), TypeError, r"pos\[0\] must have the dtype of patches"),
        (lambda: op(patches, [pos[0], pos[1].to("meta")]), ValueError, r"pos\[1\] must be on the same device"),
        (lambda: op(patches, pos, prefix[0]), ValueError, r"prefix must have shape \[n, C\] with C = 40"),
        (lambda: op(patches, pos, prefix[:, :3]), ValueError, r"prefix must have shape \[n, C\]"),
        (lambda: op(patches, pos, prefix.half()), TypeError, "prefix must have the dtype of patches"),
        (lambda: op(patches, pos, prefix.to("meta")), ValueError, "prefix must be on the same device"),
    ]
    for fn, kind, message in cases:
        with pytest.raises(kind, match=message):
            fn()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_extension_checks_name_the_argument(device):
    """The C++ kernels check their own inputs (TORCH_CHECK) before any work:
    out keeps its contents when a call is refused."""
    use_device_backend((device, device))
    patches, pos, prefix = make("G2-n2-pos-sliced-C40", torch.float32, device)
    x0, x1 = patches
    T = output_rows(patches, prefix)
    sentinel = torch.full((T, 40), 7.0, device=device)

    def call(patches=patches, pos=pos, prefix=prefix, out=None):
        prefix = [prefix] * len(patches) if isinstance(prefix, torch.Tensor) else prefix
        torch.ops.adaptok.ext_pack_patches(patches, pos, prefix, sentinel if out is None else out)

    cases = [
        (dict(patches=[]), ValueError, "patches must hold at least one group"),
        (dict(patches=[x0[0], x1]), ValueError, r"patches\[0\] must have shape \[B_g, P_g, C\]"),
        (dict(patches=[x0.double(), x1.double()]), TypeError, r"patches\[0\] must be float32, float16 or bfloat16"),
        (dict(patches=[x0, x1[:, :0]]), ValueError, r"patches\[1\] must have shape .* every size >= 1"),
        (dict(patches=[x0, x1[..., :5]]), ValueError, r"patches\[1\] must have the C = 40 channels"),
        (dict(patches=[x0, x1.half()]), TypeError, r"patches\[1\] must have the dtype of patches\[0\]"),
        (dict(pos=pos[:1]), ValueError, r"pos must be empty or hold one table per group \(2\), got 1"),
        (dict(pos=[pos[0], pos[0]]), ValueError, r"pos\[1\] must have shape \[P_g, C\] = \[4, 40\]"),
        (dict(pos=[pos[0].half(), pos[1]]), TypeError, r"pos\[0\] must have the dtype of patches"),
        (dict(pos=[pos[0], pos[1].t().contiguous().t()]), ValueError, r"pos\[1\] must be contiguous"),
        (dict(prefix=prefix[:, :3]), ValueError, r"prefix\[0\] must have shape \[n_g, C\] with C = 40"),
        (dict(prefix=prefix.half()), TypeError, r"prefix\[0\] must have the dtype of patches"),
        (dict(prefix=torch.randn(40, 2, device=device).t()), ValueError, r"prefix\[0\] must be contiguous"),
        (dict(prefix=[prefix]), ValueError, r"prefix must be empty or hold one table per group \(2\), got 1"),
        (dict(out=torch.empty(T - 1, 40, device=device)), ValueError, rf"out must have shape \[T, C\] = \[{T}, 40\]"),
        (dict(out=torch.empty(T, 40, device=device).half()), TypeError, "out must have the dtype of patches"),
        (dict(out=torch.empty(40, T, device=device).t()), ValueError, "out must be contiguous"),
    ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            call(**kwargs)
    assert bool((sentinel == 7.0).all())
