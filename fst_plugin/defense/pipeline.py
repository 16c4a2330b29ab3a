"""The input pipeline of a defense run: the tensor path or BackdoorBench's per-image DataLoaders.

``input_pipeline: tensor`` (the default) decodes the tuning subset and both test sets once and runs
BackdoorBench's transforms as batched tensor operations on the device; it is used only where it reproduces the
run's data (the backend's transforms are the standard ones and every set fits the decoded-size bound), otherwise
a log line says why and the per-image path runs. ``backdoorbench`` is that per-image path. Both evaluate the same
test images, with ``eval_subset`` the same seeded subset.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fst_plugin.data import PoisonedTestSet, TransformedDataset, dataset_info, materialise
from fst_plugin.data.tensor_data import TensorBatches, decode, fits_tensor_path, nonstandard_transform
from fst_plugin.defense.config import DefenseConfig
from fst_plugin.record import AttackRecord

log = logging.getLogger(__name__)
EVAL_SUBSET_BATCH = 256
TENSOR_EVAL_BATCH = {"cuda": 1024, "cpu": 256}  # tensor path's evaluation batch (no gradients: large is cheap)


def build_loaders(config: DefenseConfig, backend: Any, device: str, record: AttackRecord, train_raw: Dataset,
                  test_raw: Dataset, indices: np.ndarray) -> dict[str, Any]:
    """The tuning, clean-test and poisoned-test loaders and how they were made (the rest of a DefensePlan)."""
    eval_rng = np.random.default_rng(config.random_seed)  # one generator: the clean subset, then the poisoned one
    poisoned = PoisonedTestSet(record.bd_test.images, dataset_info(config.dataset).channels)
    if config.input_pipeline == "tensor" and _tensor_path_ok(config, backend, len(indices), len(test_raw),
                                                             len(poisoned)):
        return _tensor_data(config, device, train_raw, test_raw, poisoned, indices, eval_rng)
    return _per_image_data(config, backend, device, train_raw, test_raw, poisoned, indices, eval_rng)


def held_out_loaders(config: DefenseConfig, backend: Any, device: str, train_raw: Dataset, fit: np.ndarray,
                     held_out: np.ndarray, tensor_path: bool) -> tuple[Iterable, Iterable]:
    """``alpha: auto``'s data, both parts of the tuning set on the run's own path: the fit part as the tuning
    loader takes it (shuffled, augmented) and the held-out part as the test loaders take theirs."""
    if tensor_path:
        on_cuda = torch.device(device).type == "cuda"
        eval_batch = max(config.batch_size, TENSOR_EVAL_BATCH["cuda" if on_cuda else "cpu"])
        return (TensorBatches(decode(train_raw, config.dataset, fit), config.dataset, config.batch_size, shuffle=True,
                              augment=True, device=device, channels_last=on_cuda),
                TensorBatches(decode(train_raw, config.dataset, held_out), config.dataset, eval_batch, device=device,
                              channels_last=on_cuda))
    loader_args = dict(batch_size=config.batch_size, num_workers=config.num_workers,
                       pin_memory=config.pin_memory and device.startswith("cuda"))
    return (DataLoader(TransformedDataset(train_raw, backend.transform(config.dataset, train=True), fit), shuffle=True,
                       **loader_args),
            DataLoader(TransformedDataset(train_raw, backend.transform(config.dataset, train=False), held_out),
                       shuffle=False, **loader_args))


def _tensor_path_ok(config: DefenseConfig, backend: Any, n_train: int, n_test: int, n_poisoned: int) -> bool:
    """Whether the tensor path reproduces this run's data: the backend's transforms are the standard ones and
    every set fits the decoded-size bound (``fits_tensor_path``); otherwise say why and use the per-image path."""
    for train in (True, False):
        problem = nonstandard_transform(backend.transform(config.dataset, train=train), config.dataset, train)
        if problem:
            log.info("per-image data path: %s's %s, which the tensor path does not reproduce", backend.name, problem)
            return False
    subset = config.eval_subset or max(n_test, n_poisoned)
    sets = ((n_train, "tuning images"), (min(n_test, subset), "clean test images"),
            (min(n_poisoned, subset), "poisoned test images"))
    if all([fits_tensor_path(n, config.dataset, what=what) for n, what in sets]):  # a list: log every set
        return True
    log.info("per-image data path: a set is above the tensor path's bound (see above)")
    return False


def _eval_indices(config: DefenseConfig, n: int, rng: np.random.Generator) -> Optional[list[int]]:
    """With ``eval_subset``: the test images evaluated each epoch, drawn with ``random_seed`` (the same on both
    paths); else None (all of them)."""
    if not config.eval_subset:
        return None
    return np.sort(rng.choice(n, size=min(config.eval_subset, n), replace=False)).tolist()


def _tensor_data(config: DefenseConfig, device: str, train_raw: Dataset, test_raw: Dataset, poisoned: Dataset,
                 indices: np.ndarray, eval_rng: np.random.Generator) -> dict[str, Any]:
    """Decode the tuning subset and both test sets once; crop, flip and normalise batches on the device."""
    on_cuda = torch.device(device).type == "cuda"
    eval_batch = max(config.batch_size, TENSOR_EVAL_BATCH["cuda" if on_cuda else "cpu"])

    def test_batches(dataset: Dataset) -> TensorBatches:
        keep = _eval_indices(config, len(dataset), eval_rng)
        return TensorBatches(decode(dataset, config.dataset, keep), config.dataset, eval_batch, device=device,
                             channels_last=on_cuda)

    log.info("tensor data path: BackdoorBench's transforms as batched tensor operations on %s", device)
    train = TensorBatches(decode(train_raw, config.dataset, indices), config.dataset, config.batch_size,
                          shuffle=True, augment=True, device=device, channels_last=on_cuda)
    return dict(train_loader=train, clean_loader=test_batches(test_raw), bd_loader=test_batches(poisoned),
                input_pipeline="tensor", channels_last=on_cuda, eval_amp=on_cuda and config.amp)


def _per_image_data(config: DefenseConfig, backend: Any, device: str, train_raw: Dataset, test_raw: Dataset,
                    poisoned: Dataset, indices: np.ndarray, eval_rng: np.random.Generator) -> dict[str, Any]:
    """BackdoorBench's per-image path: DataLoaders running the backend's PIL transforms on every item."""
    test_transform = backend.transform(config.dataset, train=False)
    pin = config.pin_memory and device.startswith("cuda")
    loader_args = dict(batch_size=config.batch_size, num_workers=config.num_workers, pin_memory=pin)

    def test_loader(dataset: Dataset) -> DataLoader:
        """The full test set, or with ``eval_subset`` a subset decoded once (the test transform is
        deterministic, so each epoch's evaluation then costs forward passes only)."""
        keep = _eval_indices(config, len(dataset), eval_rng)
        if keep is None:
            return DataLoader(dataset, shuffle=False, **loader_args)
        return DataLoader(materialise(Subset(dataset, keep)), batch_size=EVAL_SUBSET_BATCH, shuffle=False)

    train_set = TransformedDataset(train_raw, backend.transform(config.dataset, train=True), indices)
    return dict(train_loader=DataLoader(train_set, shuffle=True, **loader_args),
                clean_loader=test_loader(TransformedDataset(test_raw, test_transform)),
                bd_loader=test_loader(TransformedDataset(poisoned, test_transform)),
                input_pipeline="backdoorbench")
