"""The attack trainer: SGD on uint8 images held on the device, augmented there batch by batch.

The whole training set is one uint8 tensor on the device (``TensorBatches``); crops and flips run there on
whole batches with the shared kernels of ``fst_plugin.data.tensor_transforms``. Their random parameters are
drawn for the whole epoch at its first batch, in the order the per-batch kernels would draw them, and copied to
the device once (``EpochAugment``): the same seed gives the same batches on any device, and a CUDA step waits
for no host copy. On CUDA the model is channels_last under bf16 autocast (``amp``), SGD is fused, and
``compile`` adds ``torch.compile`` with CUDA graphs; on the CPU, training is what it always was.

``Checkpointing`` (``fst_plugin.attacks.checkpoint``) saves the state every few epochs and pauses at a
deadline; a second call resumes where the first stopped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fst_plugin.attacks import checkpoint
from fst_plugin.attacks.checkpoint import Checkpointing, TrainingPaused
from fst_plugin.attacks.triggers import Trigger
from fst_plugin.data.tensor_data import TensorBatches, TensorImages
from fst_plugin.data.tensor_transforms import (
    CROP_PADDING,
    crop,
    crop_offsets,
    flip_mask,
    flip_where,
    flips,
    normalize_for,
)
from fst_plugin.errors import ConfigError, TrainingDiverged
from fst_plugin.runtime import progress

log = logging.getLogger(__name__)

SCHEDULES = ("onecycle", "cosine")
DIVERGENCE_CHECK_STEPS = 50  # the loss is checked (one device sync) this often, and at every epoch's end


def to_tensor_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) → uint8 tensor (N, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@dataclass
class TrainConfig:
    """The attack training's settings; ``fingerprint_settings`` are those a checkpoint must match to be resumed."""

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
    # torch.compile the model (on CUDA with CUDA graphs, mode "reduce-overhead"); the first epoch pays for it
    compile: bool = False
    # Stamp the trigger on the poisoned images after the crop and flip instead of before (BackdoorBench's
    # order). The trigger then always sits where the test images carry it, so a backdoor implants in a few
    # epochs with augmentation on (the demo); BackdoorBench's order moves and mirrors a corner patch.
    trigger_after_augment: bool = False
    checkpointing: Checkpointing = field(default_factory=Checkpointing)  # off unless it has a path

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown training schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        if self.checkpointing.every < 1:
            raise ConfigError(f"checkpoint every {self.checkpointing.every} epochs", "use 1 or more")

    def fingerprint_settings(self) -> dict:
        """The settings a resumed run must share with the run that saved the checkpoint."""
        keep = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "augment", "amp",
                "seed", "schedule", "nesterov", "trigger_after_augment")
        return {k: v for k, v in asdict(self).items() if k in keep}


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


class EpochAugment:
    """A ``TensorBatches.after_augment`` hook: BackdoorBench's crop (padding 4) and flip, with the epoch's
    parameters drawn at its first batch and moved to the device in one copy.

    ``TensorBatches`` draws the epoch's shuffle from ``generator`` first; the hook then draws, batch after batch,
    the crop offsets and the flip mask exactly as ``tensor_transforms.train_augment`` would per batch, so the
    batches equal the per-batch path's bit for bit. ``start_epoch`` reseeds ``generator`` from torch's global
    generator, as ``TensorBatches`` seeds each epoch's generator when it is given none. ``then`` (the trigger
    stamp) runs on the augmented batch."""

    def __init__(self, batch_sizes: list[int], dataset: str, generator: torch.Generator, enabled: bool,
                 then: Optional[Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]] = None) -> None:
        self.batch_sizes, self.flips, self.generator, self.enabled, self.then = (
            batch_sizes, flips(dataset), generator, enabled, then)
        self.starts = np.cumsum([0, *batch_sizes]).tolist()
        self.params: Optional[list[torch.Tensor]] = None
        self.batch = 0

    def start_epoch(self) -> None:
        self.generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        self.params, self.batch = None, 0

    def _draw(self, device: torch.device) -> list[torch.Tensor]:
        tops, lefts, masks = [], [], []
        for size in self.batch_sizes:
            top, left = crop_offsets(size, CROP_PADDING, self.generator)
            tops.append(top)
            lefts.append(left)
            if self.flips:
                masks.append(flip_mask(size, 0.5, self.generator))
        drawn = [torch.cat(tops), torch.cat(lefts)] + ([torch.cat(masks)] if self.flips else [])
        if device.type == "cuda":
            drawn = [t.pin_memory().to(device, non_blocking=True) for t in drawn]
        return drawn

    def __call__(self, images: torch.Tensor, fields: list[torch.Tensor]) -> torch.Tensor:
        if self.enabled:
            if self.params is None:
                self.params = self._draw(images.device)
            rows = slice(self.starts[self.batch], self.starts[self.batch + 1])
            images = crop(images, self.params[0][rows], self.params[1][rows], CROP_PADDING)
            if self.flips:
                images = flip_where(images, self.params[2][rows])
        self.batch += 1
        return images if self.then is None else self.then(images, fields)


def _batches(images: np.ndarray, labels: np.ndarray, dataset: str, config: TrainConfig, device: torch.device,
             channels_last: bool, stamp: Optional[tuple[Trigger, np.ndarray]]) -> tuple[TensorBatches, EpochAugment]:
    """The epoch's batches on the device and their augmentation hook (see ``EpochAugment``)."""
    fields = [torch.from_numpy(labels.astype(np.int64))]
    then = None
    if stamp is not None:
        trigger, stamped = stamp
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[torch.as_tensor(stamped, dtype=torch.long)] = True
        fields.append(mask)
        then = stamp_after_augment(trigger)
    n = len(labels)
    sizes = [min(config.batch_size, n - start) for start in range(0, n, config.batch_size)]
    hook = EpochAugment(sizes, dataset, torch.Generator(), config.augment, then)
    batches = TensorBatches(TensorImages(to_tensor_batch(images), tuple(fields)), dataset, config.batch_size,
                            shuffle=True, device=device, channels_last=channels_last, generator=hook.generator,
                            after_augment=hook)
    return batches, hook


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, dataset: str,
                     config: TrainConfig, on_epoch_end: Optional[Callable[[int, float], None]] = None,
                     stamp: Optional[tuple[Trigger, np.ndarray]] = None) -> nn.Module:
    """Train ``model`` on uint8 images (N, H, W, C) with SGD and batch augmentation on the device.

    ``stamp = (trigger, indices)`` applies ``trigger`` to those images after the augmentation of every batch
    (``TrainConfig.trigger_after_augment``). A NaN or infinite loss raises ``TrainingDiverged``. With
    ``config.checkpointing.path`` the state is saved every ``every`` epochs and at the end, a matching checkpoint
    is resumed from (``on_epoch_end`` is replayed for the epochs it holds), and past the deadline training saves
    and raises ``TrainingPaused``.
    """
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    channels_last = cuda if config.channels_last is None else config.channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    batches, hook = _batches(images, labels, dataset, config, device, channels_last, stamp)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov, fused=cuda or None)
    scheduler, per_step = _scheduler(optimizer, config, len(batches))
    amp_dtype = autocast_dtype(device, config.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    forward = torch.compile(model, mode="reduce-overhead" if cuda else None) if config.compile else model
    saving = config.checkpointing
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
             **({"scaler": scaler} if scaler.is_enabled() else {})}
    key = checkpoint.fingerprint(config.fingerprint_settings(), torch.from_numpy(np.ascontiguousarray(images)),
                                 torch.from_numpy(labels.astype(np.int64)))
    state = checkpoint.restore(saving, key, parts)
    for epoch, loss in enumerate(state.losses):
        if on_epoch_end is not None:
            on_epoch_end(epoch, loss)
    for epoch in range(state.epochs_done, config.epochs):
        started = time.time()
        model.train()
        hook.start_epoch()
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
        state.epochs_done, mean_loss = epoch + 1, loss_sum.item() / max(step, 1)
        state.losses.append(mean_loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch, mean_loss)
        _save_or_pause(saving, key, config.epochs, state, parts, time.time() - started)
    model.eval()
    return model


def _save_or_pause(saving: Checkpointing, key: str, epochs: int, state: checkpoint.TrainingState,
                   parts: dict, epoch_s: float) -> None:
    """Save when an ``every``-th epoch or the last ended; save and pause when the next epoch would miss the deadline."""
    if saving.path is None:
        return
    done = state.epochs_done
    pause = saving.deadline is not None and done < epochs and time.time() + epoch_s > saving.deadline
    if pause or done == epochs or done % saving.every == 0:
        checkpoint.save(saving, key, epochs, state, parts)
    if pause:
        raise TrainingPaused(f"attack training paused at its deadline after epoch {done} of {epochs}",
                             f"run it again to continue from {saving.path}")


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, dataset: str, device: str = "cpu",
            batch_size: int = 512) -> np.ndarray:
    model.eval().to(device)
    data = to_tensor_batch(images)
    preds = [model(normalize_for(data[i:i + batch_size].to(device), dataset)).argmax(1).cpu()
             for i in range(0, len(data), batch_size)]
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def accuracy_and_asr(model: nn.Module, test_images: np.ndarray, test_labels: np.ndarray, trigger: Trigger,
                     target: int, dataset: str, device: str = "cpu") -> tuple[float, float]:
    """C-Acc on clean test images and ASR on triggered non-target test images (fractions)."""
    acc = float((predict(model, test_images, dataset, device) == test_labels).mean())
    keep = test_labels != target
    asr = float((predict(model, trigger(test_images[keep]), dataset, device) == target).mean())
    return acc, asr
