"""adaptok.models.cfvit: both passes against a plain float64 reference run
one image at a time, the whole model against the official-style baseline
(adaptok.bench.baselines.cfvit_official) in float64, early exit, the MACs
of what ran, the training loss and method (DDP too), and bad input."""
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import adaptok
from adaptok.bench.baselines import cfvit_official
from adaptok.models import cfvit
from adaptok.train import create_method, create_model, train

KW = dict(img_size=28, patch_size=2, in_chans=1, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def make(dtype=torch.float64, seed=0, **options):
    """A 4-block CF-ViT (14x14 fine, 7x7 coarse tokens) with every weight
    random, the reuse MLP and coarse table included, in eval mode."""
    torch.manual_seed(seed)
    model = cfvit.convert(timm.create_model("vit_tiny_patch16_224", **KW), **{"start": 1, **options})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.clear_position_cache()
    return model.to(dtype).eval()


def images(n=5, seed=1, dtype=torch.float64, size=28):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------- a plain per-image reference


def attention(attn, x):
    """``(out [N, C], class attention [N - 1])`` of timm ``Attention`` on one sequence."""
    N, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(N, 3, H, C // H).permute(1, 2, 0, 3)
    p = (q @ k.transpose(-1, -2) / math.sqrt(C // H)).softmax(-1)
    return attn.proj((p @ v).transpose(0, 1).reshape(N, C)), p[:, 0, 1:].mean(0)


def blocks(model, x, collect):
    g = torch.zeros(x.shape[0] - 1, dtype=x.dtype)
    for i, blk in enumerate(model.blocks):
        a, cls = attention(blk.attn, F.layer_norm(x, (x.shape[1],), blk.norm1.weight, blk.norm1.bias, 1e-6))
        if collect and i >= model.start:
            g = model.beta * g + (1 - model.beta) * cls
        x = x + a
        x = x + blk.mlp(F.layer_norm(x, (x.shape[1],), blk.norm2.weight, blk.norm2.bias, 1e-6))
    x = F.layer_norm(x, (x.shape[1],), model.norm.weight, model.norm.bias, 1e-6)
    return model.head(x[0]), x, g


def reference(model, image, keep):
    """``(coarse logits, fine logits)`` of one ``image [1, H, W]`` in float64,
    token by token."""
    C, ph = model.embed_dim, model.patch_embed.patch_size[0]
    H, W = image.shape[-2:]
    h, w = H // (2 * ph), W // (2 * ph)
    small = F.interpolate(image[None], size=(h * ph, w * ph), mode="bilinear", antialias=True)[0]
    weight, bias = model.patch_embed.proj.weight.reshape(C, -1), model.patch_embed.proj.bias

    def embed(img, r, c):
        return weight @ img[:, r * ph:(r + 1) * ph, c * ph:(c + 1) * ph].reshape(-1) + bias

    cpos = model.coarse_pos_embed[0]
    coarse_in = [embed(small, r, c) + cpos[1 + r * w + c] for r in range(h) for c in range(w)]
    x = torch.stack([model.cls_token[0, 0] + cpos[0], *coarse_in])
    coarse, final, g = blocks(model, x, collect=True)
    order = sorted(range(h * w), key=lambda i: (-float(g[i]), i))
    chosen = set(order[:keep])
    fpos = model.pos_embed[0]
    rows = [model.cls_token[0, 0] + fpos[0]]
    for i in range(h * w):
        if i not in chosen:
            rows.append(coarse_in[i])
            continue
        r, c = divmod(i, w)
        reuse = model.reuse(final[1 + i]) if model.reuse is not None else 0
        for dr in (0, 1):
            for dc in (0, 1):
                f = (2 * r + dr) * (2 * w) + 2 * c + dc
                rows.append(embed(image, 2 * r + dr, 2 * c + dc) + fpos[1 + f] + reuse)
    fine, _, _ = blocks(model, torch.stack(rows), collect=False)
    return coarse, fine


@pytest.mark.parametrize("options", [{}, {"feature_reuse": False}, {"alpha": 0.0}, {"alpha": 1.0},
                                     {"alpha": 0.3, "beta": 0.5, "start": 3}],
                         ids=["default", "no-reuse", "alpha0", "alpha1", "alpha0.3-beta0.5-start3"])
def test_both_passes_equal_a_per_image_float64_reference(options):
    model = make(**options)
    x = images()
    with torch.no_grad():
        coarse, fine = model(x, stages=True)
        for b in range(x.shape[0]):
            c, f = reference(model, x[b], model.keep(49))
            torch.testing.assert_close(coarse[b], c, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(fine[b], f, rtol=1e-10, atol=1e-10)


def test_equals_the_official_computation_in_float64():
    """The same weights through cfvit_official (N x N maps, argsort, index
    arithmetic, a boolean-masked sub-batch) at every eta."""
    for resize in ("antialias", "official"):
        model = make(resize=resize)
        x = images(8)
        with torch.no_grad():
            confidence = model(x, stages=True)[0].softmax(-1).amax(-1)
            for eta in (None, 0.0, float(confidence.median()), float(confidence.max()) + 1e-6, 1.0):
                torch.testing.assert_close(model(x, eta=eta), cfvit_official(model, x, eta), rtol=1e-10,
                                           atol=1e-10)


def test_early_exit_in_input_order():
    model = make()
    x = images(9)
    with torch.no_grad():
        coarse, fine = model(x, stages=True)
        eta = float(coarse.softmax(-1).amax(-1).median())
        logits, exited = model(x, eta=eta, return_exits=True)
    assert exited.dtype == torch.bool and torch.equal(exited, coarse.softmax(-1).amax(-1) >= eta)
    assert 0 < int(exited.sum()) < 9
    torch.testing.assert_close(logits, torch.where(exited[:, None], coarse, fine), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(model(x, eta=0.0), coarse) and torch.equal(model(x, eta=None), fine)
        model.configure(eta=0.0)
        assert torch.equal(model(x), coarse)  # the model's default eta


def test_any_image_size_and_an_empty_batch():
    model = make()
    with torch.no_grad():
        c, f = model(images(2, size=36), stages=True)  # 9x9 coarse, 18x18 fine: the tables resampled
        assert c.shape == f.shape == (2, 10) and bool(torch.isfinite(f).all())
        empty, exited = model(images(0), eta=0.5, return_exits=True)
    assert empty.shape == (0, 10) and exited.shape == (0,)


def test_selection_ablations_choose_as_named(monkeypatch):
    """negative picks the lowest global class attention; random ignores it."""
    model = make(alpha=0.5)
    x = images(3)
    with torch.no_grad():
        _, _, _, g = model._coarse(x, (7, 7))
    seen = {}
    original = cfvit.fine_tokens

    def spy(fine, coarse, score, keep, grid, **kw):
        seen["score"] = score
        return original(fine, coarse, score, keep, grid, **kw)

    monkeypatch.setattr(cfvit, "fine_tokens", spy)
    for selection, check in (("global", lambda s: torch.equal(s, g)), ("negative", lambda s: torch.equal(s, -g)),
                             ("random", lambda s: s.shape == g.shape and bool(((s >= 0) & (s < 1)).all()))):
        model.configure(selection=selection)
        with torch.no_grad():
            model(x, stages=True)
        assert check(seen["score"]), selection
    # Random draws anew each call, whatever the class attention.
    with torch.no_grad():
        model(x, stages=True)
        first = seen["score"]
        model(x, stages=True)
    assert not torch.equal(first, seen["score"])


def test_macs_count_what_ran():
    """Per image: patch embedding, 12 N C^2 + 2 N^2 C a block, the head; the
    fine pass adds the full-resolution embedding, the reuse MLP (8 C^2 a
    coarse patch) and blocks on 1 + Nc + 3K tokens."""
    model = make(torch.float32)
    C, P, K, D = 32, 4, 10, 4

    def blocks_macs(N):
        return D * (12 * N * C * C + 2 * N * N * C)

    coarse = 49 * P * C + blocks_macs(50) + C * K
    fine = 196 * P * C + 49 * 8 * C * C + blocks_macs(1 + 49 + 3 * 25) + C * K
    assert model.stage_macs() == (coarse, fine)
    x = images(6, dtype=torch.float32)
    with torch.no_grad():
        conf = model(x, stages=True)[0].softmax(-1).amax(-1)
    model.configure(eta=float(conf.median()))
    logits, spent = model.forward_with_macs(x)
    exited = conf >= model.eta
    assert torch.equal(spent, torch.where(exited, coarse, coarse + fine))
    model.split_all = True
    assert model.stage_macs()[1] == 196 * P * C + 49 * 8 * C * C + blocks_macs(197) + C * K


def test_eta_sweep_by_hand():
    """Three images: confidences 0.9, 0.6 and 0.5 (two classes); coarse
    right on 0 and 2, fine right on 1 and 2; a pass costs 10 and 30 MACs."""
    p = torch.tensor([0.9, 0.6, 0.5])
    coarse = torch.stack([p.log(), (1 - p).log()], 1)  # argmax class 0 (the last a tie: class 0 too)
    fine = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    s = cfvit.eta_sweep(coarse, fine, labels, [0.0, 0.55, 0.7, 1.0], (10, 30))
    # eta 0: all exit (right: 0, 2); 0.55: 0 and 1 exit (right: 0, 2 by fine); 0.7: only 0 exits (0, 1, 2);
    # 1: none (1, 2).
    torch.testing.assert_close(s["top1"], torch.tensor([200 / 3, 200 / 3, 100.0, 200 / 3], dtype=torch.float64))
    torch.testing.assert_close(s["gmacs"] * 1e9, torch.tensor([10.0, 20, 30, 40], dtype=torch.float64))
    torch.testing.assert_close(s["exited"], torch.tensor([100.0, 200 / 3, 100 / 3, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"etas must be in \[0, 1\]"):
        cfvit.eta_sweep(coarse, fine, labels, [1.5], (10, 30))


def test_eta_sweep_equals_the_live_early_exit():
    """The offline curve from both passes' outputs gives the top-1 and MACs
    the live early exit gets, at every threshold."""
    model = make(torch.float32)
    x, y = images(16, dtype=torch.float32), torch.arange(16) % 10
    with torch.no_grad():
        coarse, fine = model(x, stages=True)
    etas = torch.cat([torch.tensor([0.0, 1.0]), cfvit.confidence(coarse)]).double()
    s = cfvit.eta_sweep(coarse, fine, y, etas, model.stage_macs())
    for i, eta in enumerate(etas.tolist()):
        model.configure(eta=eta)
        logits, spent = model.forward_with_macs(x)
        assert 100.0 * float((logits.argmax(-1) == y).double().mean()) == pytest.approx(float(s["top1"][i]))
        assert float(spent.double().mean()) / 1e9 == pytest.approx(float(s["gmacs"][i]))


def test_one_exit_rule_at_the_boundary():
    """An eta a hair above or below an image's confidence, or equal to it:
    the live model and the offline sweep agree; so does the official-style
    baseline off the exact boundary (it computes the coarse logits its own
    way, equal to 1e-15, not bit for bit)."""
    model = make()
    x, y = images(6), torch.arange(6)
    with torch.no_grad():
        coarse, fine = model(x, stages=True)
    conf = float(cfvit.confidence(coarse)[2])
    for eta in (conf - 1e-9, conf, conf + 1e-9):
        with torch.no_grad():
            logits, exited = model(x, eta=eta, return_exits=True)
            official = cfvit_official(model, x, eta)
        assert bool(exited[2]) == (eta <= conf)
        sweep = cfvit.eta_sweep(coarse, fine, y, [eta], model.stage_macs())
        assert float(sweep["exited"][0]) == pytest.approx(100.0 * float(exited.double().mean()))
        if eta != conf:
            torch.testing.assert_close(official, logits, rtol=1e-10, atol=1e-10)


def test_pick_eta():
    """Confidences 0.9, 0.6, 0.5; coarse right on images 0 and 2, fine on 1 and 2 (as in the sweep test)."""
    p = torch.tensor([0.9, 0.6, 0.5])
    coarse = torch.stack([p.log(), (1 - p).log()], 1)
    fine = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    best = cfvit.pick_eta(coarse, fine, labels)
    assert best["top1"] == pytest.approx(100.0) and float(torch.tensor(0.6)) < best["eta"] <= float(torch.tensor(0.9))
    low = cfvit.pick_eta(coarse, fine, labels, 60.0)
    assert low == {"eta": 0.0, "top1": pytest.approx(200 / 3)}
    assert cfvit.pick_eta(coarse, fine, labels, 100.0)["eta"] == best["eta"]
    # Image 0 is right only in the fine pass, image 1 only in the coarse pass, but 1 is the less sure: no
    # eta lets 1 exit and keeps 0.
    assert cfvit.pick_eta(coarse[:2], fine[:2], torch.tensor([1, 0]), 100.0) is None


# ------------------------------------------------------------------- training


def test_loss_is_ce_of_fine_plus_kl_to_the_detached_fine():
    """The value, and the gradients: those of CE(fine) + KL with the fine
    side detached, not those of the same loss with the fine side attached
    (whose value is the same)."""
    model = make(torch.float32).train()
    x, y = images(4, dtype=torch.float32), torch.tensor([1, 2, 3, 4])
    params = dict(model.named_parameters())

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in params.items() if p.grad is not None}

    ours = cfvit.loss(model, x, y, torch.nn.CrossEntropyLoss())
    got = grads(ours)

    def by_hand(detach):
        coarse, fine = model(x, stages=True)
        p_fine = (fine.detach() if detach else fine).softmax(-1)
        kl = (p_fine * (p_fine.log() - coarse.log_softmax(-1))).sum(-1).mean()
        return F.cross_entropy(fine, y) + kl

    detached, attached = by_hand(True), by_hand(False)
    torch.testing.assert_close(ours, detached)
    torch.testing.assert_close(ours, attached)  # the same value either way: only the gradients tell
    want, wrong = grads(by_hand(True)), grads(by_hand(False))
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert any(not torch.allclose(want[k], wrong[k]) for k in want)
    for name in ("coarse_pos_embed", "pos_embed", "reuse.1.fc1.weight", "blocks.0.attn.qkv.weight"):
        assert float(got[name].abs().sum()) > 0, name


TRAIN = dict(model="vit_tiny_patch16_224", model_kwargs={**{k: v for k, v in KW.items() if k != "num_classes"}, "depth": 2}, limit=64, batch_size=32,
             epochs=2, warmup_epochs=0, amp=False, eval_every=1, aug={"no_aug": True}, method="cfvit",
             method_args={"start": 1, "select_from": 1, "eta": 0.5})


def test_method_trains_and_reloads_as_trained(tmp_path):
    pytest.importorskip("animal_mnist")
    result = train({**TRAIN, "out": str(tmp_path / "run")}, progress=False)
    model = create_model(checkpoint=result["checkpoint"])
    assert cfvit.is_cfvit(model) and model.start == 1 and model.reuse is not None
    assert model.adaptok_method == {"method": "cfvit", "alpha": 0.5, "beta": 0.99, "start": 1, "feature_reuse": True,
                                    "selection": "global", "resize": "antialias", "select_from": 1.0, "eta": 0.5}
    saved = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert model.eta == 0.5  # the trained method's threshold is the model's default
    from adaptok.evaluate import main as adaptok_eval

    out = tmp_path / "eta.json"
    assert adaptok_eval(["--checkpoint", result["checkpoint"], "--limit", "32", "--eta", "0", "1", "--amp",
                         "--out", str(out)]) == 0
    zero, one = json.loads(out.read_text())["points"]
    coarse, fine = model.stage_macs()
    assert (zero["eta"], zero["gmacs"] * 1e9) == (0.0, pytest.approx(coarse))  # every image exits
    assert (one["eta"], one["gmacs_min"] * 1e9) == (1.0, pytest.approx(coarse + fine))  # none can: max softmax < 1
    method = create_method("cfvit", select_from=1)
    method.step(model, 0.5)  # before select_from: every coarse patch re-split
    assert model.split_all and model.keep(49) == 49
    split_all = model.stage_macs()[1]
    method.step(model, 1.0)
    assert not model.split_all and model.keep(49) == 25 and model.stage_macs()[1] < split_all


def test_ddp_two_processes_equal_one_process(tmp_path):
    pytest.importorskip("animal_mnist")
    from test_train import torchrun

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**TRAIN, "eval_every": 0, "out": str(tmp_path / "run")}))
    one = torchrun(1, config, tmp_path / "one")
    two = torchrun(2, config, tmp_path / "two")
    assert "coarse_pos_embed" in one and "reuse.1.fc2.weight" in one
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4, msg=k)


def test_eval_eta_needs_a_cfvit(tmp_path, capsys):
    from adaptok.evaluate import main as adaptok_eval

    path = tmp_path / "plain.pth"
    torch.save(plain().state_dict(), path)
    assert adaptok_eval(["--checkpoint", str(path), "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=28",
                         "--model-arg", "patch_size=2", "--model-arg", "in_chans=1", "--model-arg", "embed_dim=32",
                         "--model-arg", "depth=4", "--model-arg", "num_heads=2", "--model-arg", "num_classes=10",
                         "--eta", "0.5"]) == 2
    assert "--eta needs a CF-ViT checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------ benchmark


def test_benchmark_tiny_run(tmp_path, capsys):
    """One tiny run of the benchmark on the repository's checkpoints (speed
    targets are the benchmark's to report, not this test's)."""
    pytest.importorskip("animal_mnist")
    from adaptok.bench import cfvit as bench

    bench.main(["--batch", "16", "--single", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "cfvit-bench.json").read_text())
    r = rep["results"]
    etas = {v["eta"] for v in r.values() if "eta" in v}
    assert len(r) == 1 + 2 * len(etas) and {0.0, 1.0} <= etas and r["P14, timm"]["top1"] is not None
    assert all(v["exited_pct"] == 100.0 for v in r.values() if v.get("eta") == 0.0)
    assert all(v["exited_pct"] == 0.0 for v in r.values() if v.get("eta") == 1.0)
    matched = [v for v in r.values() if v.get("matched")]
    assert len(matched) == 2 and all(v["eta"] == rep["matched_eta"] for v in matched)  # adaptok and official
    assert "targets:" in capsys.readouterr().out


def test_benchmark_at_another_scale_tiny_run(tmp_path):
    """The random-weights mode (the paper's scale with DeiT-S), on a tiny ViT."""
    from adaptok.bench import cfvit as bench

    bench.main(["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=4",
                "--model-arg", "depth=4", "--batch", "8", "--single", "1", "--repeats", "1", "--warmup", "0",
                "--exit", "0.5", "--device", "cpu", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "cfvit-bench.json").read_text())
    ours = [v for k, v in rep["results"].items() if k.endswith("adaptok")]
    assert len(ours) == 1 and ours[0]["exited_pct"] == 50.0 and 1.0 < ours[0]["mac_ratio"] < 4.0
    assert len(rep["targets"]) == 4


# ------------------------------------------------------------------ bad input


def plain(**kw):
    return timm.create_model("vit_tiny_patch16_224", **{**KW, **kw})


BAD_CONVERT = {
    "alpha-above-1": (dict(alpha=1.5), ValueError, r"alpha must be a number in \[0, 1\]"),
    "alpha-negative": (dict(alpha=-0.1), ValueError, r"alpha must be a number in \[0, 1\]"),
    "alpha-string": (dict(alpha="0.5"), ValueError, "alpha must be a number"),
    "beta-1": (dict(beta=1.0), ValueError, r"beta must be a number in \[0, 1\)"),
    "beta-negative": (dict(beta=-0.5), ValueError, r"beta must be a number in \[0, 1\)"),
    "eta-above-1": (dict(eta=1.2), ValueError, r"eta must be a number in \[0, 1\]"),
    "start-past-depth": (dict(start=4), ValueError, r"start must be a block index in \[0, 3\] \(depth 4\)"),
    "start-bool": (dict(start=True), ValueError, "start must be a block index"),
    "selection": (dict(selection="best"), ValueError, "selection must be one of"),
    "resize": (dict(resize="nearest"), ValueError, "resize must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_CONVERT))
def test_convert_errors_name_the_argument(case):
    kw, kind, message = BAD_CONVERT[case]
    model = plain()
    cls = type(model)
    with pytest.raises(kind, match=message):
        cfvit.convert(model, **kw)
    assert type(model) is cls  # a refused call leaves the model as it was (not patched)


BAD_MODELS = {
    "no-class-token": (dict(class_token=False, global_pool="avg"), "needs a class token"),
    "odd-grid": (dict(img_size=28, patch_size=4), r"even square patch grid.*7x7"),
    "pos-dropout": (dict(pos_drop_rate=0.1), "position or patch dropout"),
    "no-pos-embed": (dict(pos_embed="none"), "needs a position table"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_unsupported_models_are_refused(case):
    kw, message = BAD_MODELS[case]
    with pytest.raises(adaptok.UnsupportedModelError, match=message):
        cfvit.convert(plain(**kw))


def test_call_errors_name_the_argument():
    model = make(torch.float32)
    x = images(2, dtype=torch.float32)
    cases = [
        (lambda: model(x, eta=1.5), ValueError, r"eta must be a number in \[0, 1\]"),
        (lambda: model(x, eta=-0.01), ValueError, r"eta must be a number in \[0, 1\]"),
        (lambda: model(images(2, size=26, dtype=torch.float32)), ValueError,
         r"images must be a multiple of 2 x the patch size \(4x4\).*26x26"),
        (lambda: model(images(2, size=30, dtype=torch.float32)), ValueError, "images must be a multiple"),
        (lambda: model(x[0]), ValueError, r"images must have shape \[B, C, H, W\]"),
        (lambda: model(x, grid=7), adaptok.UnsupportedModelError, "grid="),
        (lambda: model.configure(alpha=2), ValueError, "alpha must be"),
        (lambda: model.set_pruning(0.7, (1,)), adaptok.UnsupportedModelError, "keep rate"),
        (lambda: cfvit.convert(model), ValueError, "a CF-ViT already"),
        (lambda: create_method("cfvit", select_from=-1), ValueError, "select_from must be an epoch"),
        (lambda: create_method("cfvit", eta=2), ValueError, "eta must be"),
        (lambda: create_method("cfvit", alpha=2), ValueError, "alpha must be"),
    ]
    for fn, kind, message in cases:
        with pytest.raises(kind, match=message):
            fn()


def test_official_baseline_refuses_what_the_official_code_cannot_run():
    model = make(torch.float32)
    with pytest.raises(ValueError, match="images must be of the model's own size"):
        cfvit_official(model, images(2, size=36, dtype=torch.float32))
    model.configure(selection="random")
    with pytest.raises(ValueError, match="selects by global class attention"):
        cfvit_official(model, images(2, dtype=torch.float32))


def test_official_baseline_runs_bf16_on_the_cpu():
    """The antialiased resize has no CPU bf16 kernel: the baseline resizes in
    fp32, as adaptok does, and matches adaptok's bf16 coarse pass in the same
    attention formulation (bf16's default tolerances; on this CPU both run
    the same ops, equal bit for bit), and both, and adaptok's measured
    formulation, stay within bf16 rounding of the fp32 model."""
    from adaptok.nn.attention import ATTENTION

    model = make(torch.bfloat16)
    x = images(3, dtype=torch.bfloat16)
    with torch.no_grad():
        with ATTENTION.force("matmul"):  # the official code's formulation (adaptok measures which one it runs)
            ours = model(x, eta=0.0)
        official = cfvit_official(model, x, 0.0)
        measured = model(x, eta=0.0)
        exact = model.float()(x.float(), eta=0.0)
    assert official.dtype == torch.bfloat16
    torch.testing.assert_close(official, ours)
    torch.testing.assert_close(measured.float(), exact, rtol=0, atol=0.1)
    # 4 blocks of bf16 rounding (eps 2^-8) on logits of magnitude ~4: a few hundredths.
    torch.testing.assert_close(official.float(), exact, rtol=0, atol=0.1)
