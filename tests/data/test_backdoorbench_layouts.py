"""Every dataset in the exact folder layout BackdoorBench reads (``<dataset_path>/<dataset>``), with synthetic images:
the standalone reader gives BackdoorBench's labels, the per-image and the tensor path give the same inputs with
BackdoorBench's transform, and an absent or malformed dataset is a one-line error naming the layout expected.

Layouts, from BackdoorBench's utils/aggregate_block/dataset_and_transform_generate.py (dataset_and_transform_generate):
cifar100 = torchvision's CIFAR100 (``cifar-100-python/``), mnist = torchvision's MNIST (``MNIST/raw/``), gtsrb =
its dataset/GTSRB.py (``Train/<00000..>/GT-<class>.csv``, ``Test/GT-final_test.csv``), tiny = its dataset/Tiny.py
(``tiny-imagenet-200/{train,val}`` read by ImageFolder; ``val/images`` + ``val_annotations.txt`` as shipped, or
``val/<wnid>/`` as its download re-sorts it).
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fst_plugin.data import DATASETS, TensorBatches, decode, get_transform, load_clean_split
from fst_plugin.errors import DataError

WNIDS = ["n01443537", "n01629819", "n09193705"]


def _pixels(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def _cifar100(root: Path, rng: np.random.Generator) -> dict[bool, list[int]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = {True: [0, 99, 42, 7], False: [5, 99, 0]}
    for train, name in ((True, "train"), (False, "test")):
        data = rng.integers(0, 256, size=(len(labels[train]), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as fh:  # the python-2 pickles torchvision reads: bytes keys
            pickle.dump({b"data": data, b"fine_labels": labels[train], b"coarse_labels": [0] * len(data)}, fh)
    return labels


def _gtsrb(root: Path, rng: np.random.Generator) -> dict[bool, list[int]]:
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    train_labels: list[int] = []
    for class_id, sizes in ((0, [(30, 35), (41, 29)]), (1, [(32, 32)]), (10, [(50, 47), (27, 33)])):
        folder = root / "Train" / f"{class_id:05d}"
        folder.mkdir(parents=True)
        rows = []
        for k, (w, h) in enumerate(sizes):
            name = f"{class_id:05d}_{k:05d}.ppm"
            Image.fromarray(_pixels(rng, h, w)).save(folder / name)
            rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{class_id}\n")
            train_labels.append(class_id)
        (folder / f"GT-{class_id:05d}.csv").write_text(header + "".join(rows))
    test_labels = [10, 0, 42]
    (root / "Test").mkdir()
    rows = []
    for k, label in enumerate(test_labels):
        Image.fromarray(_pixels(rng, 36 + k, 31)).save(root / "Test" / f"{k:05d}.ppm")
        rows.append(f"{k:05d}.ppm;31;{36 + k};5;5;26;{31 + k};{label}\n")
    (root / "Test" / "GT-final_test.csv").write_text(header + "".join(rows))
    return {True: train_labels, False: test_labels}


def _tiny(root: Path, rng: np.random.Generator, sorted_val: bool) -> dict[bool, list[int]]:
    base = root / "tiny-imagenet-200"
    for wnid in WNIDS:
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        for k in range(2):
            gray = wnid == WNIDS[1] and k == 0  # Tiny-ImageNet holds some grayscale JPEGs
            Image.fromarray(_pixels(rng, 64, 64, 1 if gray else 3)).save(images / f"{wnid}_{k}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    (base / "test" / "images").mkdir(parents=True)  # the unlabelled test split: never read
    Image.fromarray(_pixels(rng, 64, 64)).save(base / "test" / "images" / "test_0.JPEG")
    val_wnids = [WNIDS[2], WNIDS[0], WNIDS[2]]
    lines = []
    for k, wnid in enumerate(val_wnids):
        folder = base / "val" / (wnid if sorted_val else "images")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(rng, 64, 64)).save(folder / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63\n")
    if not sorted_val:
        (base / "val" / "val_annotations.txt").write_text("".join(lines))
    val_labels = [WNIDS.index(w) for w in val_wnids]
    return {True: [0, 0, 1, 1, 2, 2], False: sorted(val_labels) if sorted_val else val_labels}


def _mnist(root: Path, rng: np.random.Generator) -> dict[bool, list[int]]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = {True: [7, 1, 4, 9], False: [3, 0]}
    for train, prefix in ((True, "train"), (False, "t10k")):
        n = len(labels[train])
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(labels[train]))
    return labels


LAYOUTS = {"cifar100": _cifar100, "gtsrb": _gtsrb, "mnist": _mnist,
           "tiny": lambda root, rng: _tiny(root, rng, sorted_val=False),
           "tiny-sorted-val": lambda root, rng: _tiny(root, rng, sorted_val=True)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_backdoorbench_layout_reads_with_its_labels_and_both_paths_give_its_transform(layout: str,
                                                                                      tmp_path: Path) -> None:
    name = layout.split("-")[0]
    root = tmp_path / "data" / name  # BackdoorBench: args.dataset_path = f"{args.dataset_path}/{args.dataset}"
    labels = LAYOUTS[layout](root, np.random.default_rng(0))
    info = DATASETS[name]
    for train in (True, False):
        split = load_clean_split(name, root, train=train)
        items = [split[i] for i in range(len(split))]
        assert [label for _, label in items] == labels[train]
        assert all(img.mode == ("L" if info.channels == 1 else "RGB") for img, _ in items)
        transform = get_transform(name, train=False)  # deterministic: Resize, ToTensor, Normalize
        per_image = torch.stack([transform(img) for img, _ in items])
        assert per_image.shape == (len(items), info.channels, info.height, info.width)
        batches = list(TensorBatches(decode(split, name), name, batch_size=3))
        assert torch.allclose(torch.cat([b[0] for b in batches]), per_image, atol=1e-6, rtol=0)
        assert torch.cat([b[1] for b in batches]).tolist() == labels[train]


def test_the_transform_constants_are_backdoorbench_s() -> None:
    """dataset_and_transform_generate.py: get_num_classes, get_input_shape, get_dataset_normalization."""
    assert {n: (i.num_classes, i.img_size, i.mean, i.std) for n, i in DATASETS.items()} == {
        "cifar10": (10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
        "cifar100": (100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        "gtsrb": (43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        "tiny": (200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
        "mnist": (10, (28, 28, 1), (0.5,), (0.5,)),
    }
    for name, info in DATASETS.items():  # get_transform(name, h, w, train) with random_crop_padding=4
        steps = get_transform(name, train=True).transforms
        assert steps[0].size == (info.height, info.width) and steps[1].size == (info.height, info.width)
        assert steps[1].padding == 4


def _one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("name, expected", [
    ("cifar100", "cifar-100-python/"), ("gtsrb", "Test/GT-final_test.csv"), ("mnist", "MNIST/raw/"),
    ("tiny", "tiny-imagenet-200/train/<wnid>/images/")])
def test_an_absent_dataset_names_the_layout_expected(name: str, expected: str, tmp_path: Path) -> None:
    (tmp_path / name).mkdir()
    with pytest.raises(DataError) as err:
        load_clean_split(name, tmp_path / name, train=False)
    assert expected in _one_line(err) and str(tmp_path / name) in str(err.value)
    with pytest.raises(DataError) as err:
        load_clean_split(name, tmp_path / "nowhere" / name, train=True)
    assert "does not exist" in _one_line(err) and expected in str(err.value)


def test_malformed_gtsrb_lists_are_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "gtsrb"
    _gtsrb(root, np.random.default_rng(0))
    (root / "Test" / "00001.ppm").unlink()
    with pytest.raises(DataError, match=r"GT-final_test.csv lists 00001.ppm, which is not in") as err:
        load_clean_split("gtsrb", root, train=False)
    _one_line(err)
    (root / "Train" / "00001" / "GT-00001.csv").unlink()
    with pytest.raises(DataError, match=r"Train/00001 has no GT-00001.csv") as err:
        load_clean_split("gtsrb", root, train=True)
    _one_line(err)
    (root / "Train" / "00010" / "GT-00010.csv").write_text("Filename;Width\nx.ppm;3\n")
    (root / "Train" / "00001" / "GT-00001.csv").write_text("Filename;Width;Height;A;B;C;D;ClassId\n")
    with pytest.raises(DataError, match=r"cannot read GTSRB list .*GT-00010.csv") as err:
        load_clean_split("gtsrb", root, train=True)
    _one_line(err)


def test_malformed_tiny_annotations_are_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    _tiny(root, np.random.default_rng(0), sorted_val=False)
    annotations = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"names class 'n99999999', which has no folder in") as err:
        load_clean_split("tiny", root, train=False)
    _one_line(err)
    annotations.write_text("val_9.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"lists val_9.JPEG, which is not in") as err:
        load_clean_split("tiny", root, train=False)
    _one_line(err)
