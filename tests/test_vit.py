"""adaptok.patch on timm Vision Transformers: parity with the unpatched model
(logits and gradients), EViT pruning against an independent float64
reference written from EViT's description, mixed-grid batches against each
image run alone at its grid, refusals and input errors."""
import copy
import math

import pytest
import torch
import timm
from timm.layers import DropPath
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

import adaptok
from adaptok.layout import resize_images
from adaptok.nn import attention as nn_attention, per_sequence

from conftest import DEVICES

# The models of the issue, with random weights.
NAMED = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_small_distilled_patch16_224",
         "deit3_small_patch16_224", "vit_small_qknorm"]
# Small configurations covering the rest of timm's options (64 px, patch 16: a 4x4 grid).
SMALL = {
    "registers-avg": dict(reg_tokens=4, global_pool="avg", class_token=True),
    "no-cls-avg": dict(class_token=False, global_pool="avg"),
    "reg-no-embed-class-ls": dict(reg_tokens=2, no_embed_class=True, init_values=1e-1, qk_norm=True),
    "max-fc-norm": dict(global_pool="max", fc_norm=True),
    "avgmax-prefix": dict(global_pool="avgmax", pool_include_prefix=True),
    "map": dict(global_pool="map"),
    "swiglu-prenorm": dict(mlp_layer=timm.layers.SwiGLU, pre_norm=True, mlp_ratio=2.0),
    "dynamic-size": dict(dynamic_img_size=True),
    "no-pos-embed": dict(pos_embed="none", reg_tokens=1),
    "registers-no-cls": dict(class_token=False, reg_tokens=3, global_pool="avg"),
    "scale-norms-no-final": dict(scale_attn_norm=True, scale_mlp_norm=True, final_norm=False, qkv_bias=False),
    "dynamic-pad": dict(dynamic_img_pad=True),
    "gated-unfused": dict(),  # attention modules replaced in create()
}


def create(name, **kwargs):
    torch.manual_seed(0)
    if name == "vit_small_qknorm":
        return timm.create_model("vit_small_patch16_224", qk_norm=True, **kwargs)
    if name in SMALL:
        model = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=10,
                                  **SMALL[name], **kwargs)
        if name == "gated-unfused":  # a sigmoid-gated attention, computed without SDPA
            for blk in model.blocks:
                blk.attn = timm.layers.Attention(64, num_heads=2, qkv_bias=True, gated=True)
                blk.attn.fused_attn = False
        return model
    return timm.create_model(name, **kwargs)


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return request.param


def pair(name, device, dtype=torch.float32, **kwargs):
    """(the timm model, a patched copy), eval mode, on ``device``."""
    model = create(name, **kwargs).to(device, dtype).eval()
    return model, adaptok.patch(copy.deepcopy(model))


def images(model, batch, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=g).to(device, dtype)


def logits(out):
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------- references


def attention64(attn, h):
    """timm Attention computed with the N x N matrix materialized: ``(out
    [B, N, C], probabilities [B, H, N, N])``."""
    B, N, _ = h.shape
    q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    out = (p @ v).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(attn.norm(out)), p


def evit_reference(model, x, rates, fuse=True):
    """EViT on the unpatched ``model``, one image at a time: in each pruning
    block, after attention and its residual, keep the prefix tokens and the
    ``ceil(rate (N - n))`` patch tokens with the highest head-mean CLS
    attention (descending, ties to the lower index), then the dropped
    tokens' sum weighted by that attention; then the MLP."""
    n = model.num_prefix_tokens
    out = []
    for image in x.split(1):
        h = model.norm_pre(model._pos_embed(model.patch_embed(image)))
        for i, blk in enumerate(model.blocks):
            a, p = attention64(blk.attn, blk.norm1(h))
            h = h + blk.ls1(a)
            if i in rates:
                N = h.shape[1]
                k = math.ceil(rates[i] * (N - n))
                if k < N - n:
                    score = p[0, :, 0].mean(0)
                    ranked = sorted(range(n, N), key=lambda j: (-score[j].item(), j))
                    kept, dropped = ranked[:k], sorted(ranked[k:])
                    rows = [h[0, :n], h[0, kept]]
                    if fuse:
                        rows.append((score[dropped, None] * h[0, dropped]).sum(0, keepdim=True))
                    h = torch.cat(rows)[None]
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        out.append(logits(model.forward_head(model.norm(h))))
    return torch.cat(out)


def at_grid(model, image, g):
    """``model`` and ``image`` [B, 3, H, W] set up to run at a g x g grid the
    timm way: the image resized to g patches a side, the model's input size
    changed (timm resamples its position table)."""
    ph, pw = model.patch_embed.patch_size
    size = (g * ph, g * pw)
    if tuple(model.patch_embed.grid_size) == (g, g):
        return model, image
    model = copy.deepcopy(model)
    model.set_input_size(img_size=size)
    return model, resize_images(image, size)


# ------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMED + list(SMALL))
def test_parity_logits_and_gradients(name, device):
    model, patched = pair(name, device)
    x = images(model, 2, device)
    expected, actual = model(x), patched(x)
    assert (actual - expected).abs().max().item() <= 1e-5
    gh, gw = patched.patch_embed.grid_size
    if gh == gw:  # a per-image grid list takes the packed path even at the model's own grid
        packed = patched(x, grid=[gh, gh])
        assert (packed - expected).abs().max().item() <= 1e-5
        actual = packed
    weight = torch.randn_like(expected)
    (expected * weight).sum().backward()
    (actual * weight).sum().backward()
    for (key, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_a_call_at_the_models_own_grid_runs_timms_code(monkeypatch):
    """No keep rate, every image at the model's grid and size: timm's own
    forward, bit for bit, with no packing (batch-size-1 latency)."""
    model, patched = pair("deit_tiny_patch16_224", "cpu")
    x = images(model, 2, "cpu")
    expected = model(x)

    def packed(*args, **kwargs):
        raise AssertionError("packed path taken")

    monkeypatch.setattr(type(patched), "_forward_tokens", packed)
    assert torch.equal(patched(x), expected) and torch.equal(patched(x, grid=14), expected)
    assert torch.equal(patched.forward_features(x), model.forward_features(x))
    with pytest.raises(AssertionError, match="packed path taken"):
        patched(x, grid=[14, 14])  # a per-image list takes the packed path
    patched.keep_rate = 0.7
    with pytest.raises(AssertionError, match="packed path taken"):
        patched(x)


def test_one_int_grid_runs_dense_as_timm_at_that_resolution(monkeypatch):
    """grid=g for every image, no keep rate: no packing, timm's modules on
    the dense tensor as timm runs a model made for g's resolution (the
    resize inside the call); the packed path computes the same."""
    from adaptok.bench.baselines import at_grid

    model, patched = pair("deit_tiny_patch16_224", "cpu", torch.float64)
    x = images(model, 3, "cpu", torch.float64)
    with torch.no_grad():
        packed = {g: patched(x, grid=[g] * 3) for g in (7, 14)}
        packed_features = patched.forward_features(x, grid=[7] * 3)
        monkeypatch.setattr(type(patched), "_forward_tokens", lambda *a, **k: pytest.fail("packed path taken"))
        for g in (7, 14):
            dense = patched(x, grid=g)
            torch.testing.assert_close(dense, at_grid(model, g)(resize_images(x, (16 * g, 16 * g))), rtol=1e-10,
                                       atol=1e-10)
            torch.testing.assert_close(dense, packed[g], rtol=1e-10, atol=1e-10)
        small = resize_images(x, (112, 112))  # the model's grid from other image sizes: resized, dense
        torch.testing.assert_close(patched(small, grid=14), model(resize_images(small, (224, 224))), rtol=1e-10,
                                   atol=1e-10)
        torch.testing.assert_close(patched.forward_features(x, grid=7), packed_features, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["sdpa", "matmul"])
def test_parity_under_autocast(device, path):
    """timm's stream is fp32 under autocast (bf16 patches + fp32 positions
    promote); the patched model must compute the same, in either of timm's
    attention formulations (the one it would run is measured per shape)."""
    from adaptok.nn.attention import ATTENTION

    model, patched = pair("deit_small_patch16_224", device)
    if path == "matmul":
        for blk in model.blocks:
            blk.attn.fused_attn = False
    x = images(model, 2, device)
    with torch.autocast(device, dtype=torch.bfloat16), ATTENTION.force(path):
        expected, actual = model(x), patched(x)
        packed = patched(x, grid=[14, 14])  # the packed path at the model's own grid
        patched.keep_rate = 0.7
        pruned = patched(x, grid=[7, 14])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-5)
    assert pruned.shape == (2, 1000) and pruned.isfinite().all()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "no-pos-embed"])
def test_parity_in_training_with_dropout(name):
    """Same seed, same random draws: every dropout and DropPath of the
    patched model consumes the generator as timm does."""
    rates = dict(pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)
    model = create(name, **rates).train()
    patched = adaptok.patch(copy.deepcopy(model))
    x = images(model, 2, "cpu")
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    actual = patched(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    g = patched.patch_embed.grid_size[0]
    torch.manual_seed(3)
    packed = patched(x, grid=[g, g])  # the packed path at the model's own grid draws alike too
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-5)
    from adaptok.bench.baselines import at_grid

    small = at_grid(model, g // 2)
    x_small = resize_images(x, tuple(small.patch_embed.img_size))
    torch.manual_seed(3)
    expected = small(x_small)
    torch.manual_seed(3)
    dense = patched(x, grid=g // 2)  # one int grid: the dense route draws as timm at that resolution
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-5)


def test_state_dict_keys_unchanged_and_loadable():
    model, patched = pair("deit_tiny_patch16_224", "cpu")
    assert list(patched.state_dict()) == list(model.state_dict())
    other = create("deit_tiny_patch16_224")
    torch.manual_seed(5)
    for p in other.parameters():
        p.data.normal_()
    patched.load_state_dict(other.state_dict())
    x = images(model, 1, "cpu")
    torch.testing.assert_close(patched(x), other.eval()(x), rtol=0, atol=1e-5)
    assert type(patched).__name__ == "AdaptiveVisionTransformer" and isinstance(patched, VisionTransformer)


def test_forward_features_and_intermediates_match_timm():
    model, patched = pair("deit3_small_patch16_224", "cpu")
    x = images(model, 2, "cpu")
    torch.testing.assert_close(patched.forward_features(x), model.forward_features(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(patched.forward_features(x, grid=[14, 14]), model.forward_features(x), rtol=0,
                               atol=1e-5)
    expected = model.forward_intermediates(x, indices=2)
    actual = patched.forward_intermediates(x, indices=2)
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-5)
    patched.keep_rate = 0.7
    with pytest.raises(adaptok.UnsupportedModelError, match="forward_intermediates"):
        patched.forward_intermediates(x, indices=2)


# --------------------------------------------------------------------- EViT


@pytest.mark.parametrize("name", NAMED + ["registers-avg", "reg-no-embed-class-ls", "map"])
def test_evit_matches_reference(name, device):
    """float64, so that rankings are exact; every backend the model calls runs."""
    model = create(name).to(device, torch.float64).eval()
    layers = (3, 6, 9) if len(model.blocks) == 12 else (1, 2, 3)
    patched = adaptok.patch(copy.deepcopy(model), keep_rate=0.7, prune_layers=layers)
    x = images(model, 2, device, torch.float64)
    expected = evit_reference(model, x, dict.fromkeys(layers, 0.7))
    torch.testing.assert_close(logits(patched(x)), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "drop"])
def test_evit_per_layer_rates(fuse):
    model = create("deit_tiny_patch16_224").double().eval()
    patched = adaptok.patch(copy.deepcopy(model), keep_rate=(0.9, 0.5, 0.25), prune_layers=(2, 5, 8),
                            fuse_inattentive=fuse)
    x = images(model, 2, "cpu", torch.float64)
    expected = evit_reference(model, x, {2: 0.9, 5: 0.5, 8: 0.25}, fuse=fuse)
    torch.testing.assert_close(patched(x), expected, rtol=1e-9, atol=1e-9)
    assert patched.keep_rate == (0.9, 0.5, 0.25) and patched.prune_layers == (2, 5, 8)


def test_evit_token_counts():
    """DeiT-S, keep 0.7: 197 -> 140 -> 100 -> 72 tokens (EViT's counts)."""
    model, patched = pair("deit_small_patch16_224", "cpu")
    patched.keep_rate = 0.7
    seen = []
    hooks = [blk.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].numel() // i[0].shape[-1])) for blk in patched.blocks]
    patched(images(model, 3, "cpu"))
    for h in hooks:
        h.remove()
    assert seen == [3 * n for n in [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3]


def test_keep_rate_one_is_parity():
    model, patched = pair("deit_tiny_patch16_224", "cpu")
    patched.keep_rate = 1.0
    x = images(model, 2, "cpu")
    torch.testing.assert_close(patched(x), model(x), rtol=0, atol=1e-5)


# --------------------------------------------------------------- mixed grid


GRIDS = [7, 14, 10, 14, 7]


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224",
                                  "deit3_small_patch16_224", "registers-avg", "max-fc-norm", "avgmax-prefix",
                                  "dynamic-size", "map", "registers-no-cls", "no-pos-embed"])
@pytest.mark.parametrize("attention", ["dense-runs", "varlen"])
def test_mixed_grid_matches_each_image_alone(name, attention, device, monkeypatch):
    model, patched = pair(name, device)
    grids = GRIDS if len(model.blocks) == 12 else [2, 4, 3, 4, 2]
    if attention == "varlen":
        monkeypatch.setattr(nn_attention, "MAX_DENSE_RUNS", 0)
    x = images(model, len(grids), device)
    actual = patched(x, grid=torch.tensor(grids))
    expected = torch.cat([logits(m(img)) for m, img in (at_grid(model, x[i:i + 1], g) for i, g in enumerate(grids))])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_distilled_patch16_224"])
@pytest.mark.parametrize("attention", ["dense-runs", "varlen"])
def test_mixed_grid_evit_matches_reference(name, attention, device, monkeypatch):
    if attention == "varlen":
        monkeypatch.setattr(nn_attention, "MAX_DENSE_RUNS", 0)
    model, patched = pair(name, device, torch.float64)
    patched.keep_rate = 0.7
    x = images(model, len(GRIDS), device, torch.float64)
    actual = logits(patched(x, grid=GRIDS))
    expected = torch.cat([evit_reference(m, img, dict.fromkeys((3, 6, 9), 0.7))
                          for m, img in (at_grid(model, x[i:i + 1], g) for i, g in enumerate(GRIDS))])
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_mixed_grid_gradients_match_each_image_alone():
    """Training step on a mixed batch: the gradient of the summed loss is the
    sum of each image's gradient at its own grid (float64, EViT on). The
    reference is a dynamic-image-size twin, in which timm resamples the
    position table inside its forward, so pos_embed's gradient compares too."""
    model = create("deit_tiny_patch16_224").double()
    patched = adaptok.patch(copy.deepcopy(model), keep_rate=0.7)
    twin = create("deit_tiny_patch16_224", dynamic_img_size=True).double()
    twin.load_state_dict(model.state_dict())
    x = images(model, 3, "cpu", torch.float64)
    grids = [7, 14, 10]
    patched(x, grid=grids).square().sum().backward()
    for i, g in enumerate(grids):
        _, img = at_grid(model, x[i:i + 1], g)
        evit_reference(twin, img, dict.fromkeys((3, 6, 9), 0.7)).square().sum().backward()
    for (key, p), q in zip(twin.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{key}: {m}")


def test_mixed_grid_forward_features_in_input_order():
    model, patched = pair("deit_tiny_patch16_224", "cpu")
    x = images(model, 3, "cpu")
    out = patched.forward_features(x, grid=[7, 14, 7])
    assert isinstance(out, adaptok.RaggedBatch)
    assert out.lengths == (50, 197, 50) and out.grid.tolist() == [7, 14, 7]
    alone = patched.forward_features(x[1:2])
    torch.testing.assert_close(out.to_list()[1], alone[0], rtol=1e-5, atol=1e-5)
    uniform = patched.forward_features(x, grid=7)
    assert uniform.shape == (3, 50, 192)
    torch.testing.assert_close(uniform[0], out.to_list()[0], rtol=1e-5, atol=1e-5)


def test_position_tables_cached_per_grid_and_refreshed():
    model, patched = pair("deit_tiny_patch16_224", "cpu")
    x = images(model, 2, "cpu")
    with torch.no_grad():
        first = patched(x, grid=[7, 10])
        assert len(patched._adaptok_tables) == 2
        patched.pos_embed.add_(0.5)  # an optimizer step or a checkpoint load
        model.pos_embed.add_(0.5)
        second = patched(x, grid=[7, 10])
    assert not torch.allclose(first, second)
    expected = torch.cat([m(img) for m, img in (at_grid(model, x[i:i + 1], g) for i, g in enumerate([7, 10]))])
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        patched.pos_embed.data.mul_(2)  # .data writes bypass the version counter...
        stale = patched(x, grid=[7, 10])
        patched.clear_position_cache()  # ...so they need an explicit clear
        fresh = patched(x, grid=[7, 10])
    torch.testing.assert_close(stale, second)
    assert not torch.allclose(fresh, second)


# ----------------------------------------------------------------- training


def test_drop_path_is_per_sequence():
    rb = adaptok.RaggedBatch.from_list([torch.ones(n, 4) for n in (5, 1, 9, 3, 7, 2)])
    torch.manual_seed(0)
    out = per_sequence(DropPath(0.5).train(), rb.values, rb)
    for seq in rb.with_values(out).to_list():
        assert seq.unique().numel() == 1 and seq[0, 0].item() in (0.0, 2.0)


def test_grad_checkpointing_same_gradients():
    model = create("deit_tiny_patch16_224")
    patched = adaptok.patch(copy.deepcopy(model), keep_rate=0.7).train()
    x = images(model, 2, "cpu")
    patched(x, grid=[7, 14]).sum().backward()
    grads = [p.grad.clone() for p in patched.parameters()]
    patched.zero_grad()
    patched.set_grad_checkpointing(True)
    patched(x, grid=[7, 14]).sum().backward()
    for g, p in zip(grads, patched.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_distilled_training_returns_both_heads_in_input_order():
    model, patched = pair("deit_small_distilled_patch16_224", "cpu")
    patched.set_distilled_training(True)
    patched.train()
    model.set_distilled_training(True)
    x = images(model, 3, "cpu")
    cls_logits, dist_logits = patched(x, grid=[7, 14, 7])
    alone = patched(x[1:2])
    torch.testing.assert_close(cls_logits[1:2], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist_logits[1:2], alone[1], rtol=1e-5, atol=1e-5)


def test_keep_rate_schedule():
    assert adaptok.keep_rate_schedule(0, 0.7, start=10, end=100) == 1.0
    assert adaptok.keep_rate_schedule(10, 0.7, start=10, end=100) == 1.0
    assert adaptok.keep_rate_schedule(55, 0.7, start=10, end=100) == pytest.approx(0.85)
    assert adaptok.keep_rate_schedule(100, 0.7, start=10, end=100) == pytest.approx(0.7)
    assert adaptok.keep_rate_schedule(500, 0.7, start=10, end=100) == pytest.approx(0.7)
    steps = [adaptok.keep_rate_schedule(s, 0.5, start=0, end=20) for s in range(21)]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="target"):
        adaptok.keep_rate_schedule(1, 0.0, start=0, end=1)
    with pytest.raises(ValueError, match="end"):
        adaptok.keep_rate_schedule(1, 0.5, start=3, end=3)


def test_gpu_forward_does_not_sync():
    if not torch.cuda.is_available():
        pytest.skip("a CUDA sync check")
    model = create("deit_tiny_patch16_224").cuda().eval()
    patched = adaptok.patch(model, keep_rate=0.7)
    x = images(patched, 4, "cuda")
    grid = [7, 14, 10, 7]
    with torch.no_grad():
        patched(x, grid=grid)  # first call: resamples and caches the position tables
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            patched(x, grid=grid)
            patched(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------ compile


@pytest.mark.parametrize("keep_rate", [None, 0.7], ids=["parity", "keep0.7"])
def test_compile_fullgraph(keep_rate):
    model = create("registers-avg")
    patched = adaptok.patch(copy.deepcopy(model).eval(), keep_rate=keep_rate, prune_layers=(1, 3))
    x = images(model, 2, "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), patched(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------- refusals, errors


class CustomEmbed(timm.layers.PatchEmbed):
    """A patch embedding adaptok does not know (its forward could differ)."""


@pytest.mark.parametrize("make, match", [
    (lambda: torch.nn.Linear(3, 3), "supports timm VisionTransformer"),
    (lambda: timm.create_model("eva02_tiny_patch14_224"), "Eva"),
    (lambda: VisionTransformer(img_size=32, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock), "ResPostBlock"),
    (lambda: VisionTransformer(img_size=32, embed_dim=32, depth=2, num_heads=2, attn_layer="diff"), "DiffAttention"),
    (lambda: VisionTransformer(img_size=32, embed_dim=32, depth=2, num_heads=2,
                               mlp_layer=timm.layers.GatedMlp), "GatedMlp"),
    (lambda: timm.create_model("vit_small_patch16_224", norm_layer=timm.layers.LayerNorm2d), "LayerNorm2d"),
    (lambda: timm.create_model("deit_tiny_patch16_224", embed_layer=CustomEmbed), "CustomEmbed"),
])
def test_unsupported_models_are_refused(make, match):
    model = make()
    with pytest.raises(adaptok.UnsupportedModelError, match=match):
        adaptok.patch(model)


def test_unsupported_uses_are_refused():
    model = adaptok.patch(create("no-cls-avg"))
    with pytest.raises(adaptok.UnsupportedModelError, match="no class token"):
        model.keep_rate = 0.5
    with pytest.raises(adaptok.UnsupportedModelError, match="no class token"):
        adaptok.patch(create("no-cls-avg"), keep_rate=0.5)
    evit = adaptok.patch(create("deit_tiny_patch16_224"), keep_rate=0.7)
    mask = torch.ones(197, 197, dtype=torch.bool)
    with pytest.raises(adaptok.UnsupportedModelError, match="attn_mask"):
        evit(images(evit, 1, "cpu"), attn_mask=mask)
    dropping = adaptok.patch(create("deit_tiny_patch16_224", patch_drop_rate=0.5)).train()
    with pytest.raises(adaptok.UnsupportedModelError, match="patch dropout"):
        dropping(images(dropping, 2, "cpu"), grid=[7, 14])
    wide = adaptok.patch(VisionTransformer(img_size=(32, 64), embed_dim=32, depth=2, num_heads=2))
    with pytest.raises(adaptok.UnsupportedModelError, match="square"):
        wide(torch.randn(1, 3, 32, 64), grid=[2])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keep_rate=0.0), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate=1.5), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate=float("nan")), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate=True), TypeError, "keep_rate must be a float"),
    (dict(keep_rate=(0.5, 0.5)), ValueError, "one rate per prune layer"),
    (dict(keep_rate=0.5, prune_layers=(3, 12)), ValueError, r"prune_layers must hold block indices in \[0, 11\]"),
    (dict(keep_rate=0.5, prune_layers=(3, 3)), ValueError, "must not repeat"),
])
def test_keep_rate_validation(kwargs, error, match):
    model = create("deit_tiny_patch16_224")
    with pytest.raises(error, match=match):
        adaptok.patch(model, **kwargs)
    assert type(model) is VisionTransformer  # a refused patch leaves the model as it was


def test_grid_accepts_integer_likes():
    import numpy as np

    model = adaptok.patch(create("deit_tiny_patch16_224")).eval()
    x = images(model, 2, "cpu")
    expected = model(x, grid=[7, 14])
    torch.testing.assert_close(model(x, grid=np.array([7, 14])), expected)
    torch.testing.assert_close(model(x, grid=torch.tensor([7, 14])), expected)
    torch.testing.assert_close(model(x[:1], grid=np.int64(7)), expected[:1])


@pytest.mark.parametrize("grid, error, match", [
    ([7, 14], ValueError, r"one entry per image \(3\)"),
    ([7, 0, 14], ValueError, "ints >= 1"),
    ([7, 14.0, 14], ValueError, "ints >= 1"),
    (torch.tensor([7.0, 14.0, 14.0]), TypeError, "integer tensor"),
    (torch.tensor([[7, 14, 14]]), TypeError, "1-D"),
])
def test_grid_validation(grid, error, match):
    model = adaptok.patch(create("deit_tiny_patch16_224")).eval()
    with pytest.raises(error, match=match):
        model(images(model, 3, "cpu"), grid=grid)


def test_a_subclass_that_makes_tokens_its_own_way_leaves_timms_code():
    from adaptok.timm_vit import AdaptiveVisionTransformer

    class OwnTokens(AdaptiveVisionTransformer):
        def _patchify(self, images, grid=None):
            return super()._patchify(images, grid)

    class SaysSo(OwnTokens):
        timm_parity = True

    assert AdaptiveVisionTransformer.timm_parity and not OwnTokens.timm_parity and SaysSo.timm_parity
