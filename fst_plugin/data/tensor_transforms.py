"""BackdoorBench's transforms as pure tensor kernels (torchvision-v2-functional style).

Every kernel takes a uint8 image ``(C, H, W)`` or batch ``(N, C, H, W)`` and runs on the device the tensor is
on, so the same code serves one image, a CPU batch and a GPU batch:

* ``normalize``: ``ToTensor`` then ``Normalize(mean, std)`` (the same float32 operations, in the same order,
  so the result equals torchvision's per-image path bit for bit);
* ``random_crop``: ``RandomCrop(size, padding=4)`` with zero fill, an independent offset per image, uniform
  over the (2·padding + 1)² offsets as torchvision draws it;
* ``horizontal_flip``: ``RandomHorizontalFlip(p)``, independently per image.

Random parameters are drawn by ``crop_offsets`` / ``flip_mask`` from a ``torch.Generator`` on the CPU (a few
integers per batch) and then moved to the batch's device, so a seed gives the same augmentation on any device.
Resize is not here: it is the deterministic, per-image part that ``fst_plugin.data.tensor_data`` applies with
PIL once, when it decodes a dataset.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fst_plugin.data.transforms import CROP_PADDING, dataset_info



def _as_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if images.dim() == 3:
        return images.unsqueeze(0), True
    if images.dim() != 4:
        raise ValueError(f"expected an image (C, H, W) or a batch (N, C, H, W), got shape {tuple(images.shape)}")
    return images, False


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 → float32 in [0, 1] → ``(x − mean) / std`` per channel (``ToTensor`` + ``Normalize``)."""
    batch, single = _as_batch(images)
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(shape)
    out = batch.to(torch.float32).div(255).sub(mean_t).div(std_t)
    return out[0] if single else out


def normalize_for(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """``normalize`` with the dataset's BackdoorBench mean and std."""
    info = dataset_info(dataset)
    return normalize(images, info.mean, info.std)


def crop_offsets(count: int, padding: int = CROP_PADDING,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (top, left) offsets into the padded image, each uniform on 0..2·padding (on the CPU)."""
    top = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    return top, left


def crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut each image's original-size window at its own (top, left)."""
    batch, single = _as_batch(images)
    n, _, h, w = batch.shape
    device = batch.device
    padded = F.pad(batch, (padding,) * 4)
    rows = top.to(device).view(n, 1, 1) + torch.arange(h, device=device).view(1, h, 1)
    cols = left.to(device).view(n, 1, 1) + torch.arange(w, device=device).view(1, 1, w)
    index = torch.arange(n, device=device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2).contiguous()
    return out[0] if single else out


def random_crop(images: torch.Tensor, padding: int = CROP_PADDING,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``RandomCrop(size, padding)`` per image (zero fill)."""
    batch, single = _as_batch(images)
    out = crop(batch, *crop_offsets(len(batch), padding, generator), padding=padding)
    return out[0] if single else out


def flip_mask(count: int, p: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Which images to flip: each independently with probability ``p`` (on the CPU)."""
    return torch.rand(count, generator=generator) < p


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left ↔ right) the images where ``mask`` is true."""
    batch, single = _as_batch(images)
    out = torch.where(mask.to(batch.device).view(-1, 1, 1, 1), batch.flip(-1), batch)
    return out[0] if single else out


def horizontal_flip(images: torch.Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``RandomHorizontalFlip(p)`` per image."""
    batch, single = _as_batch(images)
    out = flip_where(batch, flip_mask(len(batch), p, generator))
    return out[0] if single else out


def flips(dataset: str) -> bool:
    """Whether BackdoorBench's train transform flips this dataset (CIFAR-10 only)."""
    return dataset == "cifar10"


def train_augment(images: torch.Tensor, dataset: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The random part of BackdoorBench's train transform on uint8 images: crop (padding 4), then flip if the
    dataset flips. Parameters are drawn in that order from ``generator``."""
    out = random_crop(images, CROP_PADDING, generator)
    return horizontal_flip(out, 0.5, generator) if flips(dataset) else out
