"""Clean datasets read without BackdoorBench and without network access, and the record's poisoned test set.

``load_clean_split(dataset, root, train)`` returns a dataset of raw ``(PIL image, int label)`` pairs —
BackdoorBench's "dataset without transform" — from the folder BackdoorBench would use
(``<dataset_path>/<dataset>``), in one of these layouts:

* cifar10, cifar100: torchvision's ``cifar-10-batches-py/`` / ``cifar-100-python/`` pickles (read here without
  torchvision's md5 check) or ``train/<class>/*`` + ``test/<class>/*`` image folders;
* gtsrb, tiny: the folders and lists BackdoorBench's own readers take (see :mod:`fst_plugin.data.folders`);
* mnist: torchvision's ``MNIST/raw`` files (never downloaded).

A missing or unreadable layout is a one-line ``DataError`` that names the layout expected (``EXPECTED_LAYOUT``).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, TensorDataset, default_collate
from torchvision import datasets as tv_datasets

from fst_plugin.data.folders import gtsrb_split, image_folder, tiny_split
from fst_plugin.data.transforms import dataset_info
from fst_plugin.errors import DataError

# What BackdoorBench's dataset_and_transform_generate (utils/aggregate_block/dataset_and_transform_generate.py)
# reads under <dataset_path>/<dataset>: torchvision's CIFAR10 / CIFAR100 / MNIST folders, its dataset/GTSRB.py's
# CSV lists and dataset/Tiny.py's ImageFolder splits.
EXPECTED_LAYOUT = {
    "cifar10": "cifar-10-batches-py/ (torchvision's; make_cifar10.py DEST --batches-py) "
               "or train/<class>/ + test/<class>/",
    "cifar100": "cifar-100-python/ (torchvision's) or train/<class>/ + test/<class>/",
    "gtsrb": "Train/<00000..00042>/GT-<class>.csv + images and Test/GT-final_test.csv + images",
    "tiny": "tiny-imagenet-200/train/<wnid>/images/ and tiny-imagenet-200/val/ (images/ + val_annotations.txt)",
    "mnist": "MNIST/raw/ (torchvision's train-/t10k- idx files)",
}


class _DataPickleUnpickler(pickle.Unpickler):
    """Unpickler for dataset pickles: plain containers and NumPy arrays only, never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset pickle")


def _read_data_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = _DataPickleUnpickler(io.BytesIO(fh.read()), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read dataset file {path} ({exc})",
                        "re-create the dataset folder (for CIFAR-10: make_cifar10.py DEST --batches-py)") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


class ArrayImageDataset(Dataset):
    """Images held as a uint8 array (N, H, W, C), returned as PIL images with int labels."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]) -> None:
        self.data = images
        self.targets = [int(t) for t in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]


def _cifar_pickles(folder: Path, train: bool, files_train: list[str], file_test: str,
                   label_key: str) -> ArrayImageDataset:
    images, labels = [], []
    for name in (files_train if train else [file_test]):
        entry = _read_data_pickle(folder / name)
        try:
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(entry[label_key])
        except (KeyError, ValueError) as exc:
            raise DataError(f"dataset file {folder / name} is not a CIFAR batch ({exc})",
                            "re-create the dataset folder") from None
    return ArrayImageDataset(np.concatenate(images), labels)


def _first_existing(root: Path, names: Sequence[str]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _no_split(root: Path, dataset: str, train: bool) -> DataError:
    split = "train" if train else "test"
    return DataError(f"dataset folder {root} has no {split} split in a known layout",
                     f"put {dataset} under --dataset_path/{dataset} as {EXPECTED_LAYOUT[dataset]}")


def _folder_split(root: Path, train: bool, dataset: str) -> Dataset:
    """GTSRB's CSV lists, Tiny-ImageNet's folders, else ``train/<class>/`` + ``test/<class>/`` image folders."""
    special = {"gtsrb": gtsrb_split, "tiny": tiny_split}.get(dataset)
    found = special(root, train) if special else None
    if found is not None:
        return found
    split = _first_existing(root, ["train", "Train"] if train else ["test", "Test", "val", "Val"])
    if split is None:
        raise _no_split(root, dataset, train)
    return image_folder(split)


def load_clean_split(dataset: str, root: str | Path, train: bool) -> Dataset:
    """The clean train or test split of ``dataset`` under ``root`` as raw (PIL, label) pairs."""
    info = dataset_info(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist",
                        f"pass --dataset_path pointing at the folder that holds {dataset}/, laid out as "
                        f"{EXPECTED_LAYOUT[dataset]}")
    if dataset == "cifar10" and (root / "cifar-10-batches-py").is_dir():
        ds = _cifar_pickles(root / "cifar-10-batches-py", train,
                            [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels")
    elif dataset == "cifar100" and (root / "cifar-100-python").is_dir():
        ds = _cifar_pickles(root / "cifar-100-python", train, ["train"], "test", "fine_labels")
    elif dataset == "mnist":
        try:
            ds = tv_datasets.MNIST(str(root), train=train, download=False)
        except RuntimeError:
            raise DataError(f"no MNIST files under {root}", f"put them there as {EXPECTED_LAYOUT['mnist']}") from None
    else:
        ds = _folder_split(root, train, dataset)
    # by value: torchvision's MNIST keeps its targets as one tensor, whose 0-d elements never compare equal in a set
    classes = len(np.unique(np.asarray(getattr(ds, "targets", []))))
    if classes > info.num_classes:
        raise DataError(f"dataset folder {root} holds {classes} classes but {dataset} has {info.num_classes}",
                        "check --dataset and --dataset_path")
    return ds


class PoisonedTestSet(Dataset):
    """The record's poisoned test images (``PoisonedImage`` entries), yielding BackdoorBench's 5-tuples.

    Items: (image, backdoor label, original index, 1, original label).
    """

    def __init__(self, entries: Sequence[Any], channels: int = 3,
                 transform: Optional[Callable] = None) -> None:
        self.entries = list(entries)
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[Any, int, int, int, int]:
        entry = self.entries[index]  # a record's PoisonedImage
        with Image.open(entry.path) as img:
            image = img.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, entry.bd_label, entry.original_index, 1, entry.original_label


class TransformedDataset(Dataset):
    """``base`` (optionally restricted to ``indices``) with ``transform`` applied to each item's image."""

    def __init__(self, base: Dataset, transform: Optional[Callable] = None,
                 indices: Optional[Sequence[int]] = None) -> None:
        self.base = base
        self.transform = transform
        self.indices = list(indices) if indices is not None else None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.base[self.indices[index] if self.indices is not None else index]
        image = self.transform(item[0]) if self.transform is not None else item[0]
        return (image, *item[1:])


def materialise(dataset: Dataset) -> TensorDataset:
    """Decode and transform every item once (for deterministic test transforms): evaluating on it again costs
    forward passes only, not PNG decoding and PIL transforms."""
    return TensorDataset(*default_collate([dataset[i] for i in range(len(dataset))]))
