"""Decode once, then batch on the device: the tensor data path.

BackdoorBench's loaders decode every PNG and run per-image PIL transforms in DataLoader workers, every epoch.
Here a dataset of ``(PIL image, label, ...)`` items (a clean split from ``load_clean_split``, a
``TransformedDataset`` subset, the record's ``PoisonedTestSet``) is decoded ONCE by ``decode``: each image
gets the deterministic part of BackdoorBench's transform, ``Resize`` to the dataset's size (the very
torchvision ``Resize`` that ``get_transform`` uses, on the PIL image), and the result is stored as uint8
``(N, C, H, W)`` with every other item field as an int64 tensor (``TensorImages``).

``TensorBatches`` then yields batches the way a DataLoader over the per-image path does — ``(inputs, labels,
*other fields)``, so item[0] are the inputs, item[1] the labels and, for a poisoned test set, item[4] the
original labels — with the random part of the train transform (crop, flip: ``tensor_transforms``) and the
normalisation done on whole batches on the device. ``core.tuning.tune`` and ``core.metrics.evaluate_backdoor``
consume it unchanged.

Memory bound. The decoded uint8 set costs ``N·C·H·W`` bytes (CIFAR-10's 10k clean + 9k poisoned test images:
58 MB; Tiny-ImageNet's 10k test images: 123 MB). A set above ``MAX_DECODED_BYTES`` (1 GiB; Tiny-ImageNet's
whole 100k training split is 1.2 GB) is not decoded: ``fits_tensor_path`` says so (and logs it), and the
caller must use the per-image path. On CUDA a set stays resident on the GPU when it takes at most
``DEVICE_SHARE`` of the free GPU memory; otherwise it stays in pinned host memory and each batch is copied
over (``fits_on_device``).

Reproducibility. Shuffling and augmentation draw from one CPU ``torch.Generator`` per epoch, so the same seed
gives the same batches on any device. Without an explicit generator, each epoch's generator is seeded from
torch's global generator, the way a DataLoader seeds its sampler, so ``seed_everything`` and the tuning loop's
saved RNG state (resume) govern it exactly as they govern a DataLoader.

For timing (speed.py): ``list(TensorBatches(...))`` holds the device-resident, normalised batches, i.e. the
compute limit's inputs with no data work left; iterating the ``TensorBatches`` itself is the defense's path.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from fst_plugin.data.datasets import ArrayImageDataset, TransformedDataset
from fst_plugin.data.tensor_transforms import normalize, train_augment
from fst_plugin.data.transforms import DatasetInfo, dataset_info, get_transform
from fst_plugin.errors import DataError

log = logging.getLogger(__name__)

MAX_DECODED_BYTES = 1 << 30   # per decoded set; above it the caller uses the per-image path
DEVICE_SHARE = 0.25           # a set stays on the GPU when it needs at most this share of its free memory


@dataclass
class TensorImages:
    """A decoded dataset: uint8 images (N, C, H, W) and the items' other fields (labels first) as int64 (N,)."""

    images: torch.Tensor
    fields: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if not self.fields or any(len(f) != len(self.images) for f in self.fields):
            raise ValueError("every field needs one value per image, and the labels are required")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> torch.Tensor:
        return self.fields[0]

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: str | torch.device, pin_memory: bool = False) -> "TensorImages":
        """The same set on ``device`` (``pin_memory``: page-locked host memory, for fast copies to a GPU)."""
        moved = [t.to(device) for t in (self.images, *self.fields)]
        if pin_memory and torch.cuda.is_available() and torch.device(device).type == "cpu":
            moved = [t.pin_memory() for t in moved]
        return TensorImages(moved[0], tuple(moved[1:]))


def decoded_bytes(count: int, dataset: str) -> int:
    """The memory ``count`` decoded images of ``dataset`` take as uint8."""
    info = dataset_info(dataset)
    return count * info.channels * info.height * info.width


def fits_tensor_path(count: int, dataset: str, limit_bytes: int = MAX_DECODED_BYTES, what: str = "images") -> bool:
    """Whether ``count`` images of ``dataset`` may be decoded into memory; logs the decision either way."""
    size = decoded_bytes(count, dataset)
    if size <= limit_bytes:
        log.info("tensor data path: %d %s %s decoded once (%.1f MB as uint8)", count, dataset, what, size / 1e6)
        return True
    log.info("per-image data path for %d %s %s: %.0f MB as uint8 is above the tensor path's bound of %.0f MB",
             count, dataset, what, size / 1e6, limit_bytes / 1e6)
    return False


def fits_on_device(nbytes: int, device: str | torch.device, share: float = DEVICE_SHARE) -> bool:
    """Whether a decoded set of ``nbytes`` may stay resident on ``device`` (always on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


def _resize_step(info: DatasetInfo) -> transforms.Resize:
    """The deterministic head of BackdoorBench's test transform (one owner: ``get_transform``)."""
    step = get_transform(info.name, train=False).transforms[0]
    if not isinstance(step, transforms.Resize):
        raise TypeError(f"get_transform({info.name!r}) no longer starts with Resize; update tensor_data")
    return step


def _unwrap(dataset: Dataset, indices: Optional[Sequence[int]]) -> tuple[Dataset, np.ndarray]:
    """The raw dataset beneath untransformed ``TransformedDataset`` wrappers, and the indices into it."""
    idx = None if indices is None else np.asarray(indices, dtype=np.int64)
    while isinstance(dataset, TransformedDataset):
        if dataset.transform is not None:
            raise ValueError("decode() needs the raw images: pass a TransformedDataset without a transform "
                             "(the tensor path applies BackdoorBench's transform itself)")
        if dataset.indices is not None:
            inner = np.asarray(dataset.indices, dtype=np.int64)
            idx = inner if idx is None else inner[idx]
        dataset = dataset.base
    if getattr(dataset, "transform", None) is not None or getattr(dataset, "target_transform", None) is not None:
        raise ValueError("decode() needs a dataset without transforms (the tensor path applies them itself)")
    return dataset, np.arange(len(dataset)) if idx is None else idx  # type: ignore[arg-type]


def _array_images(dataset: Dataset, info: DatasetInfo) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(uint8 N×H×W×C, labels) of an in-memory dataset already at the dataset's size, else None.

    Resize to an image's own size is a copy in PIL, so for these the per-image decode can be skipped."""
    if isinstance(dataset, (ArrayImageDataset, tv_datasets.CIFAR10, tv_datasets.MNIST)):
        data = dataset.data
        data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        if data.ndim == 3:
            data = data[..., None]
        if data.dtype == np.uint8 and data.shape[1:] == (info.height, info.width, info.channels):
            return data, np.asarray(dataset.targets, dtype=np.int64)
    return None


def _image_array(image: Any, resize: transforms.Resize, info: DatasetInfo, index: int) -> np.ndarray:
    array = np.asarray(resize(image), dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape != (info.height, info.width, info.channels):
        raise DataError(f"image {index} decodes to shape {array.shape}, not {info.img_size} as {info.name} needs",
                        f"convert the {info.name} images to {'grayscale' if info.channels == 1 else 'RGB'}")
    return array


def decode(dataset: Dataset, name: str, indices: Optional[Sequence[int]] = None,
           show_progress: Optional[bool] = None) -> TensorImages:
    """Decode ``dataset`` (items ``(PIL image, int, ...)``), restricted to ``indices``, into ``TensorImages``,
    resizing each image to ``name``'s size exactly as BackdoorBench's transform does."""
    from fst_plugin.runtime import progress  # the project's tqdm helper

    info = dataset_info(name)
    base, idx = _unwrap(dataset, indices)
    in_memory = _array_images(base, info)
    if in_memory is not None:
        images, labels = in_memory
        return TensorImages(torch.from_numpy(np.ascontiguousarray(images[idx].transpose(0, 3, 1, 2))),
                            (torch.from_numpy(labels[idx]),))
    resize = _resize_step(info)
    images = np.empty((len(idx), info.height, info.width, info.channels), dtype=np.uint8)
    fields: list[list[int]] = []
    for row, i in enumerate(progress(idx.tolist(), show_progress, f"decoding {name} images")):
        item = base[i]
        images[row] = _image_array(item[0], resize, info, i)
        fields.append([int(v) for v in item[1:]])
    columns = np.asarray(fields, dtype=np.int64).reshape(len(idx), -1) if fields else np.zeros((0, 1), np.int64)
    return TensorImages(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                        tuple(torch.from_numpy(columns[:, k].copy()) for k in range(columns.shape[1])))


class TensorBatches:
    """DataLoader-like batches of a ``TensorImages``: ``(normalised inputs, labels, *other fields)`` on ``device``.

    ``augment`` applies BackdoorBench's random train transform (crop with 4-pixel padding, flip on CIFAR-10)
    on the device; ``after_augment(images, fields)`` may then edit the uint8 batch (the attack trainer stamps
    a trigger there); inputs are normalised with the dataset's mean/std last. ``channels_last`` returns the
    inputs in that memory format. ``generator``: see the module docstring (None: seeded from torch's global
    generator each epoch, like a DataLoader).
    """

    def __init__(self, data: TensorImages, dataset: str, batch_size: int, *, shuffle: bool = False,
                 augment: bool = False, device: str | torch.device = "cpu", channels_last: bool = False,
                 generator: Optional[torch.Generator] = None, drop_last: bool = False,
                 resident: Optional[bool] = None,
                 after_augment: Optional[Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]] = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.info = dataset_info(dataset)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.channels_last, self.drop_last = shuffle, augment, channels_last, drop_last
        self.device = torch.device(device)
        self.generator = generator
        self.after_augment = after_augment
        self.resident = fits_on_device(data.nbytes, self.device) if resident is None else resident
        if self.resident:
            self.data = data.to(self.device)
        else:
            log.info("%.0f MB of decoded images stay in host memory; each batch is copied to %s",
                     data.nbytes / 1e6, self.device)
            self.data = data.to("cpu", pin_memory=self.device.type == "cuda")

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch_generator(self) -> torch.Generator:
        if self.generator is not None:
            return self.generator
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # as a DataLoader seeds its sampler
        return torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.data)
        gen = self._epoch_generator() if (self.shuffle or self.augment) else None
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.data.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            images = self.data.images[idx]
            fields = [f[idx] for f in self.data.fields]
            if not self.resident:
                images = images.to(self.device, non_blocking=True)
                fields = [f.to(self.device, non_blocking=True) for f in fields]
            if self.augment:
                images = train_augment(images, self.info.name, gen)
            if self.after_augment is not None:
                images = self.after_augment(images, fields)
            inputs = normalize(images, self.info.mean, self.info.std)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            yield (inputs, *fields)


def _step_problem(step: Any, expected: Any) -> Optional[str]:
    if type(step) is not type(expected):
        return f"{type(step).__name__} where {type(expected).__name__} is standard"
    for attr in ("size", "padding", "fill", "padding_mode", "pad_if_needed", "p", "interpolation", "mean", "std"):
        if hasattr(expected, attr):
            mine, theirs = getattr(step, attr, None), getattr(expected, attr)
            if isinstance(theirs, (list, tuple)) and isinstance(mine, (list, tuple)):
                same = len(mine) == len(theirs) and all(abs(float(a) - float(b)) < 1e-9 for a, b in zip(mine, theirs))
            else:
                same = mine == theirs
            if not same:
                return f"{type(step).__name__}.{attr} is {mine!r}, not the standard {theirs!r}"
    return None


def nonstandard_transform(transform: Any, dataset: str, train: bool) -> Optional[str]:
    """Why ``transform`` (a backend's, e.g. BackdoorBench's ``get_transform``) is not the standard one the tensor
    path reproduces (Resize, [RandomCrop(padding=4), RandomHorizontalFlip on CIFAR-10,] ToTensor, Normalize with
    the dataset's constants), or None when it is."""
    expected = get_transform(dataset, train).transforms
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        return f"the {'train' if train else 'test'} transform is a {type(transform).__name__}, not a Compose"
    if len(steps) != len(expected):
        return (f"the {'train' if train else 'test'} transform has steps {[type(s).__name__ for s in steps]}, "
                f"not {[type(s).__name__ for s in expected]}")
    for step, standard in zip(steps, expected):
        problem = _step_problem(step, standard)
        if problem:
            return f"the {'train' if train else 'test'} transform's {problem}"
    return None
