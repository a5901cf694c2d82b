"""adaptok.ops.fine_tokens (CF-ViT's fine-stage sequences) on every backend,
against a reference built one image and one patch at a time in float64 with
Python's own sort: the selection and ``source`` exactly, prefix and coarse
rows bit for bit, fine rows (a sum of up to three values) to the rounding of
an fp32 sum then of the dtype."""
import math
import random

import pytest
import torch

import adaptok
from adaptok.ops.common import poison_outputs
from adaptok.ops.fine_tokens import FINE_TOKENS, children, fine_tokens, output_shape, parents, split_patches

from conftest import backend_pairs, device_backend_id, require, use_device_backend

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Case: images, coarse grid (h, w), keep (an int, or a share alpha as a
# float), prefix rows, pos, reuse, scores ("rand", "ties": few distinct
# values, "nan": with NaN and infinities), layout ("model": fine as the
# channels-last convolution's view, coarse a slice of the packed tokens;
# "contiguous").
CASES = {
    "B4-7x7-a0.5-n1-pos-reuse-rand-model": (4, (7, 7), 0.5, 1, True, True, "rand", "model"),
    "B3-7x7-a0.5-n1-pos-reuse-ties-model": (3, (7, 7), 0.5, 1, True, True, "ties", "model"),
    "B2-7x7-a0.3-n1-pos-nan-contiguous": (2, (7, 7), 0.3, 1, True, False, "nan", "contiguous"),
    "B2-14x14-a0.5-n1-pos-reuse-rand-model": (2, (14, 14), 0.5, 1, True, True, "rand", "model"),
    "B2-14x14-a1-n0-reuse-ties-contiguous": (2, (14, 14), 1.0, 0, False, True, "ties", "contiguous"),
    "B3-1x1-k1-n1-pos-reuse-rand-model": (3, (1, 1), 1, 1, True, True, "rand", "model"),
    "B2-1x1-k0-n2-rand-contiguous": (2, (1, 1), 0, 2, False, False, "rand", "contiguous"),
    "B3-3x5-k0-n1-pos-ties-model": (3, (3, 5), 0, 1, True, False, "ties", "model"),
    "B5-2x3-k4-n0-pos-reuse-nan-model": (5, (2, 3), 4, 0, True, True, "nan", "model"),
    "B1-4x2-a0.9-n3-reuse-ties-contiguous": (1, (4, 2), 0.9, 3, False, True, "ties", "contiguous"),
}


@pytest.fixture(params=backend_pairs(FINE_TOKENS), ids=device_backend_id)
def fine_backend(request):
    return use_device_backend(request.param)


def supported(device, backend, dtype):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 Triton runs on a GPU (the interpreter truncates bf16 casts)")


def scores(kind, B, Nc, gen):
    if kind == "rand":
        return torch.rand(B, Nc, generator=gen)
    s = torch.randint(0, 3, (B, Nc), generator=gen).float()  # many ties
    if kind == "nan":
        s[torch.rand(B, Nc, generator=gen) < 0.3] = math.nan
        s[:, 0] = math.nan  # NaN counts as -inf: it ties with the -inf after it and wins on index
        if Nc > 1:
            s[:, 1] = -math.inf
        if Nc > 2:
            s[:, -1] = math.inf
    return s


def make(case, dtype, device, seed=0):
    """``(fine, coarse, score, keep, grid, pos, prefix, reuse)``."""
    B, (h, w), keep, n, with_pos, with_reuse, kind, layout = CASES[case] if isinstance(case, str) else case
    Nc, C = h * w, 40
    gen = torch.Generator().manual_seed(seed)
    if isinstance(keep, float):
        keep = math.ceil(keep * Nc - 1e-9)
    if layout == "model":
        fine = torch.randn(B, C, 2 * h, 2 * w, generator=gen).to(device, dtype)
        fine = fine.contiguous(memory_format=torch.channels_last).flatten(2).transpose(1, 2)
        coarse = torch.randn(B, n + Nc, C, generator=gen).to(device, dtype)[:, n:]
    else:
        fine = torch.randn(B, 4 * Nc, C, generator=gen).to(device, dtype)
        coarse = torch.randn(B, Nc, C, generator=gen).to(device, dtype)
    score = scores(kind, B, Nc, gen).to(device)
    pos = torch.randn(4 * Nc, C, generator=gen).to(device, dtype) if with_pos else None
    prefix = torch.randn(n, C, generator=gen).to(device, dtype) if n else None
    reuse = torch.randn(B, Nc, C, generator=gen).to(device, dtype) if with_reuse else None
    return fine, coarse, score, keep, (h, w), pos, prefix, reuse


def reference64(fine, coarse, score, keep, grid, pos, prefix, reuse):
    """One image and one coarse patch at a time, in float64 (differentiable
    in every tensor but score): ``(tokens [B, L, C] float64, source [B, Nc +
    3K] int64, terms [B, L, C]``: the sum of the absolute terms of each row,
    for the rounding bound)."""
    h, w = grid
    B, Nc, C = coarse.shape
    rows, sources, terms = [], [], []
    zero = fine.new_zeros(C, dtype=torch.float64)
    for b in range(B):
        values = [-math.inf if math.isnan(v) else v for v in score[b].tolist()]
        order = sorted(range(Nc), key=lambda i: (-values[i], i))  # descending; ties: lower index first
        chosen = sorted(order[:keep])
        others = [i for i in range(Nc) if i not in set(chosen)]
        image, src, mag = [], [], []
        if prefix is not None:
            image += [prefix[t].double() for t in range(prefix.shape[0])]
            mag += [prefix[t].double().abs() for t in range(prefix.shape[0])]
        for i in chosen:
            r, c = divmod(i, w)
            for f in (2 * r * 2 * w + 2 * c, 2 * r * 2 * w + 2 * c + 1, (2 * r + 1) * 2 * w + 2 * c,
                      (2 * r + 1) * 2 * w + 2 * c + 1):
                parts = [fine[b, f].double(), pos[f].double() if pos is not None else zero,
                         reuse[b, i].double() if reuse is not None else zero]
                image.append(parts[0] + parts[1] + parts[2])
                mag.append(sum(p.abs() for p in parts))
                src.append(f)
        for i in others:
            image.append(coarse[b, i].double())
            mag.append(coarse[b, i].double().abs())
            src.append(4 * Nc + i)
        rows.append(torch.stack(image))
        sources.append(src)
        terms.append(torch.stack(mag))
    return torch.stack(rows), torch.tensor(sources, dtype=torch.int64).reshape(B, -1), torch.stack(terms)


def run(backend, *args):
    fine, coarse, score, keep, grid, pos, prefix, reuse = args
    with adaptok.backend(backend), poison_outputs():
        return fine_tokens(fine, coarse, score, keep, grid, pos=pos, prefix=prefix, reuse=reuse)


def check(out, source, args):
    fine, coarse, score, keep, grid, pos, prefix, reuse = args
    dtype = coarse.dtype
    expected, expected_source, terms = reference64(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert out.shape == output_shape(coarse, keep, prefix) and out.dtype == dtype and out.is_contiguous()
    assert source.dtype == torch.int64 and source.device == coarse.device
    assert torch.equal(source.cpu(), expected_source)
    out = out.cpu()
    n = 0 if prefix is None else prefix.shape[0]
    copied = torch.zeros(out.shape[:2], dtype=torch.bool)
    copied[:, :n] = True
    copied[:, n:] = expected_source >= 4 * coarse.shape[1]
    assert torch.equal(out[copied], expected[copied].to(dtype)), "prefix and coarse rows are copies"
    # A fine row: an fp32 sum of up to three terms (two roundings of at most
    # half an fp32 ulp of the terms' magnitude), then one rounding to the dtype.
    err = (out[~copied].double() - expected[~copied]).abs()
    bound = (torch.finfo(torch.float32).eps * terms[~copied] + torch.finfo(dtype).eps / 2 *
             (expected[~copied].abs() + torch.finfo(torch.float32).eps * terms[~copied]) + torch.finfo(dtype).tiny)
    assert bool((err <= bound).all()), f"fine rows off by up to {(err - bound).max().item()} beyond the bound"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_forward(fine_backend, case, dtype):
    device, backend = fine_backend
    dtype = DTYPES[dtype]
    supported(device, backend, dtype)
    args = make(case, dtype, device)
    require(FINE_TOKENS, backend, *args[:4], *args[4], *args[5:])
    check(*run(backend, *args), args)


def test_random_batches(fine_backend):
    """Random grids (Nc from 1 to 196), alpha from 0 to 1, scores with ties
    and NaN, every optional part on or off."""
    device, backend = fine_backend
    rng = random.Random(7)
    for seed in range(12):
        h, w = rng.choice([(1, 1), (1, 2), (2, 1), (3, 3), (2, 5), (7, 7), (10, 10), (14, 14), (6, 4)])
        alpha = rng.random() if seed % 4 else rng.choice([0.0, 1.0])
        case = (rng.randint(1, 4), (h, w), alpha, rng.randint(0, 2), rng.random() < 0.5, rng.random() < 0.5,
                rng.choice(["rand", "ties", "nan"]), rng.choice(["model", "contiguous"]))
        dtype = rng.choice([torch.float32, torch.float16] + ([] if backend == "triton" and device == "cpu"
                                                             else [torch.bfloat16]))
        args = make(case, dtype, device, seed)
        check(*run(backend, *args), args)


def test_every_backend_agrees_bit_for_bit(fine_backend):
    """One formula (the fp32 sum in the same order), so the backends agree
    exactly with the torch backend."""
    device, backend = fine_backend
    for case in ("B4-7x7-a0.5-n1-pos-reuse-rand-model", "B5-2x3-k4-n0-pos-reuse-nan-model"):
        for dtype in (torch.float32, torch.float16):
            args = make(case, dtype, device)
            out, source = run(backend, *args)
            ref, ref_source = run("torch", *args)
            assert torch.equal(source, ref_source) and torch.equal(out, ref)


def test_layout_helpers():
    idx = torch.arange(12)
    kids = children(idx, 4)  # a 3 x 4 coarse grid, 6 x 8 fine
    assert kids[5].tolist() == [2 * 8 + 2, 2 * 8 + 3, 3 * 8 + 2, 3 * 8 + 3]
    assert torch.equal(parents(kids, 4), idx[:, None].expand(-1, 4))
    args = make("B3-7x7-a0.5-n1-pos-reuse-ties-model", torch.float32, "cpu")
    _, source = run("torch", *args)
    split = split_patches(source, (7, 7))
    assert split.shape == (3, 49) and split.sum(1).tolist() == [25] * 3
    for b in range(3):
        coarse_left = set((source[b, 100:] - 196).tolist())
        assert set(torch.nonzero(~split[b]).flatten().tolist()) == coarse_left


def test_cpu_kernel_is_the_automatic_choice_on_cpu():
    use_device_backend(("cpu", "cpu"))
    fine, coarse, score, keep, (h, w), pos, prefix, reuse = make("B4-7x7-a0.5-n1-pos-reuse-rand-model",
                                                                  torch.float32, "cpu")
    for dtype in DTYPES.values():
        t = [x.to(dtype) for x in (fine, coarse, pos, prefix, reuse)]
        assert FINE_TOKENS.select(t[0], t[1], score, keep, h, w, t[2], t[3], t[4]).backend == "cpu"


def test_float64_and_half_scores():
    """float64 tensors run on the torch backend; fp16/bf16 scores are
    up-cast for the kernels (the same order)."""
    args = make("B3-7x7-a0.5-n1-pos-reuse-ties-model", torch.float64, "cpu")
    check(*fine_tokens(*args[:5], pos=args[5], prefix=args[6], reuse=args[7]), args)
    args = make("B3-7x7-a0.5-n1-pos-reuse-ties-model", torch.float32, "cpu")
    half = (*args[:2], args[2].bfloat16(), *args[3:])
    check(*fine_tokens(*half[:5], pos=half[5], prefix=half[6], reuse=half[7]), half)


# ----------------------------------------------------------------- gradients


def test_gradients(fine_backend):
    """The backward (a scatter by source, and sums) against autograd through
    the float64 reference."""
    device, backend = fine_backend
    for case in ("B4-7x7-a0.5-n1-pos-reuse-rand-model", "B2-1x1-k0-n2-rand-contiguous",
                 "B5-2x3-k4-n0-pos-reuse-nan-model"):
        fine, coarse, score, keep, grid, pos, prefix, reuse = make(case, torch.float32, device)
        leaves = [None if t is None else t.detach().requires_grad_() for t in (fine, coarse, pos, prefix, reuse)]
        out, _ = run(backend, leaves[0], leaves[1], score, keep, grid, *leaves[2:])
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((out * weight).sum(), present)
        cpu = [None if t is None else t.detach().cpu().double().requires_grad_() for t in leaves]
        ref, _, _ = reference64(cpu[0], cpu[1], score.cpu(), keep, grid, *cpu[2:])
        expected = torch.autograd.grad((ref * weight.cpu().double()).sum(), [t for t in cpu if t is not None],
                                       allow_unused=True)
        for g, e in zip(grads, expected):
            e = torch.zeros_like(g.cpu().double()) if e is None else e
            torch.testing.assert_close(g.cpu().double(), e, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    fine, coarse, score, keep, grid, pos, prefix, reuse = make((2, (2, 3), 3, 1, True, True, "ties", "model"),
                                                                torch.float64, "cpu")
    fine, coarse, score = fine[..., :3], coarse[..., :3], score
    pos, prefix, reuse = pos[:, :3], prefix[:, :3], reuse[..., :3]
    leaves = [t.detach().clone().requires_grad_() for t in (fine, coarse, pos, prefix, reuse)]

    def f(fine, coarse, pos, prefix, reuse):
        return fine_tokens(fine, coarse, score, keep, grid, pos=pos, prefix=prefix, reuse=reuse)[0]

    assert torch.autograd.gradcheck(f, leaves)


# ------------------------------------------------------------ custom op, compile


def test_opcheck(fine_backend):
    device, backend = fine_backend
    with adaptok.backend(backend):
        for case in ("B4-7x7-a0.5-n1-pos-reuse-rand-model", "B2-1x1-k0-n2-rand-contiguous",
                     "B5-2x3-k4-n0-pos-reuse-nan-model"):
            fine, coarse, score, keep, (h, w), pos, prefix, reuse = make(case, torch.float32, device)
            leaves = [None if t is None else t.detach().requires_grad_() for t in (fine, coarse, pos, prefix, reuse)]
            torch.library.opcheck(torch.ops.adaptok.fine_tokens.default,
                                  (leaves[0], leaves[1], score, keep, h, w, *leaves[2:]))


def test_compile_fullgraph(fine_backend):
    """CF-ViT's fine-stage input (patch convolution, reuse MLP, the op)
    traces into one graph, forward and backward."""
    device, backend = fine_backend
    fine, coarse, score, keep, grid, pos, prefix, reuse = make("B4-7x7-a0.5-n1-pos-reuse-rand-model",
                                                                torch.float32, device)
    leaves = [t.detach().requires_grad_() for t in (fine, coarse, reuse)]

    def f(fine, coarse, reuse):
        return fine_tokens(2 * fine, coarse, score, keep, grid, pos=pos, prefix=prefix, reuse=reuse.tanh())[0].sin()

    with adaptok.backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        actual, expected = compiled(*leaves), f(*leaves)
        torch.testing.assert_close(actual, expected)
        for a, e in zip(torch.autograd.grad(actual.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
            torch.testing.assert_close(a, e)


def test_gpu_does_not_sync(fine_backend):
    device, backend = fine_backend
    if device != "cuda":
        pytest.skip("a CUDA sync check")
    fine, coarse, score, keep, grid, pos, prefix, reuse = make("B2-14x14-a0.5-n1-pos-reuse-rand-model",
                                                                torch.float16, device)
    leaves = [t.detach().requires_grad_() for t in (fine, coarse, pos, prefix, reuse)]
    torch.cuda.synchronize()
    with adaptok.backend(backend):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, _ = fine_tokens(leaves[0], leaves[1], score, keep, grid, pos=leaves[2], prefix=leaves[3],
                                 reuse=leaves[4])
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")


# -------------------------------------------------------------------- bad input

_F, _C, _S, _K, _G, _P, _X, _R = make("B3-3x5-k0-n1-pos-ties-model", torch.float32, "cpu")
_REUSE = torch.randn(3, 15, 40)
BAD = {
    "fine-not-tensor": (dict(fine="x"), TypeError, "fine must be a torch.Tensor"),
    "fine-shape": (dict(fine=_F[:, :10]), ValueError, r"fine must have shape \[B, 4 Nc, C\] = \[3, 60, 40\]"),
    "fine-dtype": (dict(fine=_F.half()), TypeError, "fine must have the dtype of coarse"),
    "fine-device": (dict(fine=_F.to("meta")), ValueError, "fine must be on the same device as coarse"),
    "coarse-2d": (dict(coarse=_C[0]), ValueError, r"coarse must have shape \[B, Nc, C\]"),
    "coarse-empty": (dict(coarse=_C[:0]), ValueError, r"coarse must have shape \[B, Nc, C\] with every size >= 1"),
    "coarse-int": (dict(coarse=_C.int(), fine=_F.int()), TypeError, "coarse must be floating point"),
    "score-shape": (dict(score=_S[:, :3]), ValueError, r"score must have shape \[B, Nc\] = \[3, 15\]"),
    "score-int": (dict(score=_S.long()), TypeError, "score must be floating point"),
    "score-device": (dict(score=_S.to("meta")), ValueError, "score must be on the same device as coarse"),
    "keep-negative": (dict(keep=-1), ValueError, "keep must be"),
    "keep-above-Nc": (dict(keep=16), ValueError, r"keep must be in \[0, Nc\] = \[0, 15\]"),
    "keep-float": (dict(keep=2.5), TypeError, "keep must be an int"),
    "keep-bool": (dict(keep=True), TypeError, "keep must be an int"),
    "grid-product": (dict(grid=(2, 5)), ValueError, r"grid \(2, 5\) must be the coarse grid of the Nc = 15"),
    "grid-not-square": (dict(grid=None), ValueError, "grid must be given for Nc = 15"),
    "grid-three": (dict(grid=(3, 5, 1)), ValueError, r"grid must be an int or \(h, w\)"),
    "grid-zero": (dict(grid=(0, 5)), ValueError, r"grid\[0\] must be"),
    "pos-shape": (dict(pos=_P[:10]), ValueError, r"pos must have shape \[60, 40\]"),
    "pos-dtype": (dict(pos=_P.half()), TypeError, "pos must have the dtype of coarse"),
    "pos-not-tensor": (dict(pos=[1.0]), TypeError, "pos must be a torch.Tensor"),
    "prefix-1d": (dict(prefix=_X[0]), ValueError, r"prefix must have shape \[n, C\] with C = 40"),
    "prefix-device": (dict(prefix=_X.to("meta")), ValueError, "prefix must be on the same device as coarse"),
    "reuse-shape": (dict(reuse=_REUSE[:, :3]), ValueError, r"reuse must have shape \[3, 15, 40\]"),
    "reuse-dtype": (dict(reuse=_REUSE.double()), TypeError, "reuse must have the dtype of coarse"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_errors_name_the_argument(case):
    change, kind, message = BAD[case]
    args = dict(fine=_F, coarse=_C, score=_S, keep=3, grid=_G, pos=_P, prefix=_X, reuse=None)
    args.update(change)
    with pytest.raises(kind, match=message):
        fine_tokens(args["fine"], args["coarse"], args["score"], args["keep"], args["grid"], pos=args["pos"],
                    prefix=args["prefix"], reuse=args["reuse"])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_extension_checks_name_the_argument(device):
    """The C++ kernels check their own inputs (TORCH_CHECK) before any work:
    out keeps its contents when a call is refused."""
    use_device_backend((device, device))
    fine, coarse, score, keep, (h, w), pos, prefix, _ = make("B3-3x5-k0-n1-pos-ties-model", torch.float32, device)
    reuse = torch.randn(3, 15, 40, device=device)
    keep = 3
    B, L, C = output_shape(coarse, keep, prefix)
    sentinel = torch.full((B, L, C), 7.0, device=device)
    source = torch.full((B, 15 + 3 * keep), -1, dtype=torch.int64, device=device)

    def call(**change):
        a = dict(fine=fine, coarse=coarse, score=score, keep=keep, h=h, w=w, pos=pos, prefix=prefix, reuse=reuse,
                 out=sentinel, source=source)
        a.update(change)
        torch.ops.adaptok.ext_fine_tokens(*a.values())

    cases = [
        (dict(coarse=coarse[0]), ValueError, r"coarse must have shape \[B, Nc, C\]"),
        (dict(coarse=coarse.double(), fine=fine.double()), TypeError, "coarse must be float32, float16 or bfloat16"),
        (dict(h=2), ValueError, r"grid \(h, w\) = \(2, 5\) must be the coarse grid of the Nc = 15"),
        (dict(keep=16), ValueError, r"keep must be in \[0, Nc\] = \[0, 15\], got 16"),
        (dict(keep=-1), ValueError, r"keep must be in \[0, Nc\]"),
        (dict(fine=fine[:, :10]), ValueError, r"fine must have shape \[3, 60, 40\]"),
        (dict(fine=fine.half()), TypeError, "fine must have the dtype of coarse"),
        (dict(fine=torch.randn(3, 40, 60, device=device).transpose(1, 2)), ValueError,
         "fine must have unit channel stride"),
        (dict(score=score[:, :3]), ValueError, r"score must have shape \[B, Nc\] = \[3, 15\]"),
        (dict(score=score.double()), TypeError, "score must be float32"),
        (dict(score=torch.rand(15, 3, device=device).t()), ValueError, "score must be contiguous"),
        (dict(pos=pos[:10]), ValueError, r"pos must have shape \[60, 40\]"),
        (dict(pos=pos.half()), TypeError, "pos must have the dtype of coarse"),
        (dict(pos=torch.randn(40, 60, device=device).t()), ValueError, "pos must be contiguous"),
        (dict(prefix=prefix[:, :3]), ValueError, r"prefix must have shape \[n, 40\]"),
        (dict(reuse=reuse[:, :3]), ValueError, r"reuse must have shape \[3, 15, 40\]"),
        (dict(reuse=reuse.half()), TypeError, "reuse must have the dtype of coarse"),
        (dict(out=sentinel[:, 1:]), ValueError, r"out must have shape \[B, n \+ Nc \+ 3 keep, C\] = \[3, 25, 40\]"),
        (dict(out=sentinel.half()), TypeError, "out must have the dtype of coarse"),
        (dict(out=sentinel.transpose(0, 1).contiguous().transpose(0, 1)), ValueError, "out must be contiguous"),
        (dict(source=source[:, 1:]), ValueError, r"source must have shape \[B, Nc \+ 3 keep\] = \[3, 24\]"),
        (dict(source=source.int()), TypeError, "source must be int64"),
    ]
    if device == "cuda":
        cases.append((dict(score=score.cpu()), ValueError, "score must be on the same device as coarse"))
    for change, kind, message in cases:
        with pytest.raises(kind, match=message):
            call(**change)
    assert bool((sentinel == 7).all()) and bool((source == -1).all())
