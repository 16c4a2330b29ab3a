"""Readers of the image-folder datasets in the layouts BackdoorBench reads (``<dataset_path>/<dataset>`` = ``root``).

* GTSRB (BackdoorBench's ``dataset/GTSRB.py``): ``root/Train/<00000..00042>/GT-<class>.csv`` and
  ``root/Test/GT-final_test.csv``, ';'-separated with a header row, the file name in column 0 (relative to the
  CSV's folder) and the label in column 7 (``ClassId``). Without the CSVs, ``Train/<class>/`` and ``Test/<class>/``
  image folders.
* Tiny-ImageNet (BackdoorBench's ``dataset/Tiny.py``, torchvision's ImageFolder on each split):
  ``root/tiny-imagenet-200/train/<wnid>/images/*.JPEG`` and ``val/`` either as the archive ships it
  (``val/images/`` + ``val_annotations.txt``) or re-sorted into ``val/<wnid>/`` (as BackdoorBench's download
  leaves it). Validation labels follow the training split's class indices. ``root/train`` + ``root/val`` work too.
* Any other ``train/<class>/`` + ``test/<class>/`` folders (CIFAR-10 as image folders).

Classes are ordered like torchvision's ImageFolder (numerically when all names are numbers). Every image is
returned as an RGB PIL image with an int label.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from fst_plugin.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
TINY_FOLDER = "tiny-imagenet-200"


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolderDataset(tv_datasets.ImageFolder):
    """torchvision's ImageFolder, with numeric class names sorted as numbers (GTSRB's 0..42)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in Path(directory).iterdir() if e.is_dir())
        if classes and all(c.isdigit() for c in classes):
            classes.sort(key=int)
        if not classes:
            raise DataError(f"no class folders in {directory}", "put the images in <split>/<class>/ folders")
        return classes, {c: i for i, c in enumerate(classes)}


class LabelledFiles(Dataset):
    """(image path, label) pairs read as RGB PIL images: GTSRB's CSV lists, Tiny-ImageNet's validation split."""

    def __init__(self, samples: Sequence[tuple[Path, int]]) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        with Image.open(path) as img:
            return img.convert("RGB"), target


def image_folder(split: Path) -> ImageFolderDataset:
    """``split/<class>/**/<image>`` as an ImageFolder, or a one-line error."""
    try:
        return ImageFolderDataset(str(split), is_valid_file=_is_image)
    except FileNotFoundError as exc:  # torchvision: a class folder without any image
        raise DataError(f"dataset folder {split} has a class folder with no image ({str(exc).split('. ')[0]})",
                        f"put the images in {split}/<class>/ folders ({', '.join(IMAGE_EXTENSIONS)})") from None


def _checked(samples: list[tuple[Path, int]], listing: Path) -> LabelledFiles:
    missing = next((path for path, _ in samples if not path.is_file()), None)
    if missing is not None:
        raise DataError(f"{listing} lists {missing.name}, which is not in {missing.parent}",
                        "restore the dataset's images, or remove the entry")
    return LabelledFiles(samples)


def _gtsrb_rows(listing: Path) -> list[tuple[Path, int]]:
    try:
        with open(listing, newline="") as fh:
            rows = list(csv.reader(fh, delimiter=";"))[1:]
        return [(listing.parent / row[0], int(row[7])) for row in rows if row]
    except (OSError, IndexError, ValueError) as exc:
        raise DataError(f"cannot read GTSRB list {listing} ({exc})",
                        "use GTSRB's ';'-separated GT-*.csv with the file name in column 0 and ClassId in column 7"
                        ) from None


def gtsrb_split(root: Path, train: bool) -> Optional[Dataset]:
    """GTSRB as BackdoorBench reads it, from the CSV lists; None when ``root`` has none for this split."""
    if not train:
        listing = root / "Test" / "GT-final_test.csv"
        return _checked(_gtsrb_rows(listing), listing) if listing.is_file() else None
    folder = root / "Train"
    listings = sorted(folder.glob("*/GT-*.csv")) if folder.is_dir() else []
    if not listings:
        return None
    unlisted = [d.name for d in sorted(folder.iterdir()) if d.is_dir() and not (d / f"GT-{d.name}.csv").is_file()]
    if unlisted:
        raise DataError(f"GTSRB class folder {folder / unlisted[0]} has no GT-{unlisted[0]}.csv",
                        f"restore the training split's lists ({folder}/<00000..00042>/GT-<class>.csv)")
    return _checked([row for listing in listings for row in _gtsrb_rows(listing)], folder)


def tiny_split(root: Path, train: bool) -> Optional[Dataset]:
    """Tiny-ImageNet's train or val split (see the module docstring); None when ``root`` holds neither layout."""
    base = root / TINY_FOLDER if (root / TINY_FOLDER).is_dir() else root
    train_folder, val_folder = base / "train", base / "val"
    if not train_folder.is_dir() or not (train or val_folder.is_dir()):
        return None
    classes = image_folder(train_folder)
    if train:
        return classes
    annotations = val_folder / "val_annotations.txt"
    if annotations.is_file():
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        unknown = next((r for r in rows if len(r) < 2 or r[1] not in classes.class_to_idx), None)
        if unknown is not None:
            raise DataError(f"{annotations} names class {unknown[1] if len(unknown) > 1 else '?'!r}, "
                            f"which has no folder in {train_folder}", "use the archive's own train/ and val/ folders")
        return _checked([(val_folder / "images" / r[0], classes.class_to_idx[r[1]]) for r in rows], annotations)
    val = image_folder(val_folder)
    unknown_wnid = next((c for c in val.classes if c not in classes.class_to_idx), None)
    if unknown_wnid is not None:
        raise DataError(f"{val_folder / unknown_wnid} is a class with no folder in {train_folder}",
                        "use the archive's own train/ and val/ folders")
    return LabelledFiles([(Path(p), classes.class_to_idx[val.classes[t]]) for p, t in val.samples])
