"""adaptok.routing (metrics, sweep, oracle, cascade thresholds, router,
labels) and adaptok.models.routed (RoutedModel, Cascade): against hand
computations on small cases, and the routed logits against each model run
alone on its own images."""
import itertools
import math

import numpy as np
import pytest
import torch
import timm
from torch import nn

import adaptok
from adaptok import routing
from adaptok.cost import macs
from adaptok.models.routed import Cascade, RoutedModel
from adaptok.routing import Router

VIT = dict(img_size=28, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def vit(seed, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**VIT, **kw}).double().eval()


def router(grids=(7, 14), seed=9, threshold=0.5):
    torch.manual_seed(seed)
    net = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, embed_dim=16, depth=1,
                            num_heads=1, num_classes=len(grids)).double().eval()
    return Router(net, grids, 28, threshold)


def images(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------- metrics


def test_confidence_against_a_loop_over_images():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [-3.0, 4.0, 1.0], [1.0, 1.0, 5.0]])
    labels = torch.tensor([0, 2, 0, 2])
    got = routing.confidence(logits, labels)
    for i in range(4):
        z = logits[i].numpy().astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        y = np.zeros(3)
        y[labels[i]] = 1.0
        assert got["euclidean"][i].item() == pytest.approx(math.sqrt(((p - y) ** 2).sum()), abs=1e-12)
        assert got["manhattan"][i].item() == pytest.approx(np.abs(p - y).sum(), abs=1e-12)
        assert got["cosine"][i].item() == pytest.approx(p @ y / (np.linalg.norm(p) * np.linalg.norm(y)), abs=1e-12)
    assert set(got) == set(routing.METRICS)


def test_sweep_by_hand():
    # 4 images: cheap right on 0, 1; costly right on 1, 2, 3
    score = torch.tensor([0.1, 0.5, 0.3, 0.9], dtype=torch.float64)
    correct = torch.tensor([[True, False], [True, True], [False, True], [False, True]])
    cost = torch.tensor([1e9, 3e9])
    pts = routing.sweep(score, correct, cost, torch.tensor([0.0, 0.2, 0.4, 0.6, 1.0]), "low")
    # t = 0: nobody to the cheap model -> costly: 3/4 right, 3 GMACs
    # t = 0.2: image 0 cheap (right) + costly on 1, 2, 3 (right) -> 4/4, (1 + 9) / 4
    # t = 0.4: images 0, 2 cheap (0 right, 2 wrong) + 1, 3 costly -> 3/4, (2 + 6) / 4
    # t = 0.6: 0, 1, 2 cheap (2 right) + 3 costly -> 3/4, (3 + 3) / 4
    # t = 1.0: all cheap -> 2/4, 1
    assert [p["top1"] for p in pts] == [75.0, 100.0, 75.0, 75.0, 50.0]
    assert [p["gmacs"] for p in pts] == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0])
    assert [p["cheap_share"] for p in pts] == [0.0, 25.0, 50.0, 75.0, 100.0]
    high = routing.sweep(-score, correct, cost, torch.tensor([-0.2]), "high")  # the mirror image of t = 0.2
    assert high[0]["top1"] == 100.0 and high[0]["gmacs"] == pytest.approx(2.5)


@pytest.mark.parametrize("hi, step", [(2.1, 0.05), (0.9, 0.01), (1.0, 0.1), (0.7, 0.07)])
def test_thresholds_across_end_at_the_maximum(hi, step):
    t = routing.thresholds_across(torch.tensor([0.0, hi], dtype=torch.float64), step)
    assert float(t[-1]) >= hi and float(t[0]) < 0.0


def test_thresholds_across_span_the_score():
    score = torch.tensor([0.137, 0.52, 0.9], dtype=torch.float64)
    t = routing.thresholds_across(score, 0.01)
    correct = torch.ones(3, 2, dtype=torch.bool)
    pts = routing.sweep(score, correct, torch.tensor([1.0, 2.0]), t)
    assert pts[0]["cheap_share"] == 0.0 and pts[-1]["cheap_share"] == 100.0
    assert torch.allclose(t[1:] - t[:-1], torch.full((len(t) - 1,), 0.01, dtype=torch.float64))


def test_cheapest_correct_and_oracle_by_hand():
    correct = torch.tensor([[True, True], [False, True], [False, False], [True, False]])
    assert routing.cheapest_correct(correct).tolist() == [0, 1, 1, 0]
    labels = torch.tensor([0, 1, 2, 0])
    cheap = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]])  # predicts 0 everywhere
    costly = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 5.0, 0]])  # predicts 0, 1, 1, 1
    o = routing.oracle([cheap, costly], labels, torch.tensor([1e9, 4e9]))
    assert o["choice"].tolist() == [0, 1, 1, 0]
    assert o["top1"] == 75.0  # images 0, 1 and 3 right; image 2 is wrong everywhere
    assert o["gmacs"] == pytest.approx((1 + 4 + 4 + 1) / 4)
    assert o["shares"] == [50.0, 50.0]


# ----------------------------------------------------------------- cascade


def _cascade_by_loop(conf, correct, stage_macs, t):
    right, spent, exits = [], [], []
    for n in range(conf.shape[0]):
        total = 0.0
        for s in range(conf.shape[1]):
            total += float(stage_macs[s])
            if s == conf.shape[1] - 1 or conf[n, s] >= t[s]:
                break
        right.append(bool(correct[n, s]))
        spent.append(total)
        exits.append(s)
    return right, spent, exits


def test_cascade_outcome_against_a_loop():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(50, 3, generator=g, dtype=torch.float64)
    correct = torch.rand(50, 3, generator=g) > 0.4
    stage_macs = torch.tensor([1e9, 2e9, 4e9], dtype=torch.float64)
    settings = torch.tensor([[0.5, 0.5], [0.0, 0.3], [routing.NEVER, 0.9], [0.8, routing.NEVER]], dtype=torch.float64)
    right, spent, exits = routing.cascade_outcome(conf, correct, stage_macs, settings)
    for c in range(len(settings)):
        r, m, e = _cascade_by_loop(conf, correct, stage_macs, settings[c])
        assert right[c].tolist() == r and spent[c].tolist() == m and exits[c].tolist() == e
    assert routing.stage_fractions(exits[1], 3) == [100.0, 0.0, 0.0]  # threshold 0: everyone leaves at stage 1
    assert routing.stage_fractions(exits[2], 3)[:2] == [100.0, 100.0]


def test_cascade_thresholds_are_the_best_setting_within_the_budget():
    g = torch.Generator().manual_seed(2)
    conf = torch.rand(40, 3, generator=g, dtype=torch.float64)
    correct = torch.stack([conf[:, 0] > 0.6, conf[:, 1] > 0.3, torch.rand(40, generator=g) > 0.2], 1)
    stage_macs = torch.tensor([1e9, 2e9, 4e9], dtype=torch.float64)
    budget = 3.0
    pick = routing.cascade_thresholds(conf, correct, stage_macs, budget, candidates=11)
    assert pick["met"] and pick["gmacs"] <= budget
    # every combination of the same candidate values, scored one by one
    q = torch.linspace(0, 1, 11, dtype=torch.float64)
    values = [sorted(set(torch.quantile(conf[:, k], q).tolist()) | {0.0, routing.NEVER}) for k in range(2)]
    best = None
    for t in itertools.product(*values):
        r, m, _ = _cascade_by_loop(conf, correct, stage_macs, t)
        acc, cost = 100.0 * sum(r) / len(r), sum(m) / len(m) / 1e9
        if cost <= budget and (best is None or (acc, -cost) > (best[0], -best[1])):
            best = (acc, cost)
    assert (pick["top1"], pick["gmacs"]) == pytest.approx(best)
    r, m, _ = _cascade_by_loop(conf, correct, stage_macs, pick["thresholds"])
    assert 100.0 * sum(r) / len(r) == pytest.approx(pick["top1"])
    none = routing.cascade_thresholds(conf, correct, stage_macs, 0.5)  # below stage 1's own cost
    assert not none["met"] and none["thresholds"] == [0.0, 0.0]
    # the other goal: the cheapest setting that reaches an accuracy, against the same brute force
    scored = []
    for t in itertools.product(*values):
        r, m, _ = _cascade_by_loop(conf, correct, stage_macs, t)
        scored.append((100.0 * sum(r) / len(r), sum(m) / len(m) / 1e9))
    target = sorted(a for a, _ in scored)[len(scored) // 2]
    cheapest = min((c, -a) for a, c in scored if a >= target)
    got = routing.cascade_thresholds(conf, correct, stage_macs, min_top1=target, candidates=11)
    assert got["met"] and (got["gmacs"], -got["top1"]) == pytest.approx(cheapest)
    best = max(a for a, _ in scored)
    assert not routing.cascade_thresholds(conf, correct, stage_macs, min_top1=best + 1, candidates=11)["met"]


# ----------------------------------------------------------- routed model


@pytest.mark.parametrize("route", ["mixed", "all-7", "all-14", "batch-1"])
def test_routed_logits_equal_each_model_alone_on_its_images(route):
    p7, p14 = vit(1), vit(2, depth=3)  # two different ViTs, unpatched: RoutedModel patches them
    model = RoutedModel({14: p14, 7: p7}, router())
    x = images(1 if route == "batch-1" else 7)
    sides = {"mixed": torch.tensor([7, 14, 14, 7, 7, 14, 7]), "all-7": torch.full((7,), 7),
             "all-14": torch.full((7,), 14), "batch-1": torch.tensor([14])}[route]
    with torch.no_grad():
        got = model(x, route=sides)
        for g, m in ((7, p7), (14, p14)):
            idx = (sides == g).nonzero().squeeze(1)
            if idx.numel():
                assert torch.equal(got[idx], m(x[idx], grid=g))
        logits, spent = model.forward_with_macs(x, sides)
    assert torch.equal(logits, got)
    assert spent.tolist() == [macs(p7, 7) if s == 7 else macs(p14, 14) for s in sides.tolist()]


def test_routed_model_asks_its_router_and_counts_it():
    r = router(threshold=0.5)
    p7, p14 = vit(1), vit(2)
    model = RoutedModel({7: p7, 14: p14}, r)
    x = images(9)
    with torch.no_grad():
        probs = r(x).softmax(-1)
        sides = torch.where(probs[:, 0] >= 0.5 - 1e-6, 7, 14)  # P(7 suffices) reaches the threshold
        logits, spent = model.forward_with_macs(x)
        assert torch.equal(model.route(x), sides)
        assert torch.equal(logits, model(x, route=sides))
    assert spent.tolist() == [(macs(p7, 7) if s == 7 else macs(p14, 14)) + r.macs() for s in sides.tolist()]
    # by hand: 49 patches of 4x4x1 into 16 channels; one block on 50 tokens (qkv and proj 4 * 16^2, attention
    # 2 * 50^2 * 16, MLP 2 * 16 * 64); the head 16 * 2
    assert r.macs() == 49 * 256 + 50 * 4 * 16 * 16 + 2 * 50 * 50 * 16 + 50 * 2 * 16 * 64 + 16 * 2
    r.threshold = 0.0
    assert model.route(x).tolist() == [7] * 9
    r.threshold = 1.0  # only a router certain that 7x7 suffices picks it: none of these random ones is
    assert model.route(x).tolist() == [14] * 9
    with torch.no_grad():
        assert model(x[:0]).shape == (0, 5)


def test_three_models_at_three_grids_and_evaluate():
    from adaptok.evaluate import evaluate

    ms = {7: vit(1), 10: vit(3), 14: vit(2)}
    model = RoutedModel(ms, router((7, 10, 14)))
    x = images(8)
    y = torch.arange(8) % 5
    point = evaluate(model, [(x, y)], amp=False)
    with torch.no_grad():
        sides = model.route(x)
        want = model(x, route=sides)
    assert point["top1"] == pytest.approx(100.0 * float((want.argmax(-1) == y).double().mean()))
    per = {g: macs(ms[g], g) for g in ms}
    assert point["gmacs"] == pytest.approx(sum(per[g] + model.router.macs() for g in sides.tolist()) / 8 / 1e9)


def test_route_labels_against_a_loop():
    ms = {7: adaptok.patch(vit(1)), 14: adaptok.patch(vit(2))}
    x, y = images(10), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    got = routing.route_labels(ms, [(x[:6], y[:6]), (x[6:], y[6:])])
    with torch.no_grad():
        for i in range(10):
            right7 = ms[7](x[i:i + 1], grid=7).argmax(-1).item() == y[i].item()
            assert got[i].item() == (7 if right7 else 14)


# ------------------------------------------------------------------ cascade


def test_cascade_exits_early_and_equals_the_offline_outcome():
    ms = {7: adaptok.patch(vit(1)), 10: adaptok.patch(vit(3)), 14: adaptok.patch(vit(2))}
    x = images(12)
    y = torch.arange(12) % 5
    with torch.no_grad():
        stage = {g: ms[g](x, grid=g) for g in ms}
    conf = torch.stack([stage[g].softmax(-1).amax(-1) for g in (7, 10, 14)], 1)
    t = [float(conf[:, 0].median()), float(conf[:, 1].median())]
    cascade = Cascade(ms, t)
    calls = []
    for g, m in ms.items():
        m.register_forward_hook(lambda mod, inp, out, g=g: calls.append((g, inp[0].shape[0])))
    with torch.no_grad():
        logits, exits = cascade(x, return_exits=True)
        _, spent = cascade.forward_with_macs(x)
    correct = torch.stack([stage[g].argmax(-1) == y for g in (7, 10, 14)], 1)
    r, m, e = routing.cascade_outcome(conf, correct, torch.tensor([macs(ms[g], g) for g in (7, 10, 14)]),
                                      torch.tensor(t, dtype=torch.float64))
    assert exits.tolist() == e[0].tolist()
    assert spent.tolist() == m[0].long().tolist()
    for n in range(12):  # every image's logits are those of the stage it left at
        assert torch.allclose(logits[n], stage[(7, 10, 14)[exits[n]]][n], atol=1e-12)
    left1, left2 = int((exits >= 1).sum()), int((exits >= 2).sum())
    assert calls[:3] == [(7, 12), (10, left1), (14, left2)]  # later stages see only what is left
    assert 0 < left2 < left1 < 12


def test_cascade_ends():
    ms = {7: vit(1), 14: vit(2)}
    x = images(4)
    with torch.no_grad():
        assert Cascade(ms, [0.0])(x, return_exits=True)[1].tolist() == [0] * 4
        logits, exits = Cascade(ms, [routing.NEVER])(x, return_exits=True)
        assert exits.tolist() == [1] * 4 and torch.equal(logits, ms[14](x, grid=14))
        assert Cascade(ms, [0.5])(x[:0]).shape == (0, 5)
        assert Cascade(ms, [0.5])(x[:1]).shape == (1, 5)


# --------------------------------------------------------------- bad input


def _ms():
    return {7: vit(1), 14: vit(2)}


L = torch.zeros(3, 5)
CASES = {
    "labels-out-of-range": (lambda: routing.confidence(L, torch.tensor([0, 5, 1])), ValueError,
                            r"labels must be class indices in \[0, 5\)"),
    "labels-negative": (lambda: routing.oracle([L, L], torch.tensor([0, -1, 1]), [1, 2]), ValueError,
                        "labels must be class indices"),
    "labels-float": (lambda: routing.confidence(L, torch.zeros(3)), ValueError, "labels must be an integer"),
    "logits-labels-lengths": (lambda: routing.confidence(L, torch.tensor([0, 1])), ValueError,
                              "logits and labels must have one row per image"),
    "oracle-logits-lengths": (lambda: routing.oracle([L, torch.zeros(2, 5)], torch.tensor([0, 1, 2]), [1, 2]),
                              ValueError, r"logits\[1\] and labels must have one row per image"),
    "oracle-not-a-list": (lambda: routing.oracle(L, torch.tensor([0, 1, 2]), [1]), ValueError,
                          "logits must be a non-empty sequence"),
    "logits-1d": (lambda: routing.confidence(torch.zeros(3), torch.tensor([0, 1, 2])), ValueError,
                  r"logits must be a floating \[N, classes\]"),
    "sweep-score-length": (lambda: routing.sweep(torch.zeros(2), torch.ones(3, 2, dtype=torch.bool), [1, 2], [0.5]),
                           ValueError, "score must be an"),
    "sweep-confident": (lambda: routing.sweep(torch.zeros(3), torch.ones(3, 2, dtype=torch.bool), [1, 2], [0.5],
                                              "big"), ValueError, "confident must be"),
    "sweep-macs-shape": (lambda: routing.sweep(torch.zeros(3), torch.ones(3, 2, dtype=torch.bool), [1, 2, 3], [0.5]),
                         ValueError, "macs must be"),
    "step": (lambda: routing.thresholds_across(torch.zeros(3), 0), ValueError, "step must be"),
    "cascade-thresholds-length": (lambda: Cascade(_ms(), [0.5, 0.5]), ValueError,
                                  r"thresholds must have one value per stage but the last \(1 for stages"),
    "cascade-thresholds-nan": (lambda: Cascade(_ms(), [float("nan")]), ValueError, "thresholds must be numbers"),
    "cascade-thresholds-negative": (lambda: Cascade(_ms(), [-0.1]), ValueError, "thresholds must be numbers >= 0"),
    "cascade-one-stage": (lambda: Cascade({7: vit(1)}, []), ValueError, "stages must hold at least 2"),
    "cascade-grid": (lambda: Cascade(_ms(), [0.5]).forward_with_macs(images(2), 7), ValueError,
                     "grid must be None"),
    "outcome-thresholds-length": (lambda: routing.cascade_outcome(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool),
                                                                  [1, 2, 3], [0.5]), ValueError,
                                  "thresholds must have one value per stage but the last"),
    "outcome-conf-shape": (lambda: routing.cascade_outcome(torch.zeros(3, 2), torch.ones(3, 3, dtype=torch.bool),
                                                           [1, 2, 3], [0.5, 0.5]), ValueError, "conf must be"),
    "budget": (lambda: routing.cascade_thresholds(torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool), [1, 2], 0),
               ValueError, "budget must be"),
    "cascade-goal-both": (lambda: routing.cascade_thresholds(torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool),
                                                             [1, 2], 0.1, min_top1=50), ValueError,
                          "exactly one of budget"),
    "cascade-min-top1": (lambda: routing.cascade_thresholds(torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool),
                                                            [1, 2], min_top1=150), ValueError,
                         r"min_top1 must be a number in \[0, 100\]"),
    "class-counts": (lambda: RoutedModel({7: vit(1), 14: vit(2, num_classes=3)}), ValueError,
                     "models must all have the same number of classes"),
    "cascade-class-counts": (lambda: Cascade({7: vit(1), 14: vit(2, num_classes=3)}, [0.5]), ValueError,
                             "models must all have the same number of classes"),
    "empty-models": (lambda: RoutedModel({}), ValueError, "models must be a non-empty"),
    "models-not-modules": (lambda: RoutedModel({7: "p7"}), TypeError, r"models\[7\] must be a timm ViT"),
    "models-not-vits": (lambda: RoutedModel({7: nn.Linear(2, 5)}), adaptok.UnsupportedModelError,
                        r"models\[7\]: adaptok.patch supports timm VisionTransformer"),
    "route-grid": (lambda: RoutedModel(_ms())(images(2), route=[7, 10]), ValueError,
                   r"route must pick grids from \(7, 14\), got \[10\]"),
    "route-length": (lambda: RoutedModel(_ms())(images(3), route=[7, 14]), ValueError,
                     r"route must have one entry per image \(3\)"),
    "route-string": (lambda: RoutedModel(_ms())(images(2), route="7"), TypeError, "route must be an int"),
    "no-router": (lambda: RoutedModel(_ms())(images(2)), ValueError, "has no router"),
    "router-grids": (lambda: RoutedModel(_ms(), router((7, 10))), ValueError, r"router picks grids \(7, 10\)"),
    "router-type": (lambda: RoutedModel(_ms(), nn.Linear(2, 2)), TypeError, "router must be an adaptok.routing"),
    "models-grid-zero": (lambda: RoutedModel({0: vit(1)}), ValueError, "models must hold ints >= 1"),
    "models-grid-string": (lambda: RoutedModel({"7": vit(1)}), ValueError, "models must hold ints >= 1 .*got '7'"),
    "route-threshold": (lambda: router().assign(images(2), threshold=5), ValueError,
                        r"threshold must be a number in \[0, 1\]"),
    "router-outputs": (lambda: Router(timm.create_model("resnet10t", num_classes=3), (7, 14), 28), ValueError,
                       r"net must have one output per grid \(2\), it has 3"),
    "images-3d": (lambda: RoutedModel(_ms())(torch.zeros(1, 28, 28), route=7), ValueError,
                  r"images must be a \[B, C, H, W\]"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_names_the_argument(case):
    fn, error, match = case
    with pytest.raises(error, match=match):
        fn()


# --------------------------------------------------------------- benchmark


def test_benchmark_tiny_run(tmp_path, capsys):
    """One tiny run of the benchmark on the repository's checkpoints (speed
    targets are the benchmark's to report, not this test's)."""
    import json

    pytest.importorskip("animal_mnist")
    from adaptok.bench import routing as bench

    bench.main(["--batch", "16", "--single", "2", "--repeats", "1", "--warmup", "0", "--threshold", "0.5",
                "--device", "cpu", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "routing-bench.json").read_text())
    r = rep["results"]
    assert set(r) == {"P14, timm", "P14, adaptok", "routed t=0.5", "cascade ~t=0.5"}
    assert r["P14, timm"]["top1"] == r["P14, adaptok"]["top1"]
    assert 0 < r["routed t=0.5"]["gmacs"] < r["P14, timm"]["gmacs"] + 0.01
    assert len(rep["targets"]) == 3 and "targets:" in capsys.readouterr().out


def test_benchmark_at_another_scale_tiny_run(tmp_path):
    """The random-weights mode (the paper's scale with DeiT-S), on a tiny ViT."""
    import json

    from adaptok.bench import routing as bench

    bench.main(["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=28", "--model-arg", "patch_size=4",
                "--model-arg", "depth=2", "--batch", "8", "--single", "1", "--repeats", "1", "--warmup", "0",
                "--mix", "0.5", "--device", "cpu", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "routing-bench.json").read_text())
    assert rep["cascade_share_to_p14"] == 50.0  # the cascade sends the routed model's share on to P14
    r = rep["results"]["routed 0.5 to P7"]
    assert r["share_p7"] == 50.0 and 1.0 < r["mac_ratio"] < 4.0
