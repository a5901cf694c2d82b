"""adaptok.train: the loop lowers the loss, resumes exactly, gives DDP the
parameters of one process on the whole batch, runs the methods' losses as
computed independently, and refuses bad input naming the argument."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adaptok
from adaptok.train import EViT, Method, TrainConfig, create_method, create_model, train
from adaptok.train.cli import main as train_main
from adaptok.train.loop import _seed

from test_vit import evit_reference

pytest.importorskip("animal_mnist")

# A 2-block ViT at 7x7 tokens (28 px, patch 4) on 64 animal-mnist images.
TINY = dict(model="vit_tiny_patch16_224",
            model_kwargs=dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2),
            limit=64, batch_size=32, epochs=1, warmup_epochs=0, amp=False, eval_every=0, aug={"no_aug": True})


def tiny(tmp_path, **kw):
    return {**TINY, "out": str(tmp_path / "run"), **kw}


def params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_few_steps_lower_the_loss(tmp_path):
    result = train(tiny(tmp_path, epochs=4, lr=3e-3, limit=128), progress=False)
    losses = [r["train_loss"] for r in result["records"]]
    assert losses[-1] < losses[0] - 0.1, losses
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


class Crash(Method):
    """Plain training that dies at the start of ``epoch``."""

    def __init__(self, epoch):
        super().__init__()
        self.at = epoch

    def step(self, model, epoch):
        if epoch >= self.at:
            raise KeyboardInterrupt


def test_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = dict(epochs=3, ema_decay=0.9, aug={}, smoothing=0.1, clip_grad=1.0, eval_every=1, limit=64)
    full = train(tiny(tmp_path / "a", **cfg), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "b", **cfg), method=Crash(1.5), progress=False)
    saved = torch.load(tmp_path / "b" / "run" / "last.pth", weights_only=True)
    assert saved["epoch"] == 1
    resumed = train(tiny(tmp_path / "b", **cfg), progress=False)
    assert resumed["records"][0] == saved["records"][0]  # epoch 1 was not rerun (its timing is kept)
    a, b = params(full["checkpoint"]), params(resumed["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.load(full["checkpoint"], weights_only=True)["state_dict_ema"]
    ema_b = torch.load(resumed["checkpoint"], weights_only=True)["state_dict_ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    keys = ("epoch", "train_loss", "lr", "val_top1", "val_loss", "ema_val_top1")
    assert [{k: r[k] for k in keys} for r in full["records"]] == [{k: r[k] for k in keys} for r in resumed["records"]]
    assert len((tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()) == 3


class Diverge(Method):
    """A loss that becomes NaN at the third step (found at the check after it: the last step, 4)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, model, images, targets, criterion):
        self.calls += 1
        loss = super().loss(model, images, targets, criterion)
        return loss * float("nan") if self.calls == 3 else loss


def test_a_non_finite_loss_stops_the_run(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite in epoch 1, by step 4.*no checkpoint was written"):
        train(tiny(tmp_path, limit=128), method=Diverge(), progress=False)
    assert not (tmp_path / "run" / "last.pth").exists()


def test_resume_refuses_another_configuration(tmp_path):
    cfg = tiny(tmp_path, aug={"no_aug": True, "scale": (0.5, 1.0)})
    train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['lr'\]\)"):
        train({**cfg, "lr": 1e-2}, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['method'\]"):
        train(cfg, method=EViT(0.5, prune_layers=[1]), progress=False)
    # The run's config.json (tuples as lists) reruns it: finished, nothing more to train.
    assert train_main(["--config", str(tmp_path / "run" / "config.json")]) == 0
    train({**cfg, "lr": 1e-2, "resume": False}, progress=False)  # starts over


@pytest.mark.parametrize("caller_group", [False, True], ids=["train-creates-it", "caller-created"])
def test_train_destroys_only_the_process_group_it_created(tmp_path, monkeypatch, caller_group):
    """A gloo group left alive at interpreter shutdown can abort the process
    (SIGABRT, "terminate called without an active exception"): train()
    destroys the group it created, even when it raises, and leaves the
    caller's."""
    import torch.distributed as td

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(k, v)
    if caller_group:
        td.init_process_group("gloo")
    try:
        train(tiny(tmp_path), progress=False)
        assert td.is_initialized() is caller_group
        with pytest.raises(ValueError, match="batch_size"):
            train({**tiny(tmp_path), "batch_size": 3, "mixup": 0.5}, progress=False)
        assert td.is_initialized() is caller_group
    finally:
        if td.is_initialized():
            td.destroy_process_group()


def torchrun(nproc, config, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "adaptok.train", "--config", str(config), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return params(out / "last.pth")


@pytest.mark.parametrize("method, method_args", [("evit", {"keep_rate": 0.7, "prune_layers": [1]}),
                                                 ("revit", {"grids": [7, 5, 3]})], ids=["evit", "revit"])
def test_ddp_two_processes_equal_one_process(tmp_path, method, method_args):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny(tmp_path, epochs=2, method=method, method_args=method_args)))
    one = torchrun(1, config, tmp_path / "one")
    two = torchrun(2, config, tmp_path / "two")
    _seed(0)  # the run's own initialization
    start = create_model(TINY["model"], num_classes=10, **TINY["model_kwargs"])
    create_method(method, **method_args).setup(start)
    start = start.state_dict()
    assert set(start) == set(one)
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-3  # training happened
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4, msg=k)


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def tiny_model(**kw):
    torch.manual_seed(0)
    return create_model(TINY["model"], num_classes=10, **{**TINY["model_kwargs"], **kw})


def test_cross_entropy_loss_is_label_smoothed_ce():
    from timm.loss import LabelSmoothingCrossEntropy

    model = tiny_model().double()
    x, y = batch()
    x = x.double()
    for grid in (None, 4):
        loss = create_method("ce", grid=grid).loss(model, x, y, LabelSmoothingCrossEntropy(0.1))
        plain = copy.deepcopy(model)
        if grid is not None:  # the plain model at that grid: its table resampled, the images resized
            import timm

            plain = timm.create_model(TINY["model"], num_classes=10, **{**TINY["model_kwargs"], "img_size": 16})
            state = {k: v for k, v in model.state_dict().items()}
            state["pos_embed"] = timm.layers.resample_abs_pos_embed(state["pos_embed"], [4, 4], [7, 7])
            plain.load_state_dict(state)
            plain.double()
            x_in = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        else:
            x_in = x
        logp = plain(x_in).log_softmax(-1)
        want = (0.9 * -logp.gather(1, y[:, None])[:, 0] - 0.1 * logp.mean(-1)).mean()
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


def test_evit_loss_and_schedule():
    model = tiny_model().double()
    method = EViT(keep_rate=0.5, start=1.0, end=3.0, prune_layers=(1,))
    method.setup(model)
    x, y = batch()
    x = x.double()
    for epoch in (0.0, 1.5, 2.25, 5.0):
        method.step(model, epoch)
        t = min(max((epoch - 1.0) / 2.0, 0.0), 1.0)
        rate = 0.5 + 0.25 * (1 + math.cos(math.pi * t))
        assert model.keep_rate == pytest.approx(rate, abs=1e-15)
        loss = method.loss(model, x, y, torch.nn.CrossEntropyLoss())
        ref = copy.deepcopy(model)
        want = F.cross_entropy(evit_reference(ref, x, {1: rate}), y)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


def test_cli_train_then_eval_then_plot(tmp_path, capsys):
    from adaptok.evaluate import main as eval_main

    argv = ["--model", TINY["model"], "--limit", "64", "--batch-size", "32", "--epochs", "1", "--no-amp",
            "--warmup-epochs", "0", "--eval-every", "1", "--out", str(tmp_path / "cli")]
    for k, v in TINY["model_kwargs"].items():
        argv += ["--model-arg", f"{k}={v}"]
    argv += ["--method", "evit", "--method-arg", "keep_rate=0.5", "--method-arg", "prune_layers=[1]"]
    assert train_main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["epoch"] == 1 and record["keep_rate"] == 0.5 and 0 <= record["val_top1"] <= 100
    ck = str(tmp_path / "cli" / "last.pth")
    assert eval_main(["--checkpoint", ck, "--limit", "40", "--batch-size", "16", "--keep-rate", "0.5", "1.0",
                      "--out", str(tmp_path / "e.json"), "--npz", str(tmp_path / "l{keep}.npz")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert [p["keep_rate"] for p in result["points"]] == [0.5, 1.0]
    assert result["points"][0]["gmacs"] < result["points"][1]["gmacs"]
    assert (tmp_path / "l0.5.npz").exists()
    assert eval_main(["--plot", str(tmp_path / "p.png"), str(tmp_path / "e.json")]) == 0
    assert eval_main(["--checkpoint", ck, "--keep-rate", "0.5", "1.0", "--npz", str(tmp_path / "one.npz")]) == 2
    assert "needs '{keep}'" in capsys.readouterr().err
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_model_from_a_lab_checkpoint_is_as_trained(tmp_path):
    result = train(tiny(tmp_path, method="evit", method_args={"keep_rate": 0.6, "prune_layers": [1], "grid": 5}),
                   progress=False)
    model = create_model(checkpoint=result["checkpoint"])
    assert model.keep_rate == 0.6 and model.prune_layers == (1,) and model.adaptok_method["grid"] == 5
    saved = params(result["checkpoint"])
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw, error, match", [
    (dict(model="no_such_model"), ValueError, "model 'no_such_model' is not a timm model name"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(batch_size=1000), ValueError, r"batch_size \(1000\) is larger than the training split"),
    (dict(epochs=0), ValueError, "epochs must be a positive int"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
    (dict(data="/no/such/dir"), FileNotFoundError, "data must be 'animal-mnist' or an ImageFolder"),
    (dict(init="/no/such/file.pth"), FileNotFoundError, "init must be a checkpoint file"),
    (dict(method="nope"), ValueError, "method must be one of"),
    (dict(method="ce", method_args={"grid": 0}), ValueError, "grid must hold ints >= 1"),
    (dict(method="ce", method_args={"grids": 7}), TypeError, "method 'ce'"),
    (dict(method="evit", method_args={"keep_rate": 0.7, "prune_layers": [1]},
          model_kwargs={**TINY["model_kwargs"], "class_token": False, "global_pool": "avg"}),
     adaptok.UnsupportedModelError, "keep_rate.*no class token"),
    (dict(method="evit", method_args={"keep_rate": 1.5, "prune_layers": [1]}), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(method="evit", method_args={"keep_rate": 0, "start": 0, "end": 1}), ValueError, "keep_rate must be a float in"),
    (dict(method="evit", method_args={"keep_rate": 0.5, "start": 2, "end": 1}), ValueError, "end must be after start"),
    (dict(method="evit", method_args={"keep_rate": 0.7, "start": 1}), ValueError, "start and end must be given"),
    (dict(method="evit", method_args={"keep_rate": 0.7}), ValueError, "prune_layers must hold block indices"),
    (dict(targets="/no/such/labels.pt"), FileNotFoundError, "targets must be a file of labels"),
    (dict(img_size=0), ValueError, "img_size must be a positive int"),
    (dict(method="revit", method_args={"grids": [5, 3]}), ValueError, "grids must include the model's own grid 7"),
    (dict(method="revit", method_args={"grids": [7, 3], "tau": -1}), ValueError, "tau must be a finite number"),
    (dict(method="revit", method_args={"grids": [7, 3], "distillation": "soft-ish"}), ValueError,
     "distillation must be one of"),
    (dict(mixup=0.8, batch_size=2, limit=64), None, None),
])
def test_bad_input_names_the_argument(tmp_path, kw, error, match):
    if error is None:  # mixup with an odd per-process batch
        with pytest.raises(ValueError, match="mixup/cutmix needs an even batch_size"):
            train(tiny(tmp_path, **{**kw, "batch_size": 3}), progress=False)
        return
    with pytest.raises(error, match=match):
        train(tiny(tmp_path, **kw), progress=False)


def test_checkpoint_errors(tmp_path):
    result = train(tiny(tmp_path), progress=False)
    with pytest.raises(ValueError, match="does not match the model.*shapes"):
        create_model(TINY["model"], checkpoint=result["checkpoint"], embed_dim=48)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint"):
        create_model(TINY["model"], checkpoint=str(bad))
    with pytest.raises(FileNotFoundError, match="checkpoint '/no/such.pth' does not exist"):
        create_model(TINY["model"], checkpoint="/no/such.pth")
    with pytest.raises(ValueError, match="holds no EMA weights"):
        create_model(checkpoint=result["checkpoint"], use_ema=True)
    import argparse

    torch.save({"state_dict": params(result["checkpoint"]), "args": argparse.Namespace(lr=0.1), "epoch": 3},
               tmp_path / "timm_style.pth")  # what timm's CheckpointSaver writes
    create_model(TINY["model"], checkpoint=str(tmp_path / "timm_style.pth"), num_classes=10,
                 **TINY["model_kwargs"])
    with pytest.raises(ValueError, match="does not match the model.*missing"):
        torch.save({"state_dict": {"head.weight": torch.zeros(10, 32)}}, tmp_path / "part.pth")
        train(tiny(tmp_path / "x", init=str(tmp_path / "part.pth")), progress=False)


def test_config_fields_and_cli_errors(tmp_path):
    with pytest.raises(TypeError, match=r"unknown config fields: \['epoch'\]"):
        train({"epoch": 3})
    assert TrainConfig().method == "ce"
    with pytest.raises(SystemExit):
        train_main(["--model-arg", "no-equals-sign"])
    assert train_main(["--model", "no_such_model", "--out", str(tmp_path / "r")]) == 2


def test_a_cnn_on_replaced_targets_trains_and_loads_as_an_assigner(tmp_path):
    """ReViT's assigner: a timm CNN trained by the loop on token-length
    labels (a targets file), loaded back with the grids its classes mean."""
    from adaptok.models import revit

    g = torch.Generator().manual_seed(0)
    sides = torch.tensor([7, 5, 3])
    train_sides, val_sides = sides[torch.randint(0, 3, (64,), generator=g)], sides[torch.randint(0, 3, (2000,),
                                                                                                 generator=g)]
    labels = revit.save_labels(str(tmp_path / "labels.pt"), (7, 5, 3), train_sides, val_sides)
    assert labels["classes"] == [3, 5, 7] and labels["train"].tolist() == [[3, 5, 7].index(s) for s in
                                                                           train_sides.tolist()]
    cfg = tiny(tmp_path, model="mobilenetv3_small_050", model_kwargs={"in_chans": 1}, img_size=28,
               targets=str(tmp_path / "labels.pt"), eval_every=1)
    result = train(cfg, progress=False)
    assert "val_top1" in result["records"][-1]
    assigner = revit.TokenLengthAssigner.from_checkpoint(result["checkpoint"], threshold=0.3)
    assert assigner.grids == (3, 5, 7) and assigner.img_size == 28 and assigner.threshold == 0.3
    model = revit.convert(create_model(TINY["model"], num_classes=10, **TINY["model_kwargs"]), (7, 5, 3))
    model.set_assigner(assigner)
    x, _ = batch(4)
    with torch.no_grad():
        assert model.eval()(x, grid="auto").shape == (4, 10)
    with pytest.raises(ValueError, match="assigner was trained for grids"):
        revit.convert(create_model(TINY["model"], num_classes=10, **TINY["model_kwargs"]), (7, 3)).set_assigner(
            assigner)
    with pytest.raises(ValueError, match="not a router's"):
        revit.TokenLengthAssigner.from_checkpoint(train(tiny(tmp_path / "p"), progress=False)["checkpoint"])
    # adaptok-eval: a lab ReViT with the assigner, a threshold sweep.
    from adaptok.evaluate import main as eval_main

    ck = train(tiny(tmp_path / "r", method="revit", method_args={"grids": [7, 5, 3]}), progress=False)["checkpoint"]
    out = tmp_path / "auto.json"
    assert eval_main(["--checkpoint", ck, "--assigner", result["checkpoint"], "--threshold", "0", "1", "--limit",
                      "32", "--out", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["threshold"] for p in points] == [0, 1]
    assert points[0]["gmacs_min"] == points[0]["gmacs_max"] < points[1]["gmacs"]  # threshold 0: all at 3x3


@pytest.mark.parametrize("targets, error, match", [
    ({"train": torch.zeros(10, dtype=torch.long), "num_classes": 3}, ValueError, r"one entry per image of the split \(64\)"),
    ({"train": torch.full((64,), 3), "num_classes": 3}, ValueError, r"train labels must be in \[0, 3\)"),
    ({"train": torch.zeros(64)}, ValueError, "must hold"),
    ({"train": torch.zeros(64), "num_classes": 2}, ValueError, "targets must be one integer per image"),
], ids=["length", "range", "no-classes", "floats"])
def test_bad_targets_name_the_argument(tmp_path, targets, error, match):
    torch.save(targets, tmp_path / "t.pt")
    with pytest.raises(error, match=match):
        train(tiny(tmp_path, targets=str(tmp_path / "t.pt")), progress=False)
