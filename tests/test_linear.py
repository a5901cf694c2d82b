"""Linear layers on the measured path (adaptok.nn.linear): both formulations
compute nn.Linear's map (float64 references), under autocast too; the
prepacked weight follows in-place updates and replacements and never
reaches copies, pickles or state dicts; autograd, float64 and fp16 take
F.linear itself; adaptok.patch converts the plain Linear layers only."""
import copy
import io
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import adaptok
from adaptok import tuning
from adaptok.nn import linear as L
from adaptok.nn.linear import LINEAR, AdaptiveLinear, adapt_linears

needs_onednn = pytest.mark.skipif(torch.float32 not in L._PACKABLE, reason="this CPU build has no oneDNN")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def layer(n_in=48, n_out=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return adapt_linears(nn.Linear(n_in, n_out, bias=bias))


def reference(m, x):
    """nn.Linear's map in float64."""
    b = None if m.bias is None else m.bias.double()
    return F.linear(x.double(), m.weight.double(), b)


@needs_onednn
@pytest.mark.parametrize("path", LINEAR.options)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,bias,contiguous", [
    ((7, 48), True, True), ((2, 5, 48), True, True), ((2, 3, 4, 48), False, True), ((5, 2, 48), True, False),
    ((1, 48), True, True), ((0, 48), True, True)], ids=["2d", "3d", "4d-nobias", "strided", "one-row", "empty"])
def test_both_formulations_are_the_linear_map(path, dtype, shape, bias, contiguous):
    if dtype not in L._PACKABLE:
        pytest.skip("this CPU has no oneDNN bf16")
    m = layer(bias=bias).to(dtype)
    x = torch.randn(shape).to(dtype)
    if not contiguous:
        x = x.transpose(0, 1)
    with torch.no_grad(), LINEAR.force(path):
        out = m(x)
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], 40)
    torch.testing.assert_close(out.double(), reference(m, x), **TOL[dtype])


@needs_onednn
def test_measured_per_shape_and_recorded():
    LINEAR.clear()
    m = layer()
    with torch.no_grad():
        m(torch.randn(3, 48))
        m(torch.randn(2, 2, 48))  # 4 rows: the same octave as 3
        m(torch.randn(9, 48))
    keys = set(LINEAR.measured())
    assert keys == {(torch.float32, False, 4, 48, 40, True), (torch.float32, False, 16, 48, 40, True)}
    assert set(tuning.measured()["linear"].values()) <= set(LINEAR.options)


@needs_onednn
def test_autocast_computes_what_nn_linear_computes():
    if torch.bfloat16 not in L._PACKABLE:
        pytest.skip("this CPU has no oneDNN bf16")
    m, plain = layer(), nn.Linear(48, 40)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(6, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(x)
        with LINEAR.force("packed"):
            got = m(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert m._adaptok_packed.keys() == {torch.bfloat16}  # packed once in the compute dtype, the fp32 weight kept


@needs_onednn
@pytest.mark.parametrize("update", ["in-place", "load_state_dict", "replaced", "to-bf16"])
def test_the_packed_weight_follows_the_weights(update):
    m = layer()
    x = torch.randn(4, 48)
    with torch.no_grad(), LINEAR.force("packed"):
        m(x)
        if update == "in-place":
            m.weight.mul_(-2)
        elif update == "load_state_dict":
            m.load_state_dict(layer(seed=1).state_dict())
        elif update == "replaced":
            m.weight = nn.Parameter(torch.randn(40, 48))
        else:
            if torch.bfloat16 not in L._PACKABLE:
                pytest.skip("this CPU has no oneDNN bf16")
            m.to(torch.bfloat16)
            x = x.bfloat16()
        out = m(x)
    torch.testing.assert_close(out.double(), reference(m, x), **TOL[out.dtype])


@needs_onednn
def test_clear_packed_after_writes_through_data():
    m = layer()
    x = torch.randn(4, 48)
    with torch.no_grad(), LINEAR.force("packed"):
        m(x)
        m.weight.data.zero_()  # no version bump: documented, clear_packed sees it
        m.clear_packed()
        out = m(x)
    torch.testing.assert_close(out, m.bias.expand(4, -1))


@needs_onednn
def test_copies_pickles_and_state_dicts_hold_no_packed_weight():
    model = adaptok.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), LINEAR.force("packed"):
        want = model(x)
    assert "_adaptok_packed" in model.blocks[0].mlp.fc1.__dict__
    twin = copy.deepcopy(model)
    assert "_adaptok_packed" not in twin.blocks[0].mlp.fc1.__dict__
    again = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert set(model.state_dict()) == set(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1,
                                                            num_classes=5).state_dict())
    with torch.no_grad(), LINEAR.force("packed"):
        for m in (twin, again):
            torch.testing.assert_close(m(x), want)


@needs_onednn
def test_autograd_takes_f_linear_even_when_forced():
    """Training records F.linear's graph (the packed copy has no gradient):
    the same values and gradients as nn.Linear, bit for bit."""
    m, plain = layer(), nn.Linear(48, 40)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(5, 48)
    with LINEAR.force("packed"):
        out = m(x)
    want = plain(x)
    assert torch.equal(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    assert torch.equal(m.weight.grad, plain.weight.grad) and torch.equal(m.bias.grad, plain.bias.grad)
    assert "_adaptok_packed" not in m.__dict__


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_dtypes_onednn_does_not_pack_take_f_linear(dtype):
    m = layer().to(dtype)
    x = torch.randn(3, 48).to(dtype)
    with torch.no_grad(), LINEAR.force("packed"):
        out = m(x)
    assert torch.equal(out, F.linear(x, m.weight, m.bias)) and "_adaptok_packed" not in m.__dict__


def test_mismatched_dtypes_fail_as_nn_linear_does():
    m = layer()
    with torch.no_grad(), pytest.raises(RuntimeError) as err:
        nn.Linear(48, 40)(torch.randn(3, 48).bfloat16())
    with torch.no_grad(), LINEAR.force("packed"), pytest.raises(RuntimeError) as ours:
        m(torch.randn(3, 48).bfloat16())
    assert str(ours.value) == str(err.value)


def test_patch_converts_plain_linear_layers_only():
    class Custom(nn.Linear):
        pass

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    model.head = Custom(model.head.in_features, 5)
    adaptok.patch(model)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds.pop("head") is Custom
    assert set(kinds.values()) == {AdaptiveLinear} and len(kinds) == 8


@needs_onednn
def test_models_made_under_inference_mode_run():
    """Inference tensors have no version counter: the caches keyed on it
    (the packed weights, the resampled position tables) still work."""
    with torch.inference_mode():
        model = adaptok.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=5))
        x = torch.randn(2, 3, 32, 32)
        for path in LINEAR.options:
            with LINEAR.force(path):
                assert model(x).shape == model(x, grid=1).shape == (2, 5)
        m = layer()  # its weight an inference tensor too
        x = torch.randn(4, 48)
        with LINEAR.force("packed"):
            torch.testing.assert_close(m(x).double(), reference(m, x), **TOL[torch.float32])


@needs_onednn
@pytest.mark.parametrize("path", [None, *LINEAR.options], ids=["measured", *LINEAR.options])
def test_forward_mode_ad_and_torch_func_take_f_linear(path):
    """jvp, forward-mode duals and vmap over stacked weights see plain
    tensors: the packed matmul has no forward derivative or batching rule,
    so they take F.linear (tangents kept, no crash)."""
    from torch.func import functional_call, jvp, stack_module_state, vmap

    m = layer().requires_grad_(False)
    x, v = torch.randn(6, 48), torch.randn(6, 48)
    with LINEAR.force(path):
        out, tangent = jvp(m, (x,), (v,))
        torch.testing.assert_close(tangent, F.linear(v, m.weight))
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            dual = m(fwAD.make_dual(x, v))
            torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, F.linear(v, m.weight))
        models = [layer(seed=s) for s in range(3)]
        params, buffers = stack_module_state(models)
        with torch.no_grad():
            ys = vmap(lambda p, b, x: functional_call(models[0], (p, b), (x,)), in_dims=(0, 0, None))(params, buffers, x)
        for y, mm in zip(ys, models):
            torch.testing.assert_close(y.double(), reference(mm, x), **TOL[torch.float32])


@needs_onednn
def test_a_replaced_weight_never_hits_the_old_pack():
    """The pack's entry keeps an alias of its weight, so a new weight cannot
    take the old address with the same version and read a stale pack."""
    m = layer(256, 256)
    x = torch.randn(4, 256)
    with torch.no_grad(), LINEAR.force("packed"):
        for step in range(6):
            m(x)
            if step % 2:
                m.to(torch.bfloat16 if torch.bfloat16 in L._PACKABLE else torch.float64).to(torch.float32)
            else:
                m.weight = nn.Parameter(torch.randn(256, 256))
            torch.testing.assert_close(m(x).double(), reference(m, x), **TOL[torch.float32])


@needs_onednn
@pytest.mark.parametrize("n_in, n_out", [(48, 0), (0, 40)], ids=["no-outputs", "no-inputs"])
def test_empty_layers_work_as_nn_linear(n_in, n_out):
    m, plain = layer(n_in, n_out), nn.Linear(n_in, n_out)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(3, n_in)
    with torch.no_grad():
        assert torch.equal(m(x), plain(x))


@needs_onednn
def test_disabled_onednn_is_respected():
    m = layer()
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), LINEAR.force("packed"):
        out = m(torch.randn(4, 48))
    assert "_adaptok_packed" not in m.__dict__ and out.shape == (4, 40)


@needs_onednn
def test_a_layer_onednn_fails_on_settles_on_f_linear(monkeypatch):
    def fail(module, dtype):
        raise RuntimeError("could not create a primitive descriptor")

    LINEAR.clear()
    monkeypatch.setattr(L, "_packed", fail)
    m = layer(48, 24)
    x = torch.randn(5, 48)
    with torch.no_grad():
        out = m(x)
    assert torch.equal(out, F.linear(x, m.weight, m.bias))
    assert LINEAR.measured() == {(torch.float32, False, 8, 48, 24, True): "linear"}
