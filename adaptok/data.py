"""Data for the lab: real offline images (animal-mnist) and ImageFolder
directories (the ImageNet layout), both served by timm's dataset, transform
and loader factories. The only reader written here is animal-mnist's.

animal-mnist (``pip install --no-deps animal-mnist==0.4``) ships 10,000 real
28 x 28 grayscale animal silhouettes, 1,000 in each of 10 classes
(:data:`ANIMAL_CLASSES`), as two gzip-compressed pickles of numpy arrays; its
own loader imports tensorflow, so they are read here through
``importlib.resources``. The split is fixed: per class, a seeded permutation
(``numpy.random.default_rng(SPLIT_SEED)``) puts 200 images in ``val`` and 800
in ``train`` (8,000 / 2,000 in all), and each split interleaves the classes,
so any prefix of it (``limit=``) is balanced to within one image.

Example::

    >>> loader = adaptok.data.create_loader("animal-mnist", "train", batch_size=128, img_size=28, channels=1)
    >>> loader = adaptok.data.create_loader("/data/imagenet", "val", batch_size=256, img_size=224)
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
import pickle
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

ANIMAL_MNIST = "animal-mnist"
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SPLIT_SEED = 0
VAL_PER_CLASS = 200
SPLITS = ("train", "val")

# Transform settings per source: what timm's factories get unless the caller
# overrides them. animal-mnist's 28 px silhouettes take a milder crop than
# ImageNet's and no colour jitter; evaluation sees the whole image.
DEFAULTS = {
    ANIMAL_MNIST: dict(mean=0.5, std=0.5, crop_pct=1.0, scale=(0.6, 1.0), hflip=0.5, color_jitter=None),
    "folder": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875, scale=(0.08, 1.0),
                   hflip=0.5, color_jitter=0.4),
}


@functools.lru_cache(maxsize=1)
def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images [10000, 28, 28] uint8, labels [10000] int64)``, read-only,
    straight from the installed animal-mnist package."""
    try:
        root = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("data='animal-mnist' needs the animal-mnist package: "
                                  "pip install --no-deps animal-mnist==0.4") from None
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(root.joinpath(name).open("rb")) as f:
            arrays.append(np.asarray(pickle.load(f)))
    images, labels = arrays
    if images.shape != (10000, 28, 28) or images.dtype != np.uint8 or labels.shape != (10000,):
        raise RuntimeError(f"unexpected animal-mnist files: images {images.shape} {images.dtype}, "
                           f"labels {labels.shape}")
    labels = labels.astype(np.int64)
    for a in (images, labels):
        a.setflags(write=False)
    return images, labels


def stratified_split(labels: np.ndarray, val_per_class: int = VAL_PER_CLASS,
                     seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """``{"train": idx, "val": idx}``: per class, a seeded permutation gives
    its first ``val_per_class`` images to ``val`` and the rest to ``train``;
    each split lists the classes round-robin (so prefixes stay balanced)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if not 0 < val_per_class < len(idx):
            raise ValueError(f"val_per_class must be in (0, {len(idx)}), got {val_per_class}")
        parts["val"].append(idx[:val_per_class])
        parts["train"].append(idx[val_per_class:])

    def interleave(chunks):
        width = max(len(c) for c in chunks)
        grid = np.full((width, len(chunks)), -1, dtype=np.int64)
        for j, c in enumerate(chunks):
            grid[:len(c), j] = c
        flat = grid.reshape(-1)
        return flat[flat >= 0]

    return {k: interleave(v) for k, v in parts.items()}


def _check_limit(limit):
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return limit


class AnimalMNIST(Dataset):
    """One split of animal-mnist as ``(image, label)`` pairs: a PIL image
    (mode ``"L"`` for ``channels=1``, ``"RGB"`` for 3: the gray repeated),
    passed through ``transform`` when one is set (timm's
    :func:`create_loader` sets it).

    Args:
        split: ``"train"`` (8,000 images) or ``"val"`` (2,000).
        channels: 1 or 3, as the model's ``in_chans``.
        limit: keep only the first ``limit`` images of the split (balanced).
    """

    classes = ANIMAL_CLASSES

    def __init__(self, split: str = "train", channels: int = 1, transform=None, limit: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        images, labels = animal_mnist_arrays()
        idx = stratified_split(labels)[split]
        if _check_limit(limit) is not None:
            idx = idx[:limit]
        self.indices = idx
        self.images = images[idx]
        self.targets = labels[idx]
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.fromarray(self.images[i], mode="L")
        if self.mode != "L":
            image = image.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])


def source(data: str) -> str:
    """``"animal-mnist"`` or ``"folder"`` for a ``data`` argument; a
    FileNotFoundError naming ``data`` for a path that does not exist."""
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be {ANIMAL_MNIST!r} or an ImageFolder directory, got {type(data).__name__}")
    if str(data) == ANIMAL_MNIST:
        return ANIMAL_MNIST
    if not os.path.isdir(data):
        raise FileNotFoundError(f"data must be {ANIMAL_MNIST!r} or an ImageFolder directory (class folders, "
                                f"optionally under train/ and val/); {str(data)!r} is not a directory")
    return "folder"


def create_dataset(data: str, split: str = "train", channels: int = 3, limit: Optional[int] = None) -> Dataset:
    """The ``split`` of ``data``: animal-mnist (:class:`AnimalMNIST`) or an
    ImageFolder root, read by ``timm.data.create_dataset`` (``root/split``
    when that folder exists, else ``root`` itself). Images come as PIL, in
    mode ``"L"`` for ``channels=1`` and ``"RGB"`` for 3. ``limit`` keeps the
    first images: balanced for animal-mnist, in timm's path order (so the
    first classes) for a folder."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_limit(limit)
    if source(data) == ANIMAL_MNIST:
        return AnimalMNIST(split, channels=channels, limit=limit)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    from timm.data import create_dataset as timm_dataset

    try:
        dataset = timm_dataset("", root=str(data), split=split, input_img_mode="L" if channels == 1 else "RGB")
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise FileNotFoundError(f"data {str(data)!r} holds no images for split {split!r}: {e}") from None
    if limit is not None:
        dataset = _Transformed(torch.utils.data.Subset(dataset, range(min(limit, len(dataset)))))
    return dataset


# The transform settings that evaluation shares with training.
EVAL_KEYS = ("mean", "std", "crop_pct", "crop_mode", "crop_border_pixels", "interpolation")


def eval_settings(aug: dict) -> dict:
    """The keys of training overrides ``aug`` that evaluation must use too
    (normalization, crop, interpolation)."""
    return {k: v for k, v in aug.items() if k in EVAL_KEYS}


def class_count(data: str) -> int:
    """The number of classes of ``data`` (an ImageFolder's: its class
    folders under ``train/``, or under the root)."""
    if source(data) == ANIMAL_MNIST:
        return len(ANIMAL_CLASSES)
    return len(create_dataset(data, "train", limit=1).subset.dataset.reader.class_to_idx)


class _Transformed(Dataset):
    """A Subset with a ``transform`` attribute timm's loader can set."""

    def __init__(self, subset):
        self.subset, self.transform = subset, None

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, i):
        image, label = self.subset[i]
        return (self.transform(image) if self.transform is not None else image), label


class Relabelled(Dataset):
    """``dataset`` with its labels replaced by ``targets`` (one per image, in
    the dataset's order), e.g. ReViT's token-length labels for its assigner.
    ``transform`` is the wrapped dataset's, so timm's loader can set it."""

    def __init__(self, dataset: Dataset, targets):
        targets = torch.as_tensor(targets)
        if targets.dim() != 1 or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be one integer per image, got a {targets.dtype} tensor of shape "
                             f"{tuple(targets.shape)}")
        if len(targets) != len(dataset):
            raise ValueError(f"targets must have one entry per image of the split ({len(dataset)}), "
                             f"got {len(targets)}")
        self.dataset, self.targets = dataset, targets.long().tolist()

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], self.targets[i]


def model_input(model, img_size: Optional[int] = None) -> tuple[int, int]:
    """``(channels, side)`` of the images ``model`` takes: the channels of
    its first convolution, and ``img_size``, else a ViT's patch-embedding
    size, else timm's ``pretrained_cfg`` input size."""
    channels = next((m.in_channels for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if channels is None:
        raise ValueError(f"{type(model).__name__} has no convolution to read its input channels from")
    if img_size is None:
        embed = getattr(model, "patch_embed", None)
        if embed is not None and getattr(embed, "img_size", None) is not None:
            img_size = int(embed.img_size[0])
        else:
            img_size = int(getattr(model, "pretrained_cfg", {}).get("input_size", (0, 224, 224))[-1])
    return int(channels), int(img_size)


def create_loader(data: str, split: str, batch_size: int, img_size: int, channels: int = 3, *,
                  training: Optional[bool] = None, distributed: bool = False, workers: int = 0,
                  limit: Optional[int] = None, targets=None, **transform) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(images [b, channels, img_size, img_size] float32,
    labels [b] int64)`` from ``timm.data.create_loader``.

    Args:
        data: ``"animal-mnist"`` or an ImageFolder root.
        split: ``"train"`` or ``"val"``.
        batch_size: images per batch (per process under DDP).
        img_size: the model's input side; evaluation resizes and center-crops
            to it (``crop_pct``), training takes timm's random resized crop.
        training: random augmentation, shuffling and dropping the last
            partial batch (default: ``split == "train"``).
        distributed: a DistributedSampler per process (torch.distributed must
            be initialized; call ``loader.sampler.set_epoch`` each epoch).
        limit: only the first ``limit`` images of the split.
        targets: labels replacing the split's, one per image (after
            ``limit``), e.g. token-length labels (:class:`Relabelled`).
        transform: overrides of :data:`DEFAULTS` and any other keyword of
            ``timm.data.create_loader`` (``scale``, ``hflip``,
            ``color_jitter``, ``auto_augment``, ``re_prob``, ``no_aug`` ...).
    """
    from timm.data import create_loader as timm_loader

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    training = split == "train" if training is None else training
    dataset = create_dataset(data, split, channels=channels, limit=limit)
    if targets is not None:
        dataset = Relabelled(dataset, targets)
    settings = dict(DEFAULTS[source(data)])
    settings.update(transform)
    for key in ("mean", "std"):
        value = settings[key]
        settings[key] = tuple(value) if isinstance(value, (tuple, list)) else (float(value),) * channels
        if len(settings[key]) != channels:
            settings[key] = (sum(settings[key]) / len(settings[key]),) * channels
    # Workers start afresh every epoch, seeded from the main process's RNG, so
    # reseeding it per epoch fixes every augmentation (and resume is exact).
    settings.setdefault("persistent_workers", False)
    return timm_loader(dataset, input_size=(channels, img_size, img_size), batch_size=batch_size,
                       is_training=training, use_prefetcher=False, num_workers=workers, distributed=distributed,
                       **settings)
