"""Clean datasets read without BackdoorBench and without network access, and the record's poisoned test set.

``load_clean_split(dataset, root, train)`` returns a dataset of raw ``(PIL image, int label)`` pairs —
BackdoorBench's "dataset without transform" — from the folder BackdoorBench would use
(``<dataset_path>/<dataset>``), in one of these layouts:

* cifar10: ``cifar-10-batches-py/`` (torchvision's pickles, read here without its md5 check) or
  ``train/<class>/*`` + ``test/<class>/*`` image folders;
* cifar100: ``cifar-100-python/`` or image folders;
* gtsrb, tiny: image folders (``train``/``Train`` and ``test``/``Test``/``val``; Tiny-ImageNet's
  ``val/val_annotations.txt`` is understood);
* mnist: torchvision's ``MNIST/raw`` files (never downloaded).

Image-folder classes are ordered like torchvision's ImageFolder (numerically when all names are numbers).
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

from fst_plugin.data.transforms import dataset_info
from fst_plugin.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


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


class ImageFolderDataset(tv_datasets.ImageFolder):
    """torchvision's ImageFolder, with numeric class names sorted as numbers (GTSRB's 0..42)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in Path(directory).iterdir() if e.is_dir())
        if classes and all(c.isdigit() for c in classes):
            classes.sort(key=int)
        if not classes:
            raise DataError(f"no class folders in {directory}", "put the images in <split>/<class>/ folders")
        return classes, {c: i for i, c in enumerate(classes)}


class TinyValDataset(Dataset):
    """Tiny-ImageNet's flat ``val/images`` folder labelled by ``val_annotations.txt``."""

    def __init__(self, folder: Path, class_to_idx: dict[str, int]) -> None:
        self.samples = []
        for line in (folder / "val_annotations.txt").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in class_to_idx:
                self.samples.append((folder / "images" / parts[0], class_to_idx[parts[1]]))
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        with Image.open(path) as img:
            return img.convert("RGB"), target


def _first_existing(root: Path, names: Sequence[str]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _image_folder(root: Path, train: bool, dataset: str) -> Dataset:
    split = _first_existing(root, ["train", "Train"] if train else ["test", "Test", "val", "Val"])
    if split is None:
        raise DataError(
            f"dataset folder {root} has no {'train' if train else 'test'} split in a known layout",
            f"point --dataset_path at the folder holding {dataset}/ with {'train' if train else 'test'}/<class>/ images"
            + (" (for CIFAR-10: make_cifar10.py DEST --batches-py)" if dataset == "cifar10" else ""),
        )
    try:
        if dataset == "tiny" and (split / "val_annotations.txt").is_file():
            train_folder = ImageFolderDataset(str(_first_existing(root, ["train", "Train"]) or split))
            return TinyValDataset(split, train_folder.class_to_idx)
        return ImageFolderDataset(str(split), is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
    except FileNotFoundError as exc:  # torchvision: a class folder without any image
        raise DataError(f"dataset folder {split} has a class folder with no image ({str(exc).split('. ')[0]})",
                        f"put the images in {split}/<class>/ folders ({', '.join(IMAGE_EXTENSIONS)})") from None


def load_clean_split(dataset: str, root: str | Path, train: bool) -> Dataset:
    """The clean train or test split of ``dataset`` under ``root`` as raw (PIL, label) pairs."""
    info = dataset_info(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist",
                        f"pass --dataset_path pointing at the folder that holds {dataset}/"
                        + (" (create it with make_cifar10.py DEST --batches-py)" if dataset == "cifar10" else ""))
    if dataset == "cifar10" and (root / "cifar-10-batches-py").is_dir():
        ds = _cifar_pickles(root / "cifar-10-batches-py", train,
                            [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels")
    elif dataset == "cifar100" and (root / "cifar-100-python").is_dir():
        ds = _cifar_pickles(root / "cifar-100-python", train, ["train"], "test", "fine_labels")
    elif dataset == "mnist":
        try:
            ds = tv_datasets.MNIST(str(root), train=train, download=False)
        except RuntimeError:
            raise DataError(f"no MNIST files under {root}", "put torchvision's MNIST/raw files there") from None
    else:
        ds = _image_folder(root, train, dataset)
    classes = len(set(getattr(ds, "targets", [])))
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
