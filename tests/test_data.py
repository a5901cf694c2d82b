"""adaptok.data: the animal-mnist reader and split, the loaders timm builds
for it and for ImageFolder directories, and their input errors."""
import numpy as np
import pytest
import torch

from adaptok import data

pytest.importorskip("animal_mnist")


def test_arrays_are_the_package_files():
    images, labels = data.animal_mnist_arrays()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    assert images.min() == 0 and images.max() == 255
    assert not images.flags.writeable


def test_split_sizes_balance_disjoint_and_deterministic():
    _, labels = data.animal_mnist_arrays()
    split = data.stratified_split(labels)
    train, val = split["train"], split["val"]
    assert len(train) == 8000 and len(val) == 2000
    assert len(set(train.tolist()) | set(val.tolist())) == 10000  # disjoint, and every image is somewhere
    assert np.bincount(labels[train]).tolist() == [800] * 10
    assert np.bincount(labels[val]).tolist() == [200] * 10
    again = data.stratified_split(labels)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = data.stratified_split(labels, seed=1)
    assert not np.array_equal(split["val"], other["val"])
    # Any prefix is balanced to within one image per class.
    for n in (10, 57, 1000):
        counts = np.bincount(labels[train[:n]], minlength=10)
        assert counts.max() - counts.min() <= 1


def test_dataset_images_labels_and_channels():
    ds = data.AnimalMNIST("val", channels=1)
    images, labels = data.animal_mnist_arrays()
    image, label = ds[3]
    assert image.mode == "L" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image), images[ds.indices[3]]) and label == labels[ds.indices[3]]
    rgb, _ = data.AnimalMNIST("val", channels=3)[3]
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and (arr == arr[..., :1]).all()  # the gray repeated
    assert len(data.AnimalMNIST("train", limit=30)) == 30


def test_eval_loader_pixels():
    loader = data.create_loader("animal-mnist", "val", 64, 28, 1, limit=64)
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = torch.from_numpy(data.animal_mnist_arrays()[0][loader.dataset.indices[:64]]).float()
    # Evaluation sees the whole image (crop 1.0), normalized to [-1, 1] with mean = std = 0.5.
    torch.testing.assert_close(x[:, 0], raw / 127.5 - 1, atol=1e-6, rtol=0)
    x3, _ = next(iter(data.create_loader("animal-mnist", "val", 8, 28, 3, limit=8)))
    assert x3.shape == (8, 3, 28, 28) and torch.equal(x3[:, 0], x3[:, 2])


def test_train_loader_is_seeded_and_augments():
    def first():
        torch.manual_seed(0)
        import random
        random.seed(0)
        return next(iter(data.create_loader("animal-mnist", "train", 16, 28, 1, limit=64)))

    (a, ya), (b, yb) = first(), first()
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6
    plain = next(iter(data.create_loader("animal-mnist", "train", 64, 28, 1, limit=64, training=False)))[0]
    assert not torch.equal(a, plain[:16])  # shuffled and/or augmented


def make_folder(root, classes=("ant", "bee", "cat"), per_class=4, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    assert data.source(str(root)) == "folder" and data.class_count(str(root)) == 3
    loader = data.create_loader(str(root), "val", 5, 16, 3)
    xs, ys = zip(*loader)
    assert [tuple(x.shape) for x in xs] == [(5, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16)]
    assert sorted(torch.cat(ys).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    gray = next(iter(data.create_loader(str(root), "train", 4, 16, 1, limit=6)))[0]
    assert gray.shape == (4, 1, 16, 16)
    assert len(data.create_loader(str(root), "train", 4, 16, 3, limit=6).dataset) == 6


def test_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data must be 'animal-mnist' or an ImageFolder"):
        data.create_loader(str(tmp_path / "missing"), "train", 4, 28)
    with pytest.raises(TypeError, match="data must be"):
        data.source(3)
    with pytest.raises(ValueError, match="split must be one of"):
        data.create_dataset("animal-mnist", "test")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        data.create_loader("animal-mnist", "train", 0, 28)
    with pytest.raises(ValueError, match="img_size must be a positive int"):
        data.create_loader("animal-mnist", "train", 4, 0)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        data.AnimalMNIST("train", channels=2)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        data.AnimalMNIST("train", limit=0)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        data.create_dataset(str(tmp_path / "empty"), "val")
