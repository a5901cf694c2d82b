"""ReViT: one packed pass gives Algorithm 1's gradients for every parameter;
every length equals the model run at that length alone; the per-length
parts start from the trained model's; the assigner's knob, labels, MACs and
checkpoints are right; bad input names the argument."""
import copy

import pytest
import torch
import torch.nn.functional as F
import timm
from torch import nn

import adaptok
from adaptok.cost import macs
from adaptok.models import revit
from adaptok.models.revit import TokenLengthAssigner

# A 2-block ViT at 14x14 tokens (28 px, patch 2).
VIT = dict(img_size=28, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def base(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**VIT, **kw})


def model(grids=(14, 10, 7), dtype=torch.float64, **options):
    m = revit.convert(base(), grids, **options).to(dtype)
    with torch.no_grad():  # TAL-LN rows and position tables apart from their starting copies
        for name, p in m.named_parameters():
            if "norm" in name or "pos_tables" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def images(n=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


OPTIONS = {
    "default": {},
    "own-patch-embed": dict(own_patch_embed=True),
    "shared-ln": dict(tal_ln=False),
    "no-dist-token": dict(distill_token=False),
}


# ------------------------------------------------- one pass == Algorithm 1


@pytest.mark.parametrize("distillation, lam", [("soft", 0.5), ("hard", 0.3), ("soft", 0.0)],
                         ids=["soft", "hard", "no-distillation"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_one_pass_gradients_equal_algorithm1(options, distillation, lam):
    one = model(**options)
    one.distilled_training = True
    one.train()
    literal = copy.deepcopy(one)
    x, y = images()
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    loss = revit.loss(one, x, y, criterion, lam, 2.0, distillation)
    loss.backward()
    total = revit.algorithm1_backward(literal, x, y, criterion, lam, 2.0, distillation)
    assert float(loss.detach()) == pytest.approx(total, rel=1e-12)
    names = [n for n, _ in one.named_parameters()]
    for part in ("pos_tables.10", "pos_tables.7", "blocks.0.norm1.weight", "norm.bias", "cls_token", "pos_embed"):
        assert part in names or (part.startswith(("blocks.0.norm1", "norm.")) and not options.get("tal_ln", True))
    if options.get("distill_token", True):
        assert "dist_token" in names and "head_dist.weight" in names
    if options.get("own_patch_embed"):
        assert "patch_embeds.7.proj.weight" in names
    for (name, p), q in zip(one.named_parameters(), literal.parameters()):
        if name.startswith("head_dist"):
            if lam == 0:  # nothing trains the distillation head (the method refuses this pairing)
                assert p.grad is None and q.grad is None, name
                continue
            assert float(p.grad.abs().max()) > 0, name
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_one_pass_in_fp32_matches_algorithm1():
    one = model(dtype=torch.float32)
    one.distilled_training = True
    literal = copy.deepcopy(one)
    x, y = images(8, torch.float32)
    revit.loss(one, x, y, nn.CrossEntropyLoss()).backward()
    revit.algorithm1_backward(literal, x, y, nn.CrossEntropyLoss())
    for (name, p), q in zip(one.named_parameters(), literal.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_student_loss_against_its_formula():
    torch.manual_seed(1)
    t, s, d = torch.randn(3, 4, 5, dtype=torch.float64).unbind()
    y = torch.tensor([0, 3, 4, 1])
    ce = nn.CrossEntropyLoss()
    lam, tau = 0.3, 2.0
    out = revit.losses({14: t, 7: (s, d)}, y, ce, lam, tau, "soft")
    p_t = (t / tau).softmax(-1)
    kl = (p_t * (p_t.log() - (d / tau).log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(out[7], (1 - lam) * ce(s, y) + lam * tau ** 2 * kl)
    torch.testing.assert_close(out[14], ce(t, y))
    hard = revit.losses({14: t, 7: (s, d)}, y, ce, lam, tau, "hard")
    torch.testing.assert_close(hard[7], (1 - lam) * ce(s, y) + lam * F.cross_entropy(d, t.argmax(-1)))


# ------------------------------------------------------- lengths and order


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_every_length_and_mixed_grids_equal_separate_runs(options):
    m = model(**options).eval()
    x, _ = images(6)
    with torch.no_grad():
        every = m(x, grid="all")
        assert list(every) == [14, 10, 7]
        for g in (14, 10, 7):
            torch.testing.assert_close(every[g], m(x, grid=g), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(m(x[:1], grid=g), every[g][:1], rtol=1e-10, atol=1e-10)  # batch of one
        grid = [7, 14, 10, 7, 10, 14]
        mixed = m(x, grid=grid)
        torch.testing.assert_close(mixed, torch.stack([every[g][i] for i, g in enumerate(grid)]), rtol=1e-10,
                                   atol=1e-10)
        torch.testing.assert_close(m(x), every[14])  # the model's own grid is the teacher's
        assert m(x[:0], grid=7).shape == (0, 5)


def test_starts_from_the_trained_model():
    """At the teacher's grid a fresh ReViT is the timm model; without a
    distillation token every length is the patched model at that grid."""
    timm_model = base().double().eval()
    x, _ = images(4)
    fresh = revit.convert(copy.deepcopy(timm_model)).eval()
    plain = revit.convert(copy.deepcopy(timm_model), distill_token=False, own_patch_embed=True).eval()
    patched = adaptok.patch(copy.deepcopy(timm_model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, grid=14), timm_model(x), rtol=1e-10, atol=1e-10)
        for g in (10, 7):
            torch.testing.assert_close(plain(x, grid=g), patched(x, grid=g), rtol=1e-10, atol=1e-10)
    assert isinstance(fresh.blocks[1].norm2, adaptok.nn.TokenLengthLayerNorm)
    assert fresh.blocks[1].norm2.weight.shape == (3, 32)
    torch.testing.assert_close(fresh.head_dist.weight, fresh.head.weight)


def test_distilled_training_returns_both_heads():
    """Training with distilled_training: a student gives (head, head_dist);
    otherwise their mean (DeiT's rule). The tiny model has no dropout."""
    m = model()
    m.distilled_training = True
    x, _ = images(3)
    with torch.no_grad():
        pair = m.train()(x, grid="all")
        mean = m.eval()(x, grid="all")
    assert torch.is_tensor(pair[14]) and isinstance(pair[7], tuple) and len(pair[7]) == 2
    torch.testing.assert_close(mean[7], (pair[7][0] + pair[7][1]) / 2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean[14], pair[14], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(pair[7][0], pair[7][1])  # two heads on two tokens


# --------------------------------------------------------------------- MACs


def test_macs_count_the_distillation_token_and_head():
    """Per block, one more token costs its linear layers and widens
    attention; the distillation head runs on the shorter lengths only."""
    with_dist, without = model(), model(distill_token=False)
    C, K = 32, 5
    per_token = sum(m.weight.numel() for m in with_dist.blocks[0].modules() if isinstance(m, nn.Linear))
    for g in (10, 7):
        n = 1 + g * g
        extra = 2 * (per_token + 2 * ((n + 1) ** 2 - n ** 2) * C) + C * K
        assert macs(with_dist, g) - macs(without, g) == extra
    assert macs(with_dist, 14) == macs(without, 14) == macs(adaptok.patch(base()), 14)


# ----------------------------------------------------------------- assigner


def assigner(grids=(7, 10, 14)):
    torch.manual_seed(0)
    return TokenLengthAssigner(timm.create_model("tinynet_e", num_classes=len(grids), in_chans=1), grids, 28)


def test_assigner_threshold_picks_the_shortest_sufficient_grid():
    a = assigner()
    assert a.grids == (7, 10, 14)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    assert a.choose(probs, 0.0).tolist() == [0, 0, 0]
    assert a.choose(probs, 0.5).tolist() == [0, 2, 1]
    assert a.choose(probs, 0.95).tolist() == [2, 2, 2]
    assert a.choose(probs, 1.0).tolist() == [2, 2, 2]
    # Raising the threshold never shortens a length.
    p = torch.rand(64, 3).softmax(-1)
    picks = torch.stack([a.choose(p, t) for t in torch.linspace(0, 1, 11).tolist()])
    assert bool((picks[1:] >= picks[:-1]).all())


def test_grid_auto_runs_the_assigned_grids_and_counts_the_assigner():
    m = model().eval()
    a = assigner().double()
    m.set_assigner(a)
    x, _ = images(6)
    with torch.no_grad():
        for t in (0.0, 0.4, 1.0):
            a.threshold = t
            sides = m.assign(x)
            torch.testing.assert_close(m(x, grid="auto"), m(x, grid=sides))
            logits, spent = m.forward_with_macs(x, grid="auto")
            want = torch.tensor([macs(m, g) for g in sides.tolist()]) + a.macs()
            assert spent.tolist() == want.tolist()
            torch.testing.assert_close(logits, m(x, grid=sides))
        fixed, none = m.forward_with_macs(x, grid=7)
        assert none is None  # the cost follows from the grid: evaluate counts it outside its timer
        torch.testing.assert_close(fixed, m(x, grid=7))
        a.threshold = 0.0
        assert m.assign(x).tolist() == [7] * 6
    assert "assigner" in dict(m.named_children())


def test_assigner_macs_by_hand():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    a = TokenLengthAssigner(net, (14, 10, 7), img_size=28)
    assert a.macs() == 14 * 14 * 4 * 9 + 4 * 3  # the convolution (bias adds are not MACs) and the linear layer
    assert a(torch.randn(2, 1, 56, 56)).shape == (2, 3)  # other sizes are resized to img_size


@torch.no_grad()
def test_token_length_labels_against_a_loop_over_images():
    m = model().eval()
    x, y = images(12)
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    labels = revit.token_length_labels(m, loader)
    want = []
    for i in range(12):
        sides = [g for g in (7, 10, 14) if int(m(x[i:i + 1], grid=g).argmax()) == int(y[i])]
        want.append(sides[0] if sides else 14)
    assert labels.tolist() == want


# -------------------------------------------------------------- checkpoints


def test_lab_checkpoint_round_trip(tmp_path):
    pytest.importorskip("animal_mnist")
    from adaptok.train import create_model, train

    cfg = dict(model="vit_tiny_patch16_224", model_kwargs={k: v for k, v in VIT.items() if k != "num_classes"},
               limit=32, batch_size=16, epochs=1, warmup_epochs=0, amp=False, eval_every=0, aug={"no_aug": True},
               method="revit", method_args={"grids": [14, 7], "own_patch_embed": True}, out=str(tmp_path / "run"))
    result = train(cfg, progress=False)
    loaded = create_model(checkpoint=result["checkpoint"])
    assert revit.is_revit(loaded) and loaded.revit_grids == (14, 7) and "patch_embeds.7.proj.weight" in \
        loaded.state_dict()
    saved = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    again = revit.create("vit_tiny_patch16_224", (14, 7), own_patch_embed=True, checkpoint=result["checkpoint"],
                         num_classes=10, **{k: v for k, v in VIT.items() if k != "num_classes"})
    x, _ = images(3, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x, grid=7), loaded.eval()(x, grid=7))
    from adaptok.evaluate import main as eval_main

    assert eval_main(["--checkpoint", result["checkpoint"], "--grid", "7", "--limit", "16",
                      "--out", str(tmp_path / "g7.json")]) == 0
    assert eval_main(["--checkpoint", result["checkpoint"], "--assigner", result["checkpoint"]]) == 2  # not one
    with pytest.raises(ValueError, match=r"holds a ReViT with \{'grids': \[14, 7\]"):
        revit.create("vit_tiny_patch16_224", (14, 10, 7), checkpoint=result["checkpoint"], num_classes=10,
                     **{k: v for k, v in VIT.items() if k != "num_classes"})
    with pytest.raises(ValueError, match="does not match the model"):
        revit.create("vit_tiny_patch16_224", (14, 7), own_patch_embed=True, checkpoint=result["checkpoint"],
                     num_classes=10, **{**{k: v for k, v in VIT.items() if k != "num_classes"}, "embed_dim": 64})


def test_never_runs_timms_own_forward(monkeypatch):
    """A ReViT at its teacher grid is not timm's model (tables, norms, heads
    per length): it must stay on the packed path."""
    m = model(dtype=torch.float32, tal_ln=False).eval()  # no layout-aware norm: only timm_parity keeps it off
    x, _ = images(2, torch.float32)

    def timm_forward(*args, **kwargs):
        raise AssertionError("timm's forward taken")

    monkeypatch.setattr(timm.models.vision_transformer.VisionTransformer, "forward", timm_forward)
    monkeypatch.setattr(timm.models.vision_transformer.VisionTransformer, "forward_features", timm_forward)
    with torch.no_grad():
        assert m(x).shape == m(x, grid=14).shape == (2, 5)
        assert m.forward_features(x).shape[0] == 2


def test_compile_fullgraph_at_one_grid():
    m = model(dtype=torch.float32).eval()
    x, _ = images(3, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, grid=7), m(x, grid=7), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input


def _other_assigner(m):
    m.set_assigner(assigner((7, 14)))


CASES = {
    "grid-not-in-grids": (lambda m, x: m(x, grid=9), ValueError, r"grid must be one of this ReViT's grids"),
    "one-grid-not-in-grids": (lambda m, x: m(x, grid=[7, 8, 7]), ValueError, r"grids \(14, 10, 7\), got \[8\]"),
    "grid-string": (lambda m, x: m(x, grid="fast"), ValueError, "grid must be an int, one int per image, 'auto'"),
    "auto-without-assigner": (lambda m, x: m(x, grid="auto"), ValueError, "grid='auto' needs an assigner"),
    "assigner-for-other-grids": (lambda m, x: _other_assigner(m), ValueError, "assigner was trained for grids"),
    "assigner-not-an-assigner": (lambda m, x: m.set_assigner(nn.Linear(2, 3)), TypeError, "assigner must be"),
    "threshold": (lambda m, x: setattr(assigner(), "threshold", 1.5), ValueError, r"threshold must be a number in"),
    "lam": (lambda m, x: revit.loss(m, x, torch.zeros(3, dtype=torch.long), nn.CrossEntropyLoss(), lam=1.5),
            ValueError, r"lam must be a number in \[0, 1\]"),
    "tau": (lambda m, x: revit.loss(m, x, torch.zeros(3, dtype=torch.long), nn.CrossEntropyLoss(), tau=0),
            ValueError, "tau must be a finite number > 0"),
    "distillation": (lambda m, x: revit.loss(m, x, torch.zeros(3, dtype=torch.long), nn.CrossEntropyLoss(),
                                             distillation="kl"), ValueError, "distillation must be one of"),
    "grids-repeat": (lambda m, x: revit.convert(base(), (14, 7, 7)), ValueError, "grids must be distinct"),
    "grids-zero": (lambda m, x: revit.convert(base(), (14, 0)), ValueError, "grid must hold ints >= 1"),
    "grids-int": (lambda m, x: revit.convert(base(), 14), TypeError, "grids must be a non-empty sequence"),
    "grids-without-own": (lambda m, x: revit.convert(base(), (10, 7)), ValueError,
                          "grids must include the model's own grid 14"),
    "twice": (lambda m, x: revit.convert(m), ValueError, "a ReViT already"),
    "distilled-base": (lambda m, x: revit.convert(timm.create_model("deit_tiny_distilled_patch16_224", **VIT)),
                       adaptok.UnsupportedModelError, "its own distillation token"),
    "keep-rate": (lambda m, x: revit.convert(adaptok.patch(base(), keep_rate=0.7, prune_layers=(1,))),
                  adaptok.UnsupportedModelError, "keep rate"),
    "set-keep-rate": (lambda m, x: setattr(m, "keep_rate", 0.7), adaptok.UnsupportedModelError, "keep rate"),
    "rms-norm": (lambda m, x: revit.convert(base(norm_layer=timm.layers.RmsNorm)), adaptok.UnsupportedModelError,
                 "TAL-LN replaces LayerNorms"),
    "method-lam": (lambda m, x: adaptok.train.create_method("revit", lam=-0.1), ValueError, "lam must be"),
    "method-lam0-with-token": (lambda m, x: adaptok.train.create_method("revit", lam=0), ValueError,
                               "lam=0 .* distill_token=False"),
    "method-grid": (lambda m, x: adaptok.train.create_method("revit", grid=9), ValueError,
                    "grid must be one of grids"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_names_the_argument(case):
    fn, error, match = case
    m = model(dtype=torch.float32).eval()
    x, _ = images(3, torch.float32)
    with pytest.raises(error, match=match):
        fn(m, x)


# ---------------------------------------------------------------- benchmark


def test_benchmark_spread_and_a_tiny_run(tmp_path, capsys):
    """The benchmark's grid mix and one tiny run of all of it (speed targets
    are the benchmark's to report, not this test's)."""
    import json

    from adaptok.bench import revit as bench

    grid = bench.spread({14: 0.2, 10: 0.3, 7: 0.5}, 10)
    assert sorted(grid).count(7) == 5 and grid.count(10) == 3 and grid.count(14) == 2 and grid[:3] == [7, 10, 14]
    with pytest.raises(Exception, match="sum to 1"):
        bench.parse_mix("14:0.5,7:0.6")
    args = ["--model", "vit_tiny_patch16_224", "--batch", "4", "--train-batch", "4", "--repeats", "1",
            "--warmup", "0", "--out", str(tmp_path), "--device", "cpu"]
    args += [f"--model-arg={k}={v}" for k, v in VIT.items()]
    bench.main(args)
    rep = json.loads((tmp_path / "revit-bench.json").read_text())
    assert set(rep["training"]["results"]) == {"one packed pass", "Algorithm 1 (a pass per length)"}
    assert rep["inference"]["results"]["timm 14x14"]["gmacs_per_image"] == pytest.approx(macs(base()) / 1e9)
    assert len(rep["inference"]["targets"]) == 4 and "targets:" in capsys.readouterr().out
