"""The attacks' triggers on uint8 images (N, H, W, C), following BackdoorBench (all-to-one, target 0 by
default), and the poisoning of a training split: which indices, and the poisoned arrays."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

Trigger = Callable[[np.ndarray], np.ndarray]


def badnets_trigger(patch_size: int = 3, value: int = 255) -> Trigger:
    """BadNets: a white ``patch_size``² square in the bottom-right corner."""
    def apply(images: np.ndarray) -> np.ndarray:
        out = images.copy()
        out[:, -patch_size:, -patch_size:, :] = value
        return out
    return apply


def blend_pattern(height: int = 32, width: int = 32, channels: int = 3, seed: int = 0,
                  image_path: Optional[str] = None) -> np.ndarray:
    """The Blended attack's key image as uint8 (H, W, C): ``image_path`` resized, else seeded uniform noise.

    BackdoorBench blends a Hello-Kitty picture that is not redistributable; a fixed random-noise key (Chen et
    al.'s other variant) is generated here so every record is reproducible from its seed alone.
    """
    if image_path is not None:
        from PIL import Image

        with Image.open(image_path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            pattern = np.asarray(img, dtype=np.uint8)
        return pattern.reshape(height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def blended_trigger(pattern: np.ndarray, alpha: float = 0.2) -> Trigger:
    """Blended: ``(1 − alpha)·image + alpha·pattern`` over the whole image (BackdoorBench's alpha = 0.2).

    Bit-exact with BackdoorBench's ``blendedImageAttack`` followed by its clip-and-``astype(uint8)``: the sum is
    truncated, not rounded (rounding made 43% of pixels one level brighter), with ``alpha·key`` in float32 as
    BackdoorBench's float32 key gives it and the rest in float64.
    """
    weighted_key = np.float32(alpha) * pattern.astype(np.float32)

    def apply(images: np.ndarray) -> np.ndarray:
        out = np.empty_like(images)
        for start in range(0, len(images), 4096):  # float64 intermediates stay small
            mixed = (1.0 - alpha) * images[start:start + 4096].astype(np.float64) + weighted_key
            out[start:start + 4096] = np.clip(mixed, 0, 255).astype(np.uint8)
        return out
    return apply


def sig_trigger(delta: float = 40.0, frequency: float = 6.0) -> Trigger:
    """SIG: add the horizontal sinusoid ``delta·sin(2π·j·f / W)`` to every row (BackdoorBench: delta 40, f 6).

    A clean-label attack: poison only target-class training images (``poison_indices(clean_label=True)``)
    and keep their labels (``poison_split(relabel=False)``).
    """
    def apply(images: np.ndarray) -> np.ndarray:
        width = images.shape[2]
        signal = delta * np.sin(2 * np.pi * np.arange(width) * frequency / width)
        return np.clip(images.astype(np.float32) + signal[None, None, :, None], 0, 255).astype(np.uint8)
    return apply


def wanet_trigger(height: int = 32, width: int = 32, k: int = 4, strength: float = 0.5,
                  seed: int = 0) -> Trigger:
    """WaNet's warp (Nguyen & Tran 2021; BackdoorBench's k = 4, s = 0.5): one fixed smooth warping field.

    The field is a seeded uniform k×k grid of offsets, normalised, upsampled bicubically and applied with
    ``grid_sample``. Only the static poisoning part of WaNet is reproduced: BackdoorBench's WaNet also
    controls training (its "noise mode" with random warps and cross ratio), which a data-poisoning record
    writer cannot do, so this variant needs a higher poisoning rate to implant.
    """
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    noise = noise / noise.abs().mean()
    flow = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((xs, ys), 2)[None]
    grid = torch.clamp(identity + strength * flow / height, -1, 1)

    def apply(images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        warped = F.grid_sample(batch, grid.expand(len(batch), -1, -1, -1), align_corners=True)
        return warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return apply


def poison_indices(labels: np.ndarray, rate: float, target: int, rng: np.random.Generator,
                   clean_label: bool = False) -> np.ndarray:
    """Indices to poison: ``rate`` of the split, drawn from non-target images (target-class only if clean-label)."""
    pool = np.flatnonzero(labels == target) if clean_label else np.flatnonzero(labels != target)
    count = min(len(pool), int(round(rate * len(labels))))
    return np.sort(rng.choice(pool, size=count, replace=False))


@dataclass
class PoisonedData:
    images: np.ndarray          # uint8 (N, H, W, C), poisoned where ``poisoned`` says
    labels: np.ndarray          # training labels (target label at poisoned indices unless clean-label)
    original_labels: np.ndarray
    poisoned: np.ndarray        # indices of poisoned images


def poison_split(images: np.ndarray, labels: np.ndarray, trigger: Trigger, indices: np.ndarray,
                 target: int, relabel: bool = True) -> PoisonedData:
    out, new_labels = images.copy(), labels.copy()
    if len(indices):
        out[indices] = trigger(images[indices])
        if relabel:
            new_labels[indices] = target
    return PoisonedData(out, new_labels, labels.copy(), indices)


def class_balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` images of each class."""
    chosen: list[np.ndarray] = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        chosen.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen))

