"""Per-dataset facts and the train/test transforms BackdoorBench applies.

Every fact is BackdoorBench's, from utils/aggregate_block/dataset_and_transform_generate.py (commit f02e353):
class counts from ``get_num_classes``, (height, width, channels) from ``get_input_shape``, mean and std from
``get_dataset_normalization``, and the steps from ``get_transform(dataset, h, w, train, random_crop_padding=4)``:
Train: Resize((h, w)), RandomCrop((h, w), padding=4), RandomHorizontalFlip (cifar10 only), ToTensor, Normalize.
Test: Resize((h, w)), ToTensor, Normalize.
"""
from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms

from fst_plugin.errors import ConfigError

CROP_PADDING = 4  # get_transform(..., random_crop_padding=4)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def img_size(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        # name, get_num_classes, get_input_shape (h, w, c), get_dataset_normalization (mean, std)
        DatasetInfo("cifar10", 10, 32, 32, 3, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
        DatasetInfo("cifar100", 100, 32, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        DatasetInfo("gtsrb", 43, 32, 32, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        DatasetInfo("tiny", 200, 64, 64, 3, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
        DatasetInfo("mnist", 10, 28, 28, 1, (0.5,), (0.5,)),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}", f"use one of {', '.join(DATASETS)}")
    return DATASETS[name]


def get_transform(dataset: str, train: bool) -> transforms.Compose:
    """BackdoorBench's ``get_transform(dataset, h, w, train)`` for the dataset's own size."""
    info = dataset_info(dataset)
    size = (info.height, info.width)
    steps: list = [transforms.Resize(size)]
    if train:
        steps.append(transforms.RandomCrop(size, padding=CROP_PADDING))
        if dataset == "cifar10":
            steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    return transforms.Compose(steps)
