"""What a hostile test run found (issue 14), each case turned into a test:
malformed input is a clear error naming the argument on every backend (one
rule for all of them), numerics that overflow are either right or
non-finite, empty batches and low-precision resizes work, TorchScript is
refused with the alternatives, kernels not yet validated on a GPU are never
chosen automatically on CUDA tensors, and the benchmark plot's labels are
readable."""
import copy
import json
import math
import re
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import timm

import adaptok
from adaptok import RaggedBatch, backends, ops
from adaptok.ops.pack_patches import PACK_PATCHES
from adaptok.ops.ragged import PACK, UNPACK
from adaptok.ops.segment_layer_norm import SEGMENT_LAYER_NORM, segment_layer_norm
from adaptok.ops.topk_select import TOPK_SELECT
from adaptok.ops.varlen_attention import VARLEN_ATTENTION, VARLEN_ATTENTION_BACKWARD

from conftest import backend_pairs, device_backend_id, use_device_backend

CU = torch.tensor([0, 3, 5], dtype=torch.int32)


def qkv(head_dim=8, dtype=torch.float32):
    return torch.randn(3, 5, 2, head_dim, dtype=dtype).unbind(0)


# ------------------------------------------------------- malformed op input

# (id, call, error, message): every case on every backend that serves the op
# on this machine, so that one rule holds for all of them.
OP_CASES = [
    ("varlen-head-dim-0", VARLEN_ATTENTION, lambda: adaptok.varlen_attention(*qkv(0), CU, 3), ValueError,
     "at least one token, head and channel"),
    ("varlen-max-seqlen-2**70", VARLEN_ATTENTION, lambda: adaptok.varlen_attention(*qkv(), CU, 2**70), ValueError,
     r"max_seqlen must be <= 2147483647"),
    ("varlen-max-seqlen-bool", VARLEN_ATTENTION, lambda: adaptok.varlen_attention(*qkv(), CU, True), TypeError,
     "max_seqlen must be an int"),
    ("varlen-max-seqlen-tensor", VARLEN_ATTENTION, lambda: adaptok.varlen_attention(*qkv(), CU, torch.tensor(3)),
     TypeError, "max_seqlen must be a host int"),
    ("varlen-scale-1e300", VARLEN_ATTENTION, lambda: adaptok.varlen_attention(*qkv(), CU, 3, scale=1e300), ValueError,
     "scale must be finite and within the float32 range"),
    ("varlen-scale-inf", VARLEN_ATTENTION, lambda: adaptok.varlen_attention(*qkv(), CU, 3, scale=math.inf),
     ValueError, "scale must be finite"),
    ("varlen-scale-str", VARLEN_ATTENTION, lambda: adaptok.varlen_attention(*qkv(), CU, 3, scale="0.1"), TypeError,
     "scale must be a real number"),
    ("layer-norm-eps-inf", SEGMENT_LAYER_NORM,
     lambda: segment_layer_norm(torch.randn(5, 8), CU, torch.zeros(2, dtype=torch.int32), eps=math.inf), ValueError,
     "eps must be finite and >= 0"),
    ("layer-norm-eps-nan", SEGMENT_LAYER_NORM,
     lambda: segment_layer_norm(torch.randn(5, 8), CU, torch.zeros(2, dtype=torch.int32), eps=math.nan), ValueError,
     "eps must be finite and >= 0"),
    ("layer-norm-eps-negative", SEGMENT_LAYER_NORM,
     lambda: segment_layer_norm(torch.randn(5, 8), CU, torch.zeros(2, dtype=torch.int32), eps=-1e-5), ValueError,
     "eps must be finite and >= 0"),
    ("topk-keep-meta-tensor", TOPK_SELECT,
     lambda: adaptok.topk_select(torch.randn(5, 8), CU, 3, torch.rand(5), keep=torch.ones(2, dtype=torch.int32,
                                                                                         device="meta")),
     ValueError, "keep must be on the CPU or on x's device"),
    ("topk-keep-str", TOPK_SELECT, lambda: adaptok.topk_select(torch.randn(5, 8), CU, 3, torch.rand(5), keep="11"),
     TypeError, "keep must be ints"),
    ("topk-keep-rate-str", TOPK_SELECT,
     lambda: adaptok.topk_select(torch.randn(5, 8), CU, 3, torch.rand(5), keep_rate="0.5"), TypeError,
     "keep_rate must be a real number"),
    ("pack-total-negative", PACK, lambda: ops.pack(torch.randn(2, 3, 4), CU, -1), ValueError, "total must be >= 0"),
    ("pack-total-float", PACK, lambda: ops.pack(torch.randn(2, 3, 4), CU, 5.0), TypeError, "total must be an int"),
    ("unpack-fp16-pad-1e10", UNPACK, lambda: ops.unpack(torch.randn(5, 4).half(), CU, 3, pad_value=1e10), ValueError,
     "pad_value = 1e[+]?10 overflows float16"),
    ("unpack-length-bool", UNPACK, lambda: ops.unpack(torch.randn(5, 4), CU, True), TypeError, "length must be an int"),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_errors_name_the_argument_on_every_backend(case):
    _, op, call, error, match = case
    for device, backend in backend_pairs(op):
        if device != "cpu":
            continue
        try:
            use_device_backend((device, backend))
        except pytest.skip.Exception:
            continue
        with adaptok.backend(backend), pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("pair", backend_pairs(UNPACK), ids=device_backend_id)
def test_unpack_infinite_pad_value_is_representable(pair):
    device, backend = use_device_backend(pair)
    values = torch.randn(5, 4, device=device).half()
    cu = CU.to(device)
    with adaptok.backend(backend):
        out = ops.unpack(values, cu, 4, pad_value=-math.inf)
    assert torch.isneginf(out[0, 3:]).all() and torch.isneginf(out[1, 2:]).all()
    torch.testing.assert_close(out[0, :3], values[:3])


def test_triton_interpreter_refuses_bf16_attention():
    if not backends.triton_interpreted():
        pytest.skip("the Triton interpreter runs only without a GPU")
    q, k, v = qkv(16, torch.bfloat16)
    for op, args in ((VARLEN_ATTENTION, (q, k, v, CU, 3, 0.25, True)),
                     (VARLEN_ATTENTION_BACKWARD, (q, None, None, q, k, v, q, None, None, CU, 3, 0.25))):
        assert "bf16" in op.why_not("triton", *args)
    with adaptok.backend("triton"), pytest.raises(adaptok.BackendError, match="bf16 is wrong in the Triton interpreter"):
        adaptok.varlen_attention(q, k, v, CU, 3)
    with adaptok.backend("triton"):  # fp16 and fp32 still run there
        adaptok.varlen_attention(q.half(), k.half(), v.half(), CU, 3)


# ------------------------------------------------------------- RaggedBatch


@pytest.mark.parametrize("grid, lengths, error, match", [
    ([7.9, -3], [2, 5], TypeError, "grid must hold ints, got 7.9"),
    ([7, -3], [2, 5], ValueError, "grid tags must be >= 1"),
    ([7, True], [2, 5], TypeError, "grid must hold ints, got True"),
    (torch.tensor([7.0, 3.0]), [2, 5], TypeError, "grid must hold integer tags"),
    (torch.tensor([7, 0]), [2, 5], ValueError, "grid tags must be >= 1"),
    ("77", [2, 5], TypeError, "grid must be ints"),
    (None, [True, 5], TypeError, "lengths must hold ints, got True"),
    (None, [2.0, 5], TypeError, "lengths must hold ints, got 2.0"),
], ids=["float-tags", "negative-tag", "bool-tag", "float-tensor", "zero-tag", "string", "bool-length",
        "float-length"])
def test_ragged_batch_checks_tags_and_lengths(grid, lengths, error, match):
    with pytest.raises(error, match=match):
        RaggedBatch.from_padded(torch.randn(2, 5, 4), lengths, grid=grid)


def test_ragged_batch_accepts_numpy_lengths_and_tags():
    rb = RaggedBatch.from_padded(torch.randn(2, 5, 4), np.array([2, 5]), grid=np.array([7, 14]))
    assert rb.lengths == (2, 5) and rb.grid.tolist() == [7, 14] and rb.grid.dtype == torch.int32


# ------------------------------------------------------- layer norm overflow


@pytest.mark.parametrize("pair", backend_pairs(SEGMENT_LAYER_NORM), ids=device_backend_id)
@pytest.mark.parametrize("magnitude", [1e17, 1e18, 1e19, 1e20, 1e25, 1e30])
def test_layer_norm_far_from_zero_is_right_or_nan(pair, magnitude):
    """fp32 rows whose variance overflows: each row is the float64 result or
    NaN, never finite and wrong (F.layer_norm returns 0 there)."""
    device, backend = use_device_backend(pair)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 384, generator=g) * magnitude
    weight, bias = torch.rand(2, 384, generator=g) + 0.5, torch.randn(2, 384, generator=g)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    group = torch.tensor([1, 0], dtype=torch.int32)
    with adaptok.backend(backend):
        y = segment_layer_norm(*(t.to(device) for t in (x, cu, group, weight, bias))).cpu()
    rows = [1] * 5 + [0] * 7
    expected = torch.stack([F.layer_norm(x[t].double(), (384,), weight[rows[t]].double(), bias[rows[t]].double())
                            for t in range(12)]).float()
    nan_rows = torch.isnan(y).all(1)
    assert (torch.isfinite(y).all(1) | nan_rows).all(), "a row mixes finite and non-finite values"
    torch.testing.assert_close(y[~nan_rows], expected[~nan_rows], rtol=1e-4, atol=1e-4)
    if magnitude >= 1e19:  # the squared deviations overflow fp32 there
        assert nan_rows.all()


# ------------------------------------------------------ the patched model


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, depth=2, **kwargs).eval()


GRID_CASES = [
    (7.0, TypeError, "grid must be an int, one int per image"),
    ("7", TypeError, "got str '7'"),
    ({2: 1, 4: 1}, TypeError, "got dict"),
    ([2.5, 4], ValueError, "grid must hold ints >= 1"),
    (np.array([2.0, 4.0]), ValueError, "grid must hold ints >= 1"),
    (torch.tensor([2.0, 4.0]), TypeError, "integer tensor"),
    (torch.tensor([True, True]), TypeError, "integer tensor"),
]


@pytest.mark.parametrize("grid, error, match", GRID_CASES,
                         ids=["float", "string", "dict", "float-list", "numpy-floats", "float-tensor", "bool-tensor"])
def test_grid_errors_name_the_argument(grid, error, match):
    model = adaptok.patch(tiny())
    with pytest.raises(error, match=match):
        model(torch.randn(2, 3, 64, 64), grid=grid)


KEEP_CASES = [
    ("0.5", TypeError, "keep_rate must be a float in"),
    ({0.5: 1}, TypeError, "got dict"),
    ([0.5, "a"], TypeError, "got 'a'"),
    (np.array([[0.5]]), TypeError, "shape"),
]


@pytest.mark.parametrize("keep_rate, error, match", KEEP_CASES, ids=["string", "dict", "string-in-list", "2-d"])
def test_keep_rate_errors_name_the_argument(keep_rate, error, match):
    model = adaptok.patch(tiny(), prune_layers=(0, 1))
    with pytest.raises(error, match=match):
        model.keep_rate = keep_rate


@pytest.mark.parametrize("keep_rate", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array([0.5, 0.5]),
                                       torch.tensor([0.5, 0.5])],
                         ids=["numpy-float32", "numpy-float64", "0-d-tensor", "numpy-array", "1-d-tensor"])
def test_keep_rate_accepts_real_numbers(keep_rate):
    model = adaptok.patch(tiny(), prune_layers=(0, 1))
    x = torch.randn(3, 3, 64, 64)
    model.keep_rate = 0.5
    expected = model(x)
    model.keep_rate = keep_rate
    assert model.keep_rate in (0.5, (0.5, 0.5)) and all(
        type(r) is float for r in np.atleast_1d(model.keep_rate).tolist())
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["parity", "evit", "grid-int", "grid-empty-list", "evit-grid"])
def test_empty_batch_returns_what_timm_returns(mode, dtype):
    from adaptok.nn.attention import ATTENTION

    plain = tiny().to(dtype)
    empty = torch.randn(0, 3, 64, 64).to(dtype)
    expected = plain(empty)
    model = adaptok.patch(tiny().to(dtype), keep_rate=0.5 if "evit" in mode else None, prune_layers=(1,))
    grid = {"grid-int": 2, "grid-empty-list": [], "evit-grid": 2}.get(mode)
    with torch.no_grad():  # measurable, were it not empty: nothing is timed on empty tensors
        out = model(empty, grid=grid)
    assert ATTENTION.measured().get((1, 3, 17, 64, False)) is None  # an empty call measures no batch-size-1 shape
    out = model(empty, grid=grid)
    assert out.shape == expected.shape == (0, 10) and out.dtype == expected.dtype
    features = model.forward_features(empty, grid=grid)
    side = 2 if mode in ("grid-int", "evit-grid") else 4
    tokens = 1 + side * side
    if "evit" in mode:
        tokens = 1 + math.ceil(0.5 * (tokens - 1)) + 1  # the kept tokens and the fused one
    assert features.shape == (0, tokens, 192)
    with pytest.raises(ValueError, match="one entry per image"):
        model(empty, grid=[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_grid_with_resize_on_cpu(dtype):
    """PyTorch's CPU antialiased resize has no bf16/fp16 kernel: grid= still
    works, close to the fp32 model."""
    model = adaptok.patch(tiny())
    x = torch.randn(3, 3, 64, 64)
    expected = model(x, grid=[2, 4, 3])
    low = adaptok.patch(tiny().to(dtype))
    out = low(x.to(dtype), grid=[2, 4, 3])
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)
    with torch.autocast("cpu", dtype):
        auto = model(x.to(dtype), grid=[2, 4, 3])
    torch.testing.assert_close(auto.float(), expected, rtol=0.1, atol=0.1)


def test_torchscript_is_refused_with_the_alternatives():
    model = adaptok.patch(tiny(), keep_rate=0.5, prune_layers=(1,))
    with pytest.raises(adaptok.UnsupportedModelError, match=r"torch.jit.script is not supported.*torch.compile"):
        torch.jit.script(model)
    with pytest.raises(adaptok.UnsupportedModelError, match=r"torch.jit.trace is not supported.*torch.export"):
        torch.jit.trace(model, (torch.randn(1, 3, 64, 64),))


@pytest.mark.parametrize("mode", ["parity", "evit", "grid"])
def test_torch_export_matches_eager(mode):
    """The alternative the refusal names: torch.export works (a fixed grid
    list is part of the exported program)."""
    model = adaptok.patch(tiny(), keep_rate=0.5 if mode == "evit" else None, prune_layers=(1,))
    x = torch.randn(3, 3, 64, 64)
    kwargs = {"grid": [2, 4, 3]} if mode == "grid" else {}
    program = torch.export.export(model, (x,), kwargs=kwargs)
    torch.testing.assert_close(program.module()(x, **kwargs), model(x, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["parity", "evit", "one-grid"])
def test_torch_compile_fullgraph_matches_eager(mode, dtype):
    """The other alternative the refusal names: torch.compile traces parity
    mode, a fixed keep rate and one int grid as a single graph, with timm's
    formulations (the measured choices are neither timed nor read while
    compiling)."""
    from torch._dynamo.utils import counters

    from adaptok.nn.attention import ATTENTION
    from adaptok.nn.linear import LINEAR
    from adaptok.nn.patch_embed import PATCH_EMBED

    torch._dynamo.reset()
    counters.clear()
    model = adaptok.patch(tiny().to(dtype), keep_rate=0.5 if mode == "evit" else None, prune_layers=(1,))
    x = torch.randn(3, 3, 64, 64).to(dtype)
    kwargs = {"grid": 2} if mode == "one-grid" else {}
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x, **kwargs)
        with ATTENTION.force("sdpa"), PATCH_EMBED.force("conv"), LINEAR.force("linear"):  # timm's defaults, as traced
            eager = model(x, **kwargs)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, eager)


# ------------------------------------------- no unvalidated kernel on CUDA


def fake_cuda(args, mode):
    """The same arguments as fake CUDA tensors (call inside ``mode``)."""
    if isinstance(args, torch.Tensor):
        return mode.from_tensor(args).to("cuda")
    if isinstance(args, (list, tuple)):
        return type(args)(fake_cuda(a, mode) for a in args)
    return args


def test_unvalidated_kernels_are_not_chosen_on_cuda(monkeypatch):
    """With fake CUDA tensors (no GPU needed): automatic choice takes a cuda
    or triton kernel only for the (op, backend) pairs of the validation
    file, in the preference order; forcing still reaches the others."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backends.backend_unavailable("cuda") or backends.backend_unavailable("triton"):
        pytest.skip("needs the extension built with CUDA and triton installed")
    monkeypatch.setattr(backends, "gpu_validated", lambda: frozenset())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for name, op in backends.REGISTRY.items():
        real = op.example(torch.device("cpu"), torch.float16)
        with mode:
            args = fake_cuda(real, mode)
            assert op.select(*args).backend == "torch", name
            serving = [b for b in ("cuda", "triton") if op.why_not(b, *args) is None]
            for b in serving:
                with adaptok.backend(b):
                    assert op.select(*args).backend == b
        for b in serving:
            monkeypatch.setattr(backends, "gpu_validated", lambda b=b: frozenset({(name, b)}))
            with mode:
                assert op.select(*args).backend == b, (name, b)
        monkeypatch.setattr(backends, "gpu_validated", lambda: frozenset())


def test_info_marks_unvalidated_kernels(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from adaptok import info

    if backends.backend_unavailable("cuda"):
        pytest.skip("needs the extension built with CUDA")
    monkeypatch.setattr(backends, "gpu_validated", lambda: frozenset())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for name, op in backends.REGISTRY.items():
        real = op.example(torch.device("cpu"), torch.float16)
        monkeypatch.setattr(op, "example", lambda device, dtype, real=real: fake_cuda(real, mode))
    with mode:
        table = info.backend_table(torch.device("cuda"), torch.float16)
    assert "not yet validated on a GPU" in table
    assert re.search(r"pack\s+cuda\s+\+ ok: not yet validated on a GPU", table), table
    assert re.search(r"torch\s+\* ok", table)


def test_validation_file_is_well_formed():
    with open(backends.VALIDATION_FILE) as f:
        data = json.load(f)
    assert data["about"]
    for entry in data["validated"]:
        assert entry["op"] in backends.REGISTRY and entry["backend"] in backends.GPU_KERNEL_BACKENDS
        assert entry["backend"] in backends.REGISTRY[entry["op"]].impls and entry["gpu"] and entry["commit"]


def test_validation_script_reads_junit(tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_validation.py")
    spec = importlib.util.spec_from_file_location("gpu_validation", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    xml = tmp_path / "tests.xml"
    xml.write_text("""<testsuites><testsuite>
<testcase classname="tests.test_ragged" name="test_round_trip[cuda-cuda-0-float32]"/>
<testcase classname="tests.test_ragged" name="test_round_trip[cuda-triton-0-float32]"/>
<testcase classname="tests.test_ragged" name="test_errors[cuda-triton]"><failure message="x"/></testcase>
<testcase classname="tests.test_topk_select" name="test_keep_rate[cuda-cuda-float16]"/>
<testcase classname="tests.test_topk_select" name="test_keep_rate[cuda-triton-float16]"><skipped/></testcase>
<testcase classname="tests.test_topk_select" name="test_keep_rate[cpu-cpu-float16]"/>
</testsuite></testsuites>""")
    rows = script.validated(str(xml), "a GPU", "abc")
    pairs = {(r["op"], r["backend"]) for r in rows}
    ragged_ops = set(script.op_stems()["ragged"])
    assert pairs == {(op, "cuda") for op in ragged_ops} | {("topk_select", "cuda")}
    out = tmp_path / "gpu_validated.json"
    script.main([str(xml), "--out", str(out), "--gpu", "a GPU"])
    assert {(r["op"], r["backend"]) for r in json.loads(out.read_text())["validated"]} == pairs


# --------------------------------------------------------- benchmark plot


def test_benchmark_plot_labels_do_not_overlap(tmp_path):
    from adaptok.bench.e2e import plot

    names = ["timm", "adaptok parity", "EViT 0.7 adaptok", "EViT 0.7 public code", "mix packed adaptok",
             "mix padded", "mix 2 batches"]
    points = [(4.60, 8.8), (4.60, 9.1), (3.03, 13.9), (3.03, 13.4), (2.85, 15.8), (4.58, 8.9), (2.85, 16.2)]
    rep = {"results": [{"variant": n, "family": "adaptok" if "adaptok" in n else "baseline",
                        "gmacs_per_image": x, "images_per_s": y} for n, (x, y) in zip(names, points)],
           "model": "deit_small_patch16_224", "environment": {"device": "CPU"}, "dtype": "float32", "batch": 32,
           "mix_batch": 32}
    boxes = plot(rep, str(tmp_path / "plot.png"))
    assert len(boxes) == len(names) and (tmp_path / "plot.png").stat().st_size > 0
    for i in range(len(boxes)):
        for j in range(i):
            assert not boxes[i].overlaps(boxes[j]), (names[i], names[j])


def test_paired_median_interval_brackets_the_median():
    """The 95 % interval of a paired median comes from order statistics:
    with n = 100 ratios 1, 2, ..., 100 it spans ranks 40 to 61."""
    from adaptok.bench.e2e import paired

    r = paired([float(i) for i in range(1, 101)], [1.0] * 100)
    assert r["median"] == 50.5 and r["ci95"] == [40.0, 61.0] and r["n"] == 100
    assert paired([2.0], [1.0])["ci95"] == [2.0, 2.0]


@pytest.mark.parametrize("median, ci, state", [(0.98, [0.97, 0.99], "met"), (1.01, [0.99, 1.03], "tie"),
                                               (1.03, [1.02, 1.04], "missed")], ids=["faster", "tie", "slower"])
def test_batch_size_1_targets_count_ties_within_the_interval(median, ci, state):
    from adaptok.bench.e2e import target_lines, targets

    rep = {"results": [{"variant": n, "images_per_s": 1.0, "single_ms_per_image": 1.0} for n in
                       ("timm", "EViT 0.7 adaptok", "EViT 0.7 public code", "mix packed adaptok")],
           "keep_rate": 0.7, "paired_single": {"adaptok parity/timm": {"median": median, "ci95": ci}}}
    row = targets(rep, gpu=False)[-1]
    assert (row["met"], row["tie"]) == {"met": (True, False), "tie": (False, True), "missed": (False, False)}[state]
    line = target_lines([row])[1]
    assert line.split()[0] == {"met": "met", "tie": "tie", "missed": "MISSED"}[state] and "95 % CI" in line



def test_matmul_ceiling_counts_every_matmul_path_adaptok_may_take():
    """The ceiling is the best of a @ b and, on the CPU, the prepacked
    oneDNN matmul adaptok's linear layers may take: a variant's share of it
    is not inflated by comparing oneDNN against the BLAS alone."""
    from adaptok.bench.e2e import matmul_rate
    from adaptok.nn import linear

    rate = matmul_rate(torch.device("cpu"), torch.float32, sizes=(64, 128), repeats=2)
    paths = {"matmul"} | ({"prepacked"} if torch.float32 in linear._PACKABLE else set())
    assert set(rate["by_path"]) == paths
    for n in (64, 128):
        assert rate["by_size"][n] == max(r[n] for r in rate["by_path"].values()) > 0
    assert rate["best"] == max(rate["by_size"].values())


# ------------------------------------------- attention path chosen per shape


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device, dtype, sequences, n, grad, expected", [
    ("cpu", torch.float32, 1, 197, False, "sdpa"),
    ("cpu", torch.float64, 1, 50, False, "sdpa"),
    ("cpu", torch.float16, 1, 50, False, "sdpa"),
    ("meta", torch.bfloat16, 1, 197, False, "sdpa"),  # not the CPU: SDPA, as on CUDA
    ("cpu", torch.bfloat16, 1, 197, False, None),  # not measured yet, and measurable: measure on this call
    ("cpu", torch.bfloat16, 1, 197, True, "sdpa"),  # autograd records it: not timed, timm's default
    ("cpu", torch.bfloat16, 64, 577, False, "sdpa"),  # [64, 6, 577, 577] scores: over the memory bound
], ids=["fp32", "fp64", "fp16", "not-cpu", "bf16-unmeasured", "bf16-autograd", "bf16-too-large"])
def test_attention_path_rules(device, dtype, sequences, n, grad, expected):
    from adaptok.nn import attention

    attention.ATTENTION.clear()
    x = torch.zeros(1, device=device, requires_grad=grad)
    assert attention.attention_path(x, dtype, sequences, 6, n, 64) == expected
    for forced in attention.ATTENTION.options:
        with attention.ATTENTION.force(forced):
            assert attention.attention_path(x, dtype, sequences, 6, n, 64) == forced


def test_untimed_calls_take_timms_default_whatever_was_measured():
    """Training (autograd, dropout), compiling and empty calls never read the
    measurements: their numerics and random draws do not depend on what the
    process measured before (a validation pass, another model)."""
    from adaptok.nn import attention

    attention.ATTENTION.clear()
    key = attention._key(1, 6, 197, 64, False)
    attention.ATTENTION.measure(key, lambda p: time.sleep(0.002 if p == "sdpa" else 0))
    assert attention.ATTENTION.measured()[key] == "matmul"
    plain, graded, empty = torch.zeros(1), torch.zeros(1, requires_grad=True), torch.zeros(0)
    assert attention.attention_path(plain, torch.bfloat16, 1, 6, 197, 64) == "matmul"
    assert attention.attention_path(plain, torch.bfloat16, 1, 6, 197, 64, dropout=0.1) == "sdpa"
    assert attention.attention_path(graded, torch.bfloat16, 1, 6, 197, 64) == "sdpa"
    assert attention.attention_path(empty, torch.bfloat16, 1, 6, 197, 64) == "sdpa"
    attention.ATTENTION.clear()


def test_bf16_training_draws_what_timm_draws():
    """With attention dropout in bf16 (where inference measures the
    formulation), training takes timm's SDPA and its random draws."""
    from adaptok.nn import attention

    rates = dict(attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.1)
    model = tiny(**rates).to(torch.bfloat16).train()
    patched = adaptok.patch(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64).bfloat16()
    with torch.no_grad():
        patched.eval()(x)  # measures the inference shapes first
    patched.train()
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    assert torch.equal(patched(x), expected)
    attention.ATTENTION.clear()


def test_attention_path_is_measured_once_per_shape_bucket():
    """The first measurable bf16 call of a shape times both formulations and
    keeps one; batch sizes of one power-of-2 bucket share it."""
    from adaptok.nn import attention

    attention.ATTENTION.clear()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3 * 20, 2, 16, generator=g).bfloat16() for _ in range(3))
    out, cls = attention.dense_attention(q, k, v, [(0, 3, 20)], 0.25, need_cls=True)
    (key, chosen), = attention.ATTENTION.measured().items()
    assert key == (4, 2, 20, 16, True) and chosen in attention.ATTENTION.options
    x = torch.zeros(1)
    assert attention.attention_path(x, torch.bfloat16, 4, 2, 20, 16, True) == chosen
    assert attention.attention_path(x, torch.bfloat16, 5, 2, 20, 16, True) is None  # the next bucket
    with attention.ATTENTION.force(chosen):
        again, cls_again = attention.dense_attention(q, k, v, [(0, 3, 20)], 0.25, need_cls=True)
    assert torch.equal(out, again) and torch.equal(cls, cls_again)  # the measured call returned its choice's result


@pytest.mark.parametrize("keep_rate", [None, 0.5], ids=["mixed-grid", "evit"])
def test_bf16_attention_paths_agree(keep_rate):
    """Both bf16 formulations give the fp32 model's logits within bf16
    error, and each other's."""
    from adaptok.nn.attention import ATTENTION

    x = torch.randn(3, 3, 64, 64)
    grid = [2, 4, 3] if keep_rate is None else None
    expected = adaptok.patch(tiny(), keep_rate=keep_rate, prune_layers=(1,))(x, grid=grid)
    model = adaptok.patch(tiny().to(torch.bfloat16), keep_rate=keep_rate, prune_layers=(1,))
    outs = {}
    for path in ATTENTION.options:
        with ATTENTION.force(path):
            outs[path] = model(x.bfloat16(), grid=grid).float()
        torch.testing.assert_close(outs[path], expected, rtol=0.1, atol=0.1)
    torch.testing.assert_close(outs["matmul"], outs["sdpa"], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_parity_attention_is_timms_own_formulation(dtype):
    """In parity mode each formulation is exactly timm's: the matmul path
    equals timm with ``fused_attn=False`` bit for bit, the SDPA path timm's
    default, in bf16 (where the choice is measured) and when forced in
    fp32."""
    from adaptok.nn.attention import ATTENTION

    model = tiny().to(dtype)
    unfused = copy.deepcopy(model)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    patched = adaptok.patch(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64).to(dtype)
    with torch.inference_mode():
        with ATTENTION.force("matmul"):
            assert torch.equal(patched(x), unfused(x))
        with ATTENTION.force("sdpa"):
            assert torch.equal(patched(x), model(x))
        measured = patched(x)
    assert torch.equal(measured, model(x)) or torch.equal(measured, unfused(x))


def test_matmul_path_class_attention_equals_sdpa_path():
    """The CLS rows read off the matmul path's probabilities equal the ones
    the SDPA path recomputes (fp32 statistics, bf16 inputs)."""
    from adaptok.nn import attention

    g = torch.Generator().manual_seed(0)
    lengths = (17, 17, 5)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=g).bfloat16() for _ in range(3))
    spans = attention.runs(lengths)
    with attention.ATTENTION.force("matmul"):
        out_m, cls_m = attention.dense_attention(q, k, v, spans, 0.25, 0.0, True)
    with attention.ATTENTION.force("sdpa"):
        out_s, cls_s = attention.dense_attention(q, k, v, spans, 0.25, 0.0, True)
    torch.testing.assert_close(cls_m, cls_s, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(out_m.float(), out_s.float(), rtol=2e-2, atol=2e-2)
    assert cls_m.dtype == cls_s.dtype == torch.float32
