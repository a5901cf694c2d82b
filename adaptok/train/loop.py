"""The lab's training loop: one call (:func:`train`) or ``adaptok-train``.

Everything is timm's or torch's: ``timm.create_model`` (any name and keyword
overrides, ``pretrained=True``, or a checkpoint), then :func:`adaptok.patch`;
``timm.optim.create_optimizer_v2`` (AdamW, no weight decay on norms, biases
and the model's ``no_weight_decay`` set); ``timm.scheduler.create_scheduler_v2``
(cosine with linear warm-up, stepped per update); timm's label smoothing,
Mixup/CutMix and ``ModelEmaV3``; bf16 autocast; ``clip_grad_norm_``; and,
under ``torchrun``, ``DistributedDataParallel`` (gloo on CPU, nccl on GPU)
with timm's distributed sampler. What the model does with a batch is the
:class:`adaptok.train.methods.Method`'s.

Reproducibility: the model is initialized from ``seed``; every epoch reseeds
Python, numpy and torch from ``(seed, epoch, rank)`` (loader workers start
afresh each epoch, seeded from it), and the sampler takes the epoch, so a
run resumed from its epoch checkpoint (``out/last.pth``, written atomically
after every epoch) continues exactly as the uninterrupted run would have:
bit for bit on the CPU, and on CUDA as far as its kernels are deterministic. ``out/log.jsonl`` holds one JSON record per epoch, and
``out/config.json`` the configuration (``adaptok-train --config`` reruns it).

The global ``batch_size`` is split evenly over the processes. Under
``torchrun`` every process count draws the same global batches from timm's
``DistributedSampler``, so N processes take the same optimizer steps, over
the same images, as ``torchrun --nproc_per_node 1`` (up to floating-point
summation order, and given no random augmentation or dropout, whose draws
are per process). A plain single-process run shuffles with its own sampler.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .. import data as lab_data
from ..devices import native_bf16
from .methods import Method, create_method

CHECKPOINT = "last.pth"
LOG = "log.jsonl"
CHECK_EVERY = 10  # steps between the checks that the loss is finite (each costs a device sync)


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; stored in its checkpoint and records.

    Model: ``model`` (a ``timm.create_model`` name: a ViT, which is
    patched, or any other classifier, e.g. ReViT's assigner CNN),
    ``model_kwargs`` (its keyword overrides, e.g. ``img_size=28,
    patch_size=2, in_chans=1``), ``pretrained``, ``init`` (initial weights:
    a lab checkpoint, whose ``state_dict`` is taken, or any checkpoint timm's
    ``load_checkpoint`` reads), ``img_size`` (the input side; None: a ViT's
    own, else timm's default). ``num_classes`` defaults to the data's.

    Data: ``data`` (``"animal-mnist"`` or an ImageFolder root), ``limit``
    (first images of the training split only), ``workers``, ``aug``
    (overrides of :data:`adaptok.data.DEFAULTS`, e.g. ``{"no_aug": True}``),
    ``targets`` (a torch file ``{"train": [N] int64, "val": [M] int64
    (optional), "num_classes": K}`` of labels replacing the data's, one per
    image of each split after ``limit``, and optionally ``"classes"``, what
    each class stands for, kept in the checkpoint): e.g. ReViT's
    token-length labels, :func:`adaptok.models.revit.save_labels`).

    Optimization: ``epochs``, ``batch_size`` (global), ``opt``, ``lr``,
    ``weight_decay``, ``sched``, ``warmup_epochs``, ``warmup_lr``,
    ``min_lr``, ``smoothing``, ``mixup``, ``cutmix``, ``clip_grad``,
    ``ema_decay`` (None: no EMA), ``amp`` (bf16 autocast; None: where the
    device computes bf16 natively, CUDA or a CPU with AVX-512 BF16 or AMX,
    since elsewhere bf16 is emulated and slower than fp32), ``seed``.

    Method: ``method`` (a name in :data:`adaptok.train.methods.METHODS`) and
    ``method_args``. Output: ``out`` (directory), ``resume`` (continue from
    ``out/last.pth`` when it exists), ``eval_every`` (epochs; 0: never).
    """

    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    pretrained: bool = False
    init: Optional[str] = None
    num_classes: Optional[int] = None
    img_size: Optional[int] = None
    data: str = lab_data.ANIMAL_MNIST
    targets: Optional[str] = None
    limit: Optional[int] = None
    workers: int = 0
    aug: dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    sched: str = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    clip_grad: Optional[float] = None
    ema_decay: Optional[float] = None
    amp: Optional[bool] = None
    seed: int = 0
    method: str = "ce"
    method_args: dict = dataclasses.field(default_factory=dict)
    out: str = "runs/train"
    resume: bool = True
    eval_every: int = 1

    def check(self) -> None:
        """Clear errors naming the field, before anything is built."""
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "weight_decay", "warmup_lr", "min_lr", "smoothing", "mixup", "cutmix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.smoothing < 1:
            raise ValueError(f"smoothing must be < 1, got {self.smoothing!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        for name in ("model_kwargs", "method_args", "aug"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.init is not None and not os.path.isfile(self.init):
            raise FileNotFoundError(f"init must be a checkpoint file, {self.init!r} does not exist")
        if self.targets is not None and not os.path.isfile(self.targets):
            raise FileNotFoundError(f"targets must be a file of labels, {self.targets!r} does not exist")
        if self.img_size is not None and (isinstance(self.img_size, bool) or not isinstance(self.img_size, int)
                                          or self.img_size < 1):
            raise ValueError(f"img_size must be a positive int or None, got {self.img_size!r}")
        lab_data.source(self.data)


# ------------------------------------------------------------------ models


def read_checkpoint(path: str) -> Any:
    """The contents of a checkpoint file (torch, with timm's training
    arguments allowed, or safetensors); errors name the checkpoint."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's training checkpoints hold its args
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path!r} does not exist") from None
    except Exception as e:  # not a torch file, truncated, or pickled objects
        raise ValueError(f"checkpoint {path!r} cannot be read as a torch checkpoint: {e}") from None


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> None:
    """Load ``path`` into ``model`` strictly: a lab checkpoint (its
    ``state_dict``, or ``state_dict_ema`` with ``use_ema``), a timm training
    checkpoint or a bare state dict. A mismatch is a ValueError naming the
    checkpoint and the keys that differ."""
    _load_state(model, read_checkpoint(path), path, use_ema)


def _load_state(model: nn.Module, ckpt: Any, path: str, use_ema: bool) -> None:
    state = ckpt
    if use_ema and not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict_ema"), dict)):
        raise ValueError(f"checkpoint {path!r} holds no EMA weights (state_dict_ema); train with ema_decay")
    if isinstance(ckpt, dict):
        for key in (("state_dict_ema",) if use_ema else ()) + ("state_dict", "model"):
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path!r} holds no state dict")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"shapes (checkpoint vs model) {shapes[:5]}" if shapes else ""]
        raise ValueError(f"checkpoint {path!r} does not match the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state)


def create_model(name: Optional[str] = None, *, checkpoint: Optional[str] = None, pretrained: bool = False,
                 use_ema: bool = False, **kwargs) -> nn.Module:
    """A timm model: ``timm.create_model(name, pretrained, **kwargs)``,
    then :func:`adaptok.patch` for a ViT, then ``checkpoint``'s weights. With a lab
    checkpoint, ``name`` and ``kwargs`` default to the ones it was trained
    with, the keep rate and prune layers are set as it was trained, and
    ``model.adaptok_method`` holds the training method's state (its
    ``grid`` among them) and ``model.adaptok_config`` the training
    configuration (both empty for other checkpoints). Errors name
    ``model`` or ``checkpoint``."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from ..timm_vit import patch

    trained = config = None
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
        config = ckpt.get("config") if isinstance(ckpt, dict) else None
        if isinstance(config, dict):
            name = name or config["model"]
            kwargs = {**config["model_kwargs"], "num_classes": ckpt.get("num_classes"), **kwargs}
            trained = ckpt.get("method")
    if not name:
        raise ValueError("model must name a timm model (or checkpoint be a lab checkpoint)")
    if not timm.is_model(name):
        raise ValueError(f"model {name!r} is not a timm model name (timm.list_models() lists them)")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if isinstance(model, VisionTransformer):
        patch(model)
    if trained:  # the model as its method made it: EViT's keep rate and prune layers, a ReViT's lengths
        create_method(trained["method"], **{k: v for k, v in trained.items() if k != "method"}).setup(model)
    if checkpoint is not None:
        _load_state(model, ckpt, checkpoint, use_ema)
    model.adaptok_method = dict(trained or {})
    model.adaptok_config = dict(config or {}) if checkpoint is not None else {}
    return model


# ------------------------------------------------------------ distributed


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _read_targets(path: str) -> dict:
    """A targets file (see :class:`TrainConfig`), checked."""
    targets = read_checkpoint(path)
    if not isinstance(targets, dict) or not torch.is_tensor(targets.get("train")) or not isinstance(
            targets.get("num_classes"), int):
        raise ValueError(f"targets {path!r} must hold {{'train': int64 tensor, 'num_classes': int}} "
                         f"(and optionally 'val')")
    for split in ("train", "val"):
        t = targets.get(split)
        if t is not None and len(t) and not 0 <= int(t.min()) <= int(t.max()) < targets["num_classes"]:
            raise ValueError(f"targets {path!r}: {split} labels must be in [0, {targets['num_classes']}), "
                             f"got {int(t.min())}..{int(t.max())}")
    return targets


def _init_distributed(device: Optional[str]) -> tuple[_Dist, torch.device]:
    """torchrun's environment -> a process group (nccl on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return _Dist(), dev
    dist = _Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True)
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return dist, dev


def _seed(seed: int, *parts: int) -> None:
    s = int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ------------------------------------------------------------- the loop


def _plain(obj: Any) -> Any:
    """``obj`` as JSON has it (tuples as lists), for comparing configurations."""
    return json.loads(json.dumps(obj))


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def validate(model: nn.Module, method: Method, loader, device: torch.device, amp: bool) -> dict:
    """``{"val_top1": %, "val_loss": cross-entropy}`` of ``method.forward``
    over ``loader``."""
    was = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # correct, loss; read once at the end
    total = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = method.forward(model, images)
        sums[0] += (logits.argmax(-1) == targets).sum()
        sums[1] += nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        total += len(targets)
    model.train(was)
    correct, loss = sums.tolist()
    return {"val_top1": 100.0 * correct / max(total, 1), "val_loss": loss / max(total, 1)}


def train(config: TrainConfig | dict, method: Optional[Method] = None, *, device: Optional[str] = None,
          progress: Optional[bool] = None) -> dict:
    """Train as ``config`` says (a :class:`TrainConfig` or its fields as a
    dict); ``method`` overrides ``config.method``. Returns ``{"records":
    [one dict per epoch], "checkpoint": path, "config": dict}`` (on every
    process). ``progress``: a tqdm bar (default: when stderr is a terminal).

    Under torchrun, a process group this call creates is destroyed when it
    returns or raises (a gloo group left to interpreter shutdown can abort
    the process); one the caller created is left to the caller."""
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return _train(config, method, device, progress)
    finally:
        if owned and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(config, method, device, progress) -> dict:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    if isinstance(config, dict):
        unknown = set(config) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise TypeError(f"unknown config fields: {sorted(unknown)}")
        config = TrainConfig(**config)
    config.check()
    method = method or create_method(config.method, **config.method_args)
    dist, dev = _init_distributed(device)
    amp = config.amp if config.amp is not None else native_bf16(dev)
    if config.batch_size % dist.world:
        raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the process count ({dist.world})")
    local_batch = config.batch_size // dist.world
    if (config.mixup or config.cutmix) and local_batch % 2:
        raise ValueError(f"mixup/cutmix needs an even batch_size per process, got {local_batch}")

    # The model, from the seed, on every process alike.
    _seed(config.seed)
    relabel = _read_targets(config.targets) if config.targets is not None else None
    num_classes = config.num_classes or (relabel["num_classes"] if relabel else lab_data.class_count(config.data))
    model = create_model(config.model, pretrained=config.pretrained, num_classes=num_classes, **config.model_kwargs)
    if config.init is not None:
        load_weights(model, config.init)
    method.setup(model)
    model.to(dev)
    channels, img_size = lab_data.model_input(model, config.img_size)
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels} input channels; the lab's data has 1 or 3")

    loader = lab_data.create_loader(config.data, "train", local_batch, img_size, channels, distributed=dist.active,
                                    workers=config.workers, limit=config.limit,
                                    targets=relabel["train"] if relabel else None, **config.aug)
    if len(loader) == 0:
        raise ValueError(f"batch_size ({config.batch_size}) is larger than the training split "
                         f"({len(loader.dataset)} images): no full batch")
    val_loader = None
    if config.eval_every and dist.main and (relabel is None or relabel.get("val") is not None):
        val_loader = lab_data.create_loader(config.data, "val", max(local_batch, 64), img_size, channels,
                                            workers=config.workers, targets=relabel.get("val") if relabel else None,
                                            **lab_data.eval_settings(config.aug))
    updates = len(loader)
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=config.sched, num_epochs=config.epochs,
                                       warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr,
                                       min_lr=config.min_lr, step_on_epochs=False, updates_per_epoch=updates)
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay else None
    mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing,
                  num_classes=num_classes) if (config.mixup or config.cutmix) else None
    if mixup is not None:
        criterion = SoftTargetCrossEntropy()
    elif config.smoothing:
        criterion = LabelSmoothingCrossEntropy(config.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    # Resume.
    os.makedirs(config.out, exist_ok=True)
    path = os.path.join(config.out, CHECKPOINT)
    records: list = []
    start = 0
    if config.resume and os.path.exists(path):
        ckpt = read_checkpoint(path)
        saved = {**_plain(ckpt["config"]), "method": _plain(ckpt["method"])}
        now = {**_plain(dataclasses.asdict(config)), "method": _plain(method.state())}
        diff = sorted(k for k in saved if k not in ("resume", "out", "eval_every") and saved[k] != now.get(k))
        if diff:
            raise ValueError(f"checkpoint {path!r} was written by another configuration (differs in {diff}); "
                             f"use another out directory or resume=False")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["state_dict_ema"])
        records, start = list(ckpt["records"]), int(ckpt["epoch"])
    if dist.main:
        with open(os.path.join(config.out, "config.json"), "w") as f:  # rerun with --config
            json.dump(dataclasses.asdict(config), f, indent=1)
        with open(os.path.join(config.out, LOG), "w") as f:  # the records of the epochs kept
            f.writelines(json.dumps(r) + "\n" for r in records)

    net = model
    if dist.active:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    bar = progress if progress is not None else sys.stderr.isatty()
    for epoch in range(start, config.epochs):
        _seed(config.seed, epoch, dist.rank)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(config.seed * 1_000_003 + epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        seen = 0
        it = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (bar and dist.main), leave=False)
        for i, (images, targets) in enumerate(it):
            method.step(model, epoch + i / updates)
            images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss = method.loss(net, images, targets, criterion)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            scheduler.step_update(epoch * updates + i + 1)
            if ema is not None:
                ema.update(model, step=epoch * updates + i + 1)
            loss_sum += loss.detach().double() * len(images)
            seen += len(images)
            if i % CHECK_EVERY == 0 or i == updates - 1:  # a sync: only every few steps
                # The epoch's sum is finite iff every loss so far was; every process
                # checks at the same steps, so all stop together and none waits in DDP.
                bad = (~torch.isfinite(loss_sum)).float()
                if dist.active:
                    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
                if bad.item():
                    kept = f"the last checkpoint ({path}) holds epoch {epoch}" if epoch else "no checkpoint was written"
                    raise FloatingPointError(f"the loss became non-finite in epoch {epoch + 1}, by step {i + 1} "
                                             f"(process {dist.rank}'s sum: {float(loss_sum)}); {kept}")
                it.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if dist.active:
            torch.distributed.all_reduce(loss_sum)
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": float(loss_sum) / (seen * dist.world),
                  "lr": optimizer.param_groups[0]["lr"], "epoch_s": round(seconds, 3),
                  "train_images_per_s": round(seen * dist.world / seconds, 2),
                  "keep_rate": getattr(model, "keep_rate", None), "precision": "bf16 autocast" if amp else "fp32"}
        if val_loader is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            record.update(validate(model, method, val_loader, dev, amp))
            if ema is not None:
                method.step(ema.module, epoch + (updates - 1) / updates)  # as the model's last step (keep rate)
                record.update({f"ema_{k}": v for k, v in validate(ema.module, method, val_loader, dev,
                                                                  amp).items()})
        records.append(record)
        if dist.main:
            state = {"config": dataclasses.asdict(config), "method": method.state(), "num_classes": num_classes,
                     "classes": relabel.get("classes") if relabel else None,
                     "epoch": epoch + 1, "records": records, "state_dict": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if ema is not None:
                state["state_dict_ema"] = ema.module.state_dict()
            _atomic_save(state, path)
            with open(os.path.join(config.out, LOG), "a") as f:
                f.write(json.dumps(record) + "\n")
            if not bar:
                print(json.dumps(record), flush=True)
        if dist.active:
            torch.distributed.barrier()
    return {"records": records, "checkpoint": path, "config": dataclasses.asdict(config)}
