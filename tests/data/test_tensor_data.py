"""The tensor data path against the per-image path it replaces, for every supported dataset: the decoded test
transform equals BackdoorBench's per-image transform, the train transform draws crops and flips with the same
distribution, and a seeded loader is reproducible."""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fst_plugin.data import DATASETS, PoisonedTestSet, TransformedDataset, get_transform, load_clean_split
from fst_plugin.data.datasets import ArrayImageDataset
from fst_plugin.data.tensor_data import (
    MAX_DECODED_BYTES,
    TensorBatches,
    TensorImages,
    decode,
    decoded_bytes,
    fits_tensor_path,
)
from fst_plugin.data.tensor_transforms import crop, flip_where, normalize_for, random_crop

ALL = sorted(DATASETS)


def _random_image(rng: np.random.Generator, h: int, w: int, channels: int) -> Image.Image:
    pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if channels == 1 else "RGB")


def _odd_sizes(name: str) -> list[tuple[int, int]]:
    """The dataset's own size and others (GTSRB's images vary in size; Resize must bring each to H×W)."""
    info = DATASETS[name]
    return [(info.height, info.width), (info.height + 9, info.width - 5), (info.height // 2, info.width + 3)]


def _write_mnist(root: Path, rng: np.random.Generator, n: int = 6) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(range(n)))


def _write_folders(root: Path, name: str, rng: np.random.Generator) -> None:
    channels = DATASETS[name].channels
    for split in ("train", "test"):
        for label in ("0", "1", "2"):
            (root / split / label).mkdir(parents=True)
            for k, (h, w) in enumerate(_odd_sizes(name)):
                _random_image(rng, h, w, channels).save(root / split / label / f"{k}.png")


def _clean_splits(name: str, root: Path) -> list:
    """The clean test split as ``load_clean_split`` reads it, plus an in-memory set with off-size images."""
    rng = np.random.default_rng(0)
    if name == "mnist":
        _write_mnist(root, rng)
    else:
        _write_folders(root, name, rng)
    info = DATASETS[name]
    off_size = rng.integers(0, 256, size=(5, info.height + 6, info.width + 6, info.channels), dtype=np.uint8)
    return [load_clean_split(name, root, train=False),
            ArrayImageDataset(off_size[..., 0] if info.channels == 1 else off_size, [3, 1, 4, 1, 5])]


def _per_image(dataset, name: str) -> tuple[torch.Tensor, list[tuple]]:
    transform = get_transform(name, train=False)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([transform(item[0]) for item in items]), [tuple(int(v) for v in item[1:]) for item in items]


def _tensor_path(data: TensorImages, name: str, batch_size: int = 4) -> tuple[torch.Tensor, list[tuple]]:
    batches = list(TensorBatches(data, name, batch_size))
    inputs = torch.cat([b[0] for b in batches])
    fields = torch.stack([torch.cat([b[k] for b in batches]) for k in range(1, len(batches[0]))], 1)
    return inputs, [tuple(row) for row in fields.tolist()]


@pytest.mark.parametrize("name", ALL)
def test_the_test_transform_equals_the_per_image_path(name: str, tmp_path: Path) -> None:
    for dataset in _clean_splits(name, tmp_path):
        expected, expected_fields = _per_image(dataset, name)
        got, fields = _tensor_path(decode(dataset, name), name)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max().item() <= 1e-6
        assert fields == expected_fields


@pytest.mark.parametrize("name", ALL)
def test_a_subset_of_a_clean_split_decodes_the_chosen_images_in_order(name: str, tmp_path: Path) -> None:
    raw = _clean_splits(name, tmp_path)[0]
    chosen = [4, 0, 2] if len(raw) >= 5 else [2, 0]
    subset = TransformedDataset(raw, None, chosen)
    expected, expected_fields = _per_image(subset, name)
    got, fields = _tensor_path(decode(subset, name), name)
    assert (got - expected).abs().max().item() <= 1e-6 and fields == expected_fields
    assert torch.equal(decode(raw, name, indices=chosen).images, decode(subset, name).images)


@dataclass
class _Entry:  # the fields of a record's PoisonedImage that PoisonedTestSet reads
    path: Path
    bd_label: int
    original_index: int
    original_label: int


@pytest.mark.parametrize("name", ALL)
def test_a_poisoned_test_set_decodes_with_all_five_fields(name: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    info = DATASETS[name]
    entries = []
    for k, (h, w) in enumerate(_odd_sizes(name) * 2):
        path = tmp_path / f"{k}.png"
        _random_image(rng, h, w, info.channels).save(path)
        entries.append(_Entry(path, 0, 100 + k, 1 + k % 3))
    bd = PoisonedTestSet(entries, info.channels)
    expected, expected_fields = _per_image(bd, name)
    got, fields = _tensor_path(decode(bd, name), name)
    assert (got - expected).abs().max().item() <= 1e-6
    assert fields == expected_fields and fields[2] == (0, 102, 1, 3)


def test_a_dataset_that_still_has_its_transform_is_refused() -> None:
    raw = ArrayImageDataset(np.zeros((2, 32, 32, 3), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="without a transform"):
        decode(TransformedDataset(raw, get_transform("cifar10", train=False)), "cifar10")


def _position_coded(name: str, count: int) -> TensorImages:
    """``count`` copies of one image whose pixel (r, c) holds (r mod 16)·16 + c mod 16 in every channel."""
    info = DATASETS[name]
    rows = torch.arange(info.height).view(-1, 1) % 16
    cols = torch.arange(info.width).view(1, -1) % 16
    image = (rows * 16 + cols).to(torch.uint8).expand(info.channels, -1, -1)
    return TensorImages(image.expand(count, -1, -1, -1), (torch.zeros(count, dtype=torch.int64),))


def _offsets_and_flips(inputs: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recover each augmented image's crop offset (0..8, as torchvision draws it) and flip from its centre."""
    info = DATASETS[name]
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    pixels = ((inputs * std + mean) * 255).round().to(torch.int64)[:, 0]
    r0, c0 = info.height // 2, info.width // 2
    centre, right = pixels[:, r0, c0], pixels[:, r0, c0 + 1]
    flipped = ((right % 16) - (centre % 16)) % 16 == 15          # columns run backwards
    def unwrap(code: torch.Tensor, near: int) -> torch.Tensor:     # the row/col within ±8 of ``near``
        return near - 8 + (code - (near - 8)) % 16
    row = unwrap(centre // 16, r0)
    col = unwrap(centre % 16, c0)
    # output column c0 shows crop column c0 (or W-1-c0 when flipped); crop column j is padded column j + left
    crop_col = torch.where(flipped, torch.full_like(col, info.width - 1 - c0), torch.full_like(col, c0))
    top = row - r0 + 4
    left = col - crop_col + 4
    return top.numpy(), left.numpy(), flipped.numpy()


@pytest.mark.parametrize("name", ALL)
def test_train_crops_are_uniform_over_the_9x9_offsets_and_flips_follow_backdoorbench(name: str) -> None:
    """16,200 augmented images (200 expected per offset). Under uniformity the χ² statistic over the 81 offsets
    follows χ²(80), whose 1 − 10⁻⁶ quantile is 155.1; a kernel that missed one row or column of offsets (8×8)
    would leave 17 cells empty and score > 3,000. The flip rate's standard error is 0.5/√16200 = 0.0039, so
    0.02 is five of them (CIFAR-10 flips with p = 0.5; BackdoorBench flips no other dataset)."""
    count = 81 * 200
    batches = TensorBatches(_position_coded(name, count), name, 512, shuffle=True, augment=True,
                            generator=torch.Generator().manual_seed(0))
    parts = [_offsets_and_flips(b[0], name) for b in batches]
    top, left, flipped = (np.concatenate(p) for p in zip(*parts))
    assert top.min() == 0 and top.max() == 8 and left.min() == 0 and left.max() == 8
    counts = np.bincount(top * 9 + left, minlength=81)
    chi2 = ((counts - 200) ** 2 / 200).sum()
    assert chi2 < 155.1, (chi2, counts)
    if name == "cifar10":
        assert abs(flipped.mean() - 0.5) < 0.02
        assert all(0 < p[2].mean() < 1 for p in parts)   # decided per image, not per batch
    else:
        assert not flipped.any()


def test_crop_and_flip_kernels_match_torchvision_on_one_image() -> None:
    """The kernels cut the same window torchvision's RandomCrop(padding=4) cuts at a given offset, for a batch
    or a single image alike."""
    from torchvision.transforms import functional as TF

    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for top, left in ((0, 0), (8, 8), (3, 6)):
        reference = TF.crop(TF.pad(image, [4]), top, left, 32, 32)
        assert torch.equal(crop(image, torch.tensor([top]), torch.tensor([left])), reference)
        assert torch.equal(crop(image[None], torch.tensor([top]), torch.tensor([left]))[0], reference)
    assert torch.equal(flip_where(image, torch.tensor([True])), TF.hflip(image))
    assert random_crop(image, generator=torch.Generator().manual_seed(0)).shape == image.shape
    expected = get_transform("cifar10", train=False)(Image.fromarray(image.permute(1, 2, 0).numpy()))
    assert (normalize_for(image, "cifar10") - expected).abs().max().item() <= 1e-6


def _epoch(batches: TensorBatches) -> list[torch.Tensor]:
    return [t for batch in batches for t in batch]


def test_a_seeded_loader_is_reproducible_and_the_seed_matters() -> None:
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = TensorImages(images, (torch.arange(50),))

    def loader(seed: int) -> TensorBatches:
        return TensorBatches(data, "cifar10", 16, shuffle=True, augment=True,
                             generator=torch.Generator().manual_seed(seed))

    a, b, c = loader(7), loader(7), loader(8)
    first_a, first_b, first_c = _epoch(a), _epoch(b), _epoch(c)
    assert all(torch.equal(x, y) for x, y in zip(first_a, first_b))
    assert not all(torch.equal(x, y) for x, y in zip(first_a, first_c))
    assert not torch.equal(first_a[1], _epoch(a)[1])             # the next epoch is shuffled afresh
    assert sorted(torch.cat(first_a[1::2]).tolist()) == list(range(50))  # each image once per epoch


def test_without_a_generator_the_loader_follows_torchs_global_seed_like_a_dataloader() -> None:
    """So ``seed_everything`` and the tuning loop's saved RNG state (resume) govern it."""
    data = TensorImages(torch.zeros(30, 3, 32, 32, dtype=torch.uint8), (torch.arange(30),))
    batches = TensorBatches(data, "cifar10", 8, shuffle=True)
    torch.manual_seed(3)
    first = torch.cat([b[1] for b in batches])
    torch.manual_seed(3)
    assert torch.equal(first, torch.cat([b[1] for b in batches]))
    evaluation = TensorBatches(data, "cifar10", 8)
    state = torch.get_rng_state()
    assert torch.equal(torch.cat([b[1] for b in evaluation]), torch.arange(30))
    assert torch.equal(state, torch.get_rng_state())              # evaluation draws nothing


def test_batches_have_the_dataloader_shape_and_honour_channels_last_and_drop_last() -> None:
    data = TensorImages(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), (torch.arange(10), torch.ones(10, dtype=torch.int64)))
    batches = TensorBatches(data, "cifar10", 4, channels_last=True)
    assert len(batches) == 3 and [len(b[0]) for b in batches] == [4, 4, 2]
    x, labels, ones = next(iter(batches))
    assert x.is_contiguous(memory_format=torch.channels_last) and labels.tolist() == [0, 1, 2, 3]
    assert len(TensorBatches(data, "cifar10", 4, drop_last=True)) == 2


def test_the_memory_bound_says_which_sets_fit_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert decoded_bytes(19_000, "cifar10") == 19_000 * 3 * 32 * 32          # 58 MB: CIFAR-10's two test sets
    assert fits_tensor_path(19_000, "cifar10") and "tensor data path" in caplog.text
    assert decoded_bytes(100_000, "tiny") > MAX_DECODED_BYTES                  # Tiny-ImageNet's training split
    assert not fits_tensor_path(100_000, "tiny") and "per-image data path" in caplog.text
