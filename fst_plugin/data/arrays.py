"""A clean split as plain arrays: what the attack trainer, the demo and the benchmark feed on."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fst_plugin.data.datasets import load_clean_split


def as_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) of a clean split, in the order the defenses' loaders read it.

    torchvision's CIFAR sets hold the array already; an image folder is decoded once, image by image."""
    if hasattr(dataset, "data") and isinstance(dataset.data, np.ndarray):
        return dataset.data, np.asarray(dataset.targets, dtype=np.int64)
    images = [np.asarray(dataset[i][0].convert("RGB")) for i in range(len(dataset))]
    return np.stack(images), np.asarray(dataset.targets, dtype=np.int64)


def load_split_arrays(dataset: str, folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`as_arrays` of ``dataset``'s clean train or test split found in ``folder``."""
    return as_arrays(load_clean_split(dataset, folder, train))
