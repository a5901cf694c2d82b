"""adaptok.evaluate: the MACs of each image counted by hand for known grids
and keep rates, top-1 and the per-image file against an independent
computation, and the plot."""
import json
import math

import numpy as np
import pytest
import torch

import adaptok
from adaptok.evaluate import evaluate, images_macs, plot
from adaptok.train import create_model

C, DEPTH, HEADS, MLP, PATCH, CLASSES = 32, 3, 2, 4, 4, 10


def model(keep_rate=None, prune_layers=(1,)):
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224", img_size=28, patch_size=PATCH, in_chans=1, embed_dim=C, depth=DEPTH,
                     num_heads=HEADS, num_classes=CLASSES)
    m.set_pruning(keep_rate, prune_layers)
    return m


def hand_macs(grid, rates):
    """A ViT's MACs counted from its shape: the patch projection per patch;
    per block qkv (3 C^2) and proj (C^2) per token, q k^T and p v (2 N^2 C),
    then EViT's selection (prefix + ceil(rate * patches) + the fused token),
    then the MLP (2 * 4 C^2) per kept token; the head once."""
    P = grid * grid
    total = P * (1 * PATCH * PATCH * C)
    N = 1 + P
    for i in range(DEPTH):
        total += N * 4 * C * C + 2 * N * N * C
        if i in rates:
            kept = math.ceil(rates[i] * (N - 1))
            N = 1 + kept + (1 if kept < N - 1 else 0)
        total += N * 2 * MLP * C * C
    return total + C * CLASSES


@pytest.mark.parametrize("keep_rate", [None, 0.5, 0.7])
def test_macs_per_image_equal_the_hand_count(keep_rate):
    m = model(keep_rate)
    rates = {1: keep_rate} if keep_rate is not None else {}
    grids = [7, 4, 7, 2, 5]
    got = images_macs(m, grids, len(grids))
    assert got.tolist() == [hand_macs(g, rates) for g in grids]
    assert images_macs(m, None, 2).tolist() == [hand_macs(7, rates)] * 2


def test_evaluate_top1_macs_and_npz(tmp_path):
    m = model(0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 28, 28, generator=g)
    y = torch.randint(0, CLASSES, (20,), generator=g)
    loader = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    r = evaluate(m, loader, grid=5, amp=False, npz=str(tmp_path / "out.npz"))
    with torch.no_grad():
        want = m.eval()(x, grid=5)
    saved = np.load(tmp_path / "out.npz")
    torch.testing.assert_close(torch.from_numpy(saved["logits"]), want, atol=1e-5, rtol=1e-5)
    assert saved["labels"].tolist() == y.tolist()
    assert saved["macs"].tolist() == [hand_macs(5, {1: 0.5})] * 20
    assert r["top1"] == pytest.approx(100 * float((want.argmax(-1) == y).float().mean()))
    assert r["gmacs"] == pytest.approx(hand_macs(5, {1: 0.5}) / 1e9)
    assert r["images"] == 20 and r["images_per_s"] > 0


def test_a_model_that_reports_its_own_cost():
    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward_with_macs(self, images, grid):
            assert grid is None  # evaluate passes its grid on
            n = images.shape[0]
            return torch.eye(CLASSES)[:n], torch.arange(n) * 10**9

    r = evaluate(Routed(), [(torch.zeros(4, 1, 2, 2), torch.arange(4))], amp=False)
    assert r["top1"] == 100.0 and r["gmacs"] == pytest.approx(1.5) and r["gmacs_max"] == pytest.approx(3.0)


def test_plot(tmp_path):
    results = [{"name": "P14", "points": [{"gmacs": 0.09, "top1": 60.0}]},
               {"name": "EViT", "points": [{"gmacs": g, "top1": t, "label": str(k), "top1_std": 0.5}
                                           for g, t, k in ((0.04, 50, 0.5), (0.06, 58, 0.7))]}]
    (tmp_path / "p14.json").write_text(json.dumps(results[0]))
    plot([str(tmp_path / "p14.json"), results[1]], str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_errors():
    with pytest.raises(ValueError, match="loader yielded no images"):
        evaluate(model(), [], amp=False)
    with pytest.raises(ValueError, match="grid must hold ints >= 1"):
        evaluate(model(), [(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))], grid=0, amp=False)
    assert adaptok.cost.macs(model(), 7) == hand_macs(7, {})
