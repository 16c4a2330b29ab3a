"""Standalone dataset readers for every layout they claim, and BackdoorBench's transforms."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fst_plugin.data import DATASETS, get_transform, load_clean_split
from fst_plugin.errors import DataError


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _write_folder(root: Path, labels: list[str], size: int = 32) -> None:
    for i, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_images(1, size, i)[0]).save(root / label / f"{i}.png")


def test_cifar10_pickles_are_read_without_torchvision(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    imgs = _images(12)
    flat = imgs.transpose(0, 3, 1, 2).reshape(12, -1)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": flat[:2], b"labels": [i % 10, (i + 1) % 10]}, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": flat[:3], "labels": [0, 1, 2]}, fh)
    train = load_clean_split("cifar10", tmp_path, train=True)
    test = load_clean_split("cifar10", tmp_path, train=False)
    assert len(train) == 10 and len(test) == 3
    image, label = train[0]
    assert isinstance(image, Image.Image) and label == 1
    assert np.array_equal(np.asarray(image), imgs[0])


def test_dataset_pickles_cannot_run_code(tmp_path: Path) -> None:
    import os
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": Payload(), "labels": []}, fh)
    with pytest.raises(DataError, match="is not allowed in a dataset pickle"):
        load_clean_split("cifar10", tmp_path, train=True)
    assert not (tmp_path / "pwned").exists()


def test_cifar100_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    flat = _images(4).transpose(0, 3, 1, 2).reshape(4, -1)
    for name in ("train", "test"):
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": flat, b"fine_labels": [0, 99, 5, 42]}, fh)
    assert [load_clean_split("cifar100", tmp_path, train=True)[i][1] for i in range(4)] == [0, 99, 5, 42]


def test_cifar10_image_folders_follow_torchvision_label_order(tmp_path: Path) -> None:
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_folder(tmp_path / "train", classes)
    _write_folder(tmp_path / "test", classes[:3])
    train = load_clean_split("cifar10", tmp_path, train=True)
    assert train.class_to_idx == {c: i for i, c in enumerate(classes)}
    assert len(load_clean_split("cifar10", tmp_path, train=False)) == 3


def test_gtsrb_numeric_class_folders_sort_as_numbers(tmp_path: Path) -> None:
    _write_folder(tmp_path / "Train", ["0", "1", "2", "10", "42"])
    _write_folder(tmp_path / "Test", ["0", "10"])
    train = load_clean_split("gtsrb", tmp_path, train=True)
    assert train.classes == ["0", "1", "2", "10", "42"] and train.class_to_idx["10"] == 3


def test_tiny_imagenet_val_annotations(tmp_path: Path) -> None:
    for wnid in ("n01", "n02"):
        (tmp_path / "train" / wnid / "images").mkdir(parents=True)
        Image.fromarray(_images(1, 64)[0]).save(tmp_path / "train" / wnid / "images" / f"{wnid}_0.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    for name in ("val_0.JPEG", "val_1.JPEG"):
        Image.fromarray(_images(1, 64)[0]).save(tmp_path / "val" / "images" / name)
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\nval_1.JPEG\tn01\t0\t0\t63\t63\n")
    val = load_clean_split("tiny", tmp_path, train=False)
    assert [val[i][1] for i in range(2)] == [1, 0]
    assert val[0][0].size == (64, 64)
    assert len(load_clean_split("tiny", tmp_path, train=True)) == 2


def test_mnist_raw_files_are_read_without_download(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 3, 28, 28) + pixels.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 3) + bytes([7, 1, 4]))
    train = load_clean_split("mnist", tmp_path, train=True)
    image, label = train[0]
    assert label == 7 and image.mode == "L" and np.array_equal(np.asarray(image), pixels[0])


def test_mnist_with_more_images_than_classes_is_counted_by_label_value(tmp_path: Path) -> None:
    """torchvision's MNIST keeps its targets as one tensor; counted as a set of 0-d tensors, 30 images of 10
    classes looked like 30 classes and the real dataset was refused."""
    from tests.builders import write_mnist_raw

    labels = np.arange(30) % 10
    for train in (True, False):
        write_mnist_raw(tmp_path, train, _images(30, 28)[..., :1], labels)
    split = load_clean_split("mnist", tmp_path, train=True)
    assert len(split) == 30 and sorted({int(t) for t in split.targets}) == list(range(10))
    labels[0] = 10  # an eleventh class is still refused
    write_mnist_raw(tmp_path, True, _images(30, 28)[..., :1], labels)
    with pytest.raises(DataError, match="holds 11 classes but mnist has 10"):
        load_clean_split("mnist", tmp_path, train=True)


def test_missing_or_unknown_layouts_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_clean_split("cifar10", tmp_path / "nope", train=True)
    (tmp_path / "random_stuff").mkdir()
    with pytest.raises(DataError, match="no train split in a known layout"):
        load_clean_split("cifar10", tmp_path, train=True)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_transforms_match_backdoorbench(name: str) -> None:
    info = DATASETS[name]
    train, test = get_transform(name, train=True), get_transform(name, train=False)
    train_steps = [type(t) for t in train.transforms]
    expected = [transforms.Resize, transforms.RandomCrop] + ([transforms.RandomHorizontalFlip] if name == "cifar10" else [])
    assert train_steps == expected + [transforms.ToTensor, transforms.Normalize]
    assert [type(t) for t in test.transforms] == [transforms.Resize, transforms.ToTensor, transforms.Normalize]
    assert tuple(test.transforms[-1].mean) == info.mean and tuple(test.transforms[-1].std) == info.std
    mode = "L" if info.channels == 1 else "RGB"
    out = test(Image.new(mode, (info.width, info.height)))
    assert out.shape == (info.channels, info.height, info.width) and out.dtype == torch.float32
    assert train.transforms[1].padding == 4
