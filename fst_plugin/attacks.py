"""Making backdoored models (for the demo, the tests and the benchmarks): triggers and a fast trainer.

Triggers act on uint8 images (N, H, W, C) and follow BackdoorBench's attacks (all-to-one, target 0 by
default). Training keeps the whole dataset as one uint8 tensor on the device and augments whole batches there
with the shared kernels of ``fst_plugin.data.tensor_transforms`` (random crop with 4-pixel padding, horizontal
flip), under AMP and channels_last on CUDA.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fst_plugin.data.tensor_data import TensorBatches, TensorImages
from fst_plugin.data.tensor_transforms import CROP_PADDING, horizontal_flip, normalize_for, random_crop
from fst_plugin.errors import ConfigError, TrainingDiverged
from fst_plugin.runtime import progress

log = logging.getLogger(__name__)

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


def to_tensor_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) → uint8 tensor (N, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def normalise(batch: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 (N, C, H, W) → float, normalised with the dataset's BackdoorBench mean/std (the shared kernel)."""
    return normalize_for(batch, dataset)


def augment(batch: torch.Tensor, flip: bool, padding: int = CROP_PADDING,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop with zero padding and (optionally) horizontal flip, per image, on a uint8 batch."""
    out = random_crop(batch, padding, generator)
    return horizontal_flip(out, 0.5, generator) if flip else out


SCHEDULES = ("onecycle", "cosine")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = True  # random crop + flip; off lets a backdoor implant in far fewer steps (the demo)
    device: str = "cpu"
    amp: bool = False     # on CUDA: bf16 autocast where the GPU supports it, else fp16 with a GradScaler
    seed: int = 0
    show_progress: Optional[bool] = None  # None: only when stderr is a terminal
    # "onecycle": warm-up then cosine, stepped per batch (reaches a good model in few epochs);
    # "cosine": BackdoorBench's schedule, CosineAnnealingLR(T_max=epochs) stepped once per epoch
    schedule: str = "onecycle"
    nesterov: bool = True             # BackdoorBench's attacks: False
    channels_last: Optional[bool] = None  # None: on CUDA only (where convolutions are faster in it)
    compile: bool = False             # torch.compile the model; the first epoch pays for the compilation
    # Stamp the trigger on the poisoned images after the crop and flip instead of before (BackdoorBench's
    # order). The trigger then always sits where the test images carry it, so a backdoor implants in a few
    # epochs with augmentation on (the demo); BackdoorBench's order moves and mirrors a corner patch.
    trigger_after_augment: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown training schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")


def autocast_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """The autocast precision for training: None (fp32) off CUDA or without ``amp``, else bf16 if supported."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
               steps_per_epoch: int) -> tuple[torch.optim.lr_scheduler.LRScheduler, bool]:
    """The learning-rate schedule and whether it steps per batch (else per epoch)."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs), False
    total_steps = config.epochs * steps_per_epoch
    if total_steps >= 4:  # warm-up of at least one step, else OneCycleLR divides by zero
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                                   pct_start=max(0.25, 2 / total_steps)), True
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0), True  # too few steps for the phases


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, config: TrainConfig) -> None:
    if not torch.isfinite(loss_sum):
        raise TrainingDiverged(
            f"attack training diverged: the loss became {loss_sum.item()} by step {step} of epoch {epoch + 1}",
            f"lower the learning rate (lr={config.lr}) or check the data; no model was kept")


DIVERGENCE_CHECK_STEPS = 50  # the loss is checked (one device sync) this often, and at every epoch's end


def stamp_after_augment(trigger: Trigger) -> Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]:
    """A ``TensorBatches.after_augment`` hook: apply ``trigger`` to the batch rows whose ``fields[1]`` is True."""
    def stamp(images: torch.Tensor, fields: list[torch.Tensor]) -> torch.Tensor:
        rows = fields[1].nonzero().flatten()
        if len(rows) == 0:
            return images
        picked = images[rows].permute(0, 2, 3, 1).cpu().numpy()
        stamped = torch.from_numpy(np.ascontiguousarray(trigger(picked))).permute(0, 3, 1, 2)
        images = images.clone()
        images[rows] = stamped.to(images.device)
        return images
    return stamp


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, dataset: str,
                     config: TrainConfig, on_epoch_end: Optional[Callable[[int, float], None]] = None,
                     stamp: Optional[tuple[Trigger, np.ndarray]] = None) -> nn.Module:
    """Train ``model`` on uint8 images (N, H, W, C) with SGD and batch augmentation on the device.

    The whole training set is held as uint8 on ``config.device`` (``TensorBatches``); crops, flips and the
    normalisation run there on whole batches. ``stamp = (trigger, indices)`` applies ``trigger`` to those
    images after the augmentation of every batch (``TrainConfig.trigger_after_augment``). A NaN or infinite
    loss raises ``TrainingDiverged``.
    """
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    fields = [torch.from_numpy(labels.astype(np.int64))]
    hook = None
    if stamp is not None:
        trigger, stamped = stamp
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[torch.as_tensor(stamped, dtype=torch.long)] = True
        fields.append(mask)
        hook = stamp_after_augment(trigger)
    data = TensorImages(to_tensor_batch(images), tuple(fields))
    batches = TensorBatches(data, dataset, config.batch_size, shuffle=True, augment=config.augment,
                            device=device, channels_last=channels_last, after_augment=hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    scheduler, per_step = _scheduler(optimizer, config, len(batches))
    amp_dtype = autocast_dtype(device, config.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    forward = torch.compile(model) if config.compile else model
    for epoch in range(config.epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        step = 0
        for step, (x, y, *_) in enumerate(progress(batches, config.show_progress,
                                               f"train epoch {epoch + 1}/{config.epochs}"), 1):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(forward(x), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if per_step:
                scheduler.step()
            loss_sum += loss.detach().float()
            if step % DIVERGENCE_CHECK_STEPS == 0:
                _check_finite(loss_sum, epoch, step, config)
        if not per_step:
            scheduler.step()
        _check_finite(loss_sum, epoch, step, config)
        if on_epoch_end is not None:
            on_epoch_end(epoch, loss_sum.item() / max(step, 1))
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, dataset: str, device: str = "cpu",
            batch_size: int = 512) -> np.ndarray:
    model.eval().to(device)
    data = to_tensor_batch(images)
    preds = [model(normalise(data[i:i + batch_size].to(device), dataset)).argmax(1).cpu()
             for i in range(0, len(data), batch_size)]
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def accuracy_and_asr(model: nn.Module, test_images: np.ndarray, test_labels: np.ndarray, trigger: Trigger,
                     target: int, dataset: str, device: str = "cpu") -> tuple[float, float]:
    """C-Acc on clean test images and ASR on triggered non-target test images (fractions)."""
    acc = float((predict(model, test_images, dataset, device) == test_labels).mean())
    keep = test_labels != target
    asr = float((predict(model, trigger(test_images[keep]), dataset, device) == target).mean())
    return acc, asr


def poisoned_test_items(images: np.ndarray, labels: np.ndarray, trigger: Trigger,
                        target: int) -> list[tuple[int, "object", int, int]]:
    """BackdoorBench's bd_test: every non-target test image with the trigger, as record-writer items."""
    from PIL import Image

    keep = np.flatnonzero(labels != target)
    triggered = trigger(images[keep])
    mode = "L" if images.shape[-1] == 1 else "RGB"
    return [(int(i), Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode), int(target), int(labels[i]))
            for i, img in zip(keep, triggered)]


def class_balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` images of each class."""
    chosen: list[np.ndarray] = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        chosen.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen))

