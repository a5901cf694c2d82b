"""Choices measured per shape (adaptok.tuning) and the patch embedding that
uses one (adaptok.nn.patch_embed): the measurement keeps the faster option
and returns its result, forcing and the environment override it, bad
options are named, and both patch-embedding formulations compute timm's
convolution (float64 references, gradients included)."""
import copy
import os
import subprocess
import sys
import time

import pytest
import torch
import timm
from torch import nn

import adaptok
from adaptok import tuning
from adaptok.nn.patch_embed import PATCH_EMBED, embed_patches


@pytest.fixture
def choice():
    c = tuning.Choice("test_choice", ("fast", "slow"))
    yield c
    tuning._CHOICES.pop("test_choice", None)


def test_measure_keeps_the_faster_option_and_returns_its_result(choice):
    calls = []

    def run(option):
        calls.append(option)
        if option == "slow":
            time.sleep(0.003)
        return f"result of {option}"

    # Listed first is the default; here the second option is the faster one.
    c = tuning.Choice("test_choice_2", ("slow", "fast"))
    try:
        assert c.measure(("k",), run) == "result of fast"
        assert c.get(("k",)) == "fast" and c.measured() == {("k",): "fast"}
        assert len(calls) == 2 * (1 + tuning.MEASURE_CALLS)
        assert tuning.measured()["test_choice_2"] == {("k",): "fast"}
        c.clear()
        assert c.get(("k",)) is None
    finally:
        tuning._CHOICES.pop("test_choice_2", None)


def test_force_overrides_the_measurement(choice):
    choice.measure(("k",), lambda option: time.sleep(0.002 if option == "slow" else 0))
    assert choice.get(("k",)) == "fast"
    with choice.force("slow"):
        assert choice.get(("k",)) == "slow" and choice.forced() == "slow"
        with choice.force(None):
            assert choice.get(("k",)) == "fast"
    assert choice.forced() is None


def test_unknown_options_are_named(choice):
    with pytest.raises(ValueError, match="unknown test_choice option 'medium'; choose one of fast, slow"):
        with choice.force("medium"):
            pass


def test_environment_fixes_a_choice_and_bad_values_are_named():
    code = "from adaptok.nn.attention import ATTENTION; print(ATTENTION.forced())"
    env = {**os.environ, "ADAPTOK_ATTENTION": "matmul"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "matmul", out.stderr
    env["ADAPTOK_ATTENTION"] = "flash"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "ADAPTOK_ATTENTION must be one of sdpa, matmul" in out.stderr


def test_bucket():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 4, 5, 33)] == [1, 1, 2, 4, 4, 8, 64]


@pytest.mark.parametrize("grad, compiling, expected", [(False, False, True), (True, False, False),
                                                       (False, True, False)], ids=["plain", "autograd", "compiling"])
def test_measurable(monkeypatch, grad, compiling, expected):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    x = torch.zeros(2, requires_grad=grad)
    assert tuning.measurable(x) is expected
    assert not tuning.measurable(x, random=True)
    assert not tuning.measurable(torch.zeros(2, device="meta"))


def test_measurable_parameters_that_record_gradients():
    """A call whose parameters require grad records a graph even on a plain
    input: not measurable while grad is enabled, measurable without it."""
    x, w = torch.zeros(2), torch.zeros(2, requires_grad=True)
    assert not tuning.measurable(x, params=(None, w)) and tuning.measurable(x, params=(None, w.detach()))
    with torch.no_grad():
        assert tuning.measurable(x, params=(w,))


# ------------------------------------------------------------ patch embedding


def patch_embed(patch=16, in_chans=3, dim=24, bias=True, **kwargs):
    torch.manual_seed(0)
    return timm.layers.PatchEmbed(img_size=64, patch_size=patch, in_chans=in_chans, embed_dim=dim, bias=bias,
                                  **kwargs)


@pytest.mark.parametrize("patch, in_chans, size, bias", [(16, 3, (64, 64), True), (16, 3, (32, 80), False),
                                                          (8, 1, (16, 24), True), ((4, 8), 5, (12, 16), True)],
                         ids=["square", "wide-no-bias", "one-channel", "rectangular-patch"])
@pytest.mark.parametrize("path", ["conv", "matmul"])
def test_both_formulations_are_the_convolution(patch, in_chans, size, bias, path):
    module = patch_embed(patch, in_chans, bias=bias).double()
    x = torch.randn(3, in_chans, *size, dtype=torch.float64)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    expected = torch.nn.functional.conv2d(x, module.proj.weight, module.proj.bias, stride=(ph, pw))
    expected = expected.flatten(2).transpose(1, 2)  # [B, P, C], row-major patches
    with PATCH_EMBED.force(path):
        out = embed_patches(module, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_matmul_formulation_has_the_convolutions_gradients():
    module = patch_embed().double()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64, requires_grad=True)
    grads = {}
    for path in PATCH_EMBED.options:
        module.zero_grad()
        x.grad = None
        with PATCH_EMBED.force(path):
            (embed_patches(module, x) ** 2).sum().backward()
        grads[path] = (x.grad.clone(), module.proj.weight.grad.clone(), module.proj.bias.grad.clone())
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_convolutions_that_are_no_patch_map_keep_the_convolution():
    """An overlapping projection, or images that the patches do not tile,
    run the module's convolution even when the matmul is forced."""
    module = patch_embed(patch=16).double()
    module.proj = nn.Conv2d(3, 24, kernel_size=16, stride=8).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with PATCH_EMBED.force("matmul"):
        out = embed_patches(module, x)
    torch.testing.assert_close(out, module.proj(x).flatten(2).transpose(1, 2))
    module = patch_embed(patch=16).double()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)  # 40 = 2 * 16 + 8: the convolution drops the rest
    with PATCH_EMBED.force("matmul"):
        out = embed_patches(module, x)
    assert out.shape == (1, 4, 24)
    torch.testing.assert_close(out, module.proj(x).flatten(2).transpose(1, 2))


def test_patch_embedding_is_measured_per_shape_and_not_under_autograd():
    PATCH_EMBED.clear()
    module = patch_embed()
    x = torch.randn(3, 3, 64, 64)
    with torch.enable_grad():  # the weights require grad: no measurement, the convolution
        embed_patches(module, x)
    assert PATCH_EMBED.measured() == {}
    with torch.no_grad():
        out = embed_patches(module, x)
    (key, chosen), = PATCH_EMBED.measured().items()
    assert key == (torch.float32, 4, 3, 64, 64, 24, (16, 16)) and chosen in PATCH_EMBED.options
    torch.testing.assert_close(out, module.proj(x).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_patched_models_use_it_where_timm_would_run_the_same_map(monkeypatch):
    """grid= and a keep rate embed through the measured choice, and both
    formulations give the same logits; parity mode stays timm's own code."""
    from adaptok.nn import patch_embed as pe

    used = []
    project = pe._project
    monkeypatch.setattr(pe, "_project", lambda path, proj, images: used.append(path) or project(path, proj, images))
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, depth=2).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for kwargs, call in (({}, dict(grid=[2, 4])), (dict(keep_rate=0.5, prune_layers=(1,)), {})):
        patched = adaptok.patch(copy.deepcopy(model), **kwargs)
        outs = []
        for path in PATCH_EMBED.options:
            used.clear()
            with PATCH_EMBED.force(path):
                outs.append(patched(x, **call))
            assert used and set(used) == {path}
        torch.testing.assert_close(*outs, rtol=1e-10, atol=1e-10)
    parity = adaptok.patch(copy.deepcopy(model))
    used.clear()
    with PATCH_EMBED.force("matmul"):
        assert torch.equal(parity(x), model(x))
    assert used == []


def test_projections_with_hooks_keep_the_convolution():
    """A hook on the projection (or on the patch embedding of a model with a
    keep rate) still runs: the matmul, which would skip it, is not taken."""
    module = patch_embed().double()
    seen = []
    module.proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with PATCH_EMBED.force("matmul"):
        embed_patches(module, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert seen == [(1, 24, 4, 4)]
    torch.manual_seed(0)
    model = adaptok.patch(timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, depth=2).eval(),
                          keep_rate=0.5, prune_layers=(1,))
    seen.clear()
    model.patch_embed.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with PATCH_EMBED.force("matmul"):
        model(torch.randn(2, 3, 64, 64))
    assert seen == [(2, 16, 192)]
