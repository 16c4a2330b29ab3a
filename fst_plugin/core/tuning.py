"""The one tuning loop behind all five modes.

``tune`` re-initialises the head (if the mode says so), freezes what the mode does not train, and runs SGD
(momentum 0.9) with cosine annealing over the epochs, adding the feature-shift penalty α·⟨W, W₀⟩ and
rescaling the head to ‖W₀‖ after every step as the mode and config say. Frozen modules stay in eval mode,
so a linear probe does not move BatchNorm statistics either. Two options of PAM (Min et al., NeurIPS 2024) work
with any mode: ``pam_rho > 0`` takes each step's gradient at θ + ρ·(θ₀ − θ)/‖θ₀ − θ‖, the point along the path
back to the backdoored model θ₀ (:mod:`fst_plugin.core.pam`), and ``unlearning`` mixes reversed backdoor
samples into every batch (:mod:`fst_plugin.core.unlearning`).

Under torchrun (an open process group, see :mod:`fst_plugin.distributed`) the model trains in
DistributedDataParallel: every rank starts from the same record and seed, so W₀ and the re-initialised head are
the same everywhere (DDP also broadcasts rank 0's weights), the averaged gradient includes the same α·W₀ term,
and the projection acts on identical weights, so the head stays in sync.

Resuming is exact on the CPU: the state saved after each epoch (``TuningState``) holds the model, the
optimiser, the scheduler, W₀, the history and every random generator, so a run resumed from epoch k ends
with the same weights as one that never stopped.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from fst_plugin.core.head import ClassifierHead, feature_shift_penalty, project_head_norm, reinit_head
from fst_plugin.core.modes import TuningMode
from fst_plugin.core.pam import PathAwareMinimizer, anchor_of
from fst_plugin.core.unlearning import ReversedSamples
from fst_plugin.distributed import begin_epoch, global_mean_loss, wrap_model
from fst_plugin.errors import TrainingDiverged
from fst_plugin.runtime import capture_rng, progress, restore_rng, seed_everything

log = logging.getLogger(__name__)


PROJECTION_BOUNDS = ("equal", "at_most")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TuningConfig:
    """Optimisation settings (defaults: the paper's CIFAR-10 values)."""

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    alpha: float = 0.2
    projection: Optional[bool] = None  # None: the mode's default
    # "equal": W ← W·‖W₀‖/‖W‖ after every step (the official code); "at_most": only when ‖W‖ > ‖W₀‖ (the
    # paper's constraint ‖W‖ ≤ ‖W₀‖), which leaves a small re-initialised head small until it grows
    projection_bound: str = "equal"
    # "cosine": annealed to 0 over the epochs (the paper's); "constant": lr throughout (the retuning attack's)
    lr_schedule: str = "cosine"
    # > 0: PAM's step, the gradient taken at θ + ρ·d/‖d‖ with d = θ₀ − θ (0: the plain optimiser step)
    pam_rho: float = 0.0
    device: str = "cpu"
    amp: bool = False
    seed: int = 0
    show_progress: Optional[bool] = None  # None: only when stderr is a terminal

    def __post_init__(self) -> None:
        if self.projection_bound not in PROJECTION_BOUNDS:
            raise ValueError(f"projection_bound is {self.projection_bound!r}; use one of {', '.join(PROJECTION_BOUNDS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule is {self.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
        if not self.pam_rho >= 0:
            raise ValueError(f"pam_rho is {self.pam_rho}; it must be >= 0")

    def projection_for(self, mode: TuningMode) -> bool:
        return mode.project_head_norm if self.projection is None else self.projection


@dataclass
class TuningState:
    """Everything needed to continue a run after ``epochs_done`` complete epochs."""

    epochs_done: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    initial_head_weights: list[torch.Tensor]
    history: list[dict[str, Any]]
    rng: dict[str, Any] = field(default_factory=dict)
    unlearning: Optional[dict[str, Any]] = None  # ReversedSamples.state_dict(), when the run unlearns

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuningState":
        return cls(**data)


def _set_trainable(model: nn.Module, head: ClassifierHead, mode: TuningMode) -> list[nn.Parameter]:
    head_params = head.parameter_names()
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(mode.train_head if name in head_params else mode.train_backbone)
        if param.requires_grad:
            trainable.append(param)
    return trainable


def _train_mode(model: nn.Module, head: ClassifierHead, mode: TuningMode) -> None:
    """Train mode for what trains; eval mode (fixed BatchNorm statistics) for what is frozen."""
    model.train(mode.train_backbone)
    for layer in head.modules:
        layer.train(mode.train_head)


class TuningRun:
    """One run of the tuning loop, in named steps (Lightning-style): ``__init__`` sets up (seed, W₀, re-init,
    freeze, optimiser, schedule), ``restore`` resumes, ``training_step`` is one batch, ``train_epoch`` one epoch,
    ``snapshot`` the resumable state and ``finish`` hands the model back. :func:`tune` runs them in order; a
    distributed or otherwise customised loop can wrap the same steps."""

    def __init__(self, model: nn.Module, head: ClassifierHead, mode: TuningMode, config: TuningConfig,
                 unlearning: Optional[ReversedSamples] = None) -> None:
        self.model, self.head, self.mode, self.config = model, head, mode, config
        self.unlearning = unlearning
        self.device = torch.device(config.device)
        seed_everything(config.seed)
        model.to(self.device)
        self.initial_weights = [layer.weight.detach().clone() for layer in head.modules]
        anchor = anchor_of(model) if config.pam_rho > 0 else None  # θ₀, the backdoored model, head included
        self.projection = config.projection_for(mode)
        trainable = _set_trainable(model, head, mode)
        if not trainable:
            raise ValueError(f"mode {mode.name} leaves no parameter to train")
        self.optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.epochs)
                          if config.lr_schedule == "cosine" else
                          torch.optim.lr_scheduler.ConstantLR(self.optimizer, factor=1.0, total_iters=0))
        self.pam = PathAwareMinimizer(self.optimizer, anchor, config.pam_rho) if anchor is not None else None
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.use_amp = config.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.criterion = nn.CrossEntropyLoss()
        self.forward_model: nn.Module = model  # DistributedDataParallel(model) under torchrun, from restore()

    def restore(self, state: Optional[TuningState]) -> None:
        """Continue after ``state.epochs_done`` epochs, or start afresh: fit the first round of reversed samples
        on the model as it came in, then re-initialise the head (as the mode says). Then fix W₀ on the device and,
        for a fresh run with projection, bring the (re-initialised) head to ‖W₀‖ before the first step."""
        if state is None:
            if self.unlearning is not None:
                self.unlearning.fit_round(self.model, self.head)
            if self.mode.reinit_head:
                reinit_head(self.head)
        else:
            self.model.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            self.initial_weights = list(state.initial_head_weights)
            self.history = list(state.history)
            self.start_epoch = state.epochs_done
            if self.unlearning is not None:  # before the RNG is restored: rebuilding the generator draws from it
                if state.unlearning is None:
                    raise ValueError("the resumed state holds no reversed-sample generator, but this run unlearns")
                self.unlearning.load_state_dict(state.unlearning)
            restore_rng(state.rng)
            log.info("resuming %s from epoch %d of %d", self.mode.name, self.start_epoch, self.config.epochs)
        self.initial_weights = [w.to(self.device) for w in self.initial_weights]
        self.target_norms = [w.norm() for w in self.initial_weights]
        if self.projection and self.start_epoch == 0:
            self.project()
        self.forward_model = wrap_model(self.model, self.device)  # DDP under torchrun, after freezing

    def project(self) -> None:
        project_head_norm(self.head, self.target_norms, self.config.projection_bound == "at_most")

    def training_step(self, batch: Any, epoch: int, batch_index: int) -> tuple[float, int, int]:
        """One optimiser step on ``batch``; returns (loss, correct predictions, images), over all ranks."""
        inputs, targets = batch[0].to(self.device), batch[1].to(self.device)
        if self.unlearning is not None:
            inputs = self.unlearning.mix(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        with self.pam.perturbed() if self.pam is not None else contextlib.nullcontext():
            stats = self._loss_and_backward(inputs, targets, epoch, batch_index)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.projection:
            self.project()
        return stats

    def _loss_and_backward(self, inputs: torch.Tensor, targets: torch.Tensor, epoch: int,
                           batch_index: int) -> tuple[float, int, int]:
        """The loss (cross-entropy, plus the penalty where the mode has one) and its gradient, at the parameters
        as they are now (PAM's probe point inside ``perturbed()``); stops the run on a non-finite loss."""
        config, mode = self.config, self.mode
        with torch.autocast(self.device.type, enabled=self.use_amp):
            logits = self.forward_model(inputs)
            loss, global_loss, right, count = global_mean_loss(logits, targets, self.criterion)
            if mode.feature_shift_penalty and config.alpha:
                penalty = config.alpha * feature_shift_penalty(self.head, self.initial_weights)
                loss, global_loss = loss + penalty, None if global_loss is None else global_loss + penalty.item()
        loss_value = loss.item() if global_loss is None else global_loss
        if not math.isfinite(loss_value):  # the same value on every rank: all stop together
            raise TrainingDiverged(
                f"the loss became {loss_value} in epoch {epoch + 1} (batch {batch_index + 1}) of {mode.name}",
                f"lower the learning rate (lr={config.lr})"
                + (f" or alpha (alpha={config.alpha})" if mode.feature_shift_penalty else "") + "; no model was kept",
            )
        self.scaler.scale(loss).backward()
        return loss_value, right, count

    def train_epoch(self, train_loader: Iterable, epoch: int) -> dict[str, Any]:
        """One pass over ``train_loader`` and a scheduler step; returns the epoch's training row."""
        if self.unlearning is not None:
            self.unlearning.start_epoch(self.model, self.head, epoch, self.config.epochs)
        _train_mode(self.model, self.head, self.mode)
        begin_epoch(train_loader, epoch)
        loss_sum, correct, seen, n_batches = 0.0, 0, 0, 0
        for batch in progress(train_loader, self.config.show_progress,
                              f"{self.mode.name} epoch {epoch + 1}/{self.config.epochs}"):
            loss, right, count = self.training_step(batch, epoch, n_batches)
            loss_sum += loss
            correct += right
            seen += count
            n_batches += 1
        self.scheduler.step()
        return {"epoch": epoch, "batch": n_batches, "train_epoch_loss_avg_over_batch": loss_sum / max(n_batches, 1),
                "train_acc": correct / max(seen, 1)}

    def snapshot(self, epochs_done: int) -> TuningState:
        """The resumable state after ``epochs_done`` complete epochs (copies: training goes on in place)."""
        return TuningState(
            epochs_done=epochs_done,
            model={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            optimizer=copy.deepcopy(self.optimizer.state_dict()),  # momentum buffers change in place
            scheduler=copy.deepcopy(self.scheduler.state_dict()),
            initial_head_weights=[w.detach().cpu() for w in self.initial_weights],
            history=list(self.history),
            rng=capture_rng(),
            unlearning=None if self.unlearning is None else self.unlearning.state_dict(),
        )

    def finish(self) -> None:
        """Every parameter trainable again and the model in eval mode, as it came in (plus the tuning)."""
        for param in self.model.parameters():
            param.requires_grad_(True)
        self.model.eval()


def tune(
    model: nn.Module,
    head: ClassifierHead,
    mode: TuningMode,
    train_loader: Iterable,
    config: TuningConfig,
    evaluate: Optional[Callable[[nn.Module], dict[str, float]]] = None,
    on_epoch_end: Optional[Callable[[TuningState], None]] = None,
    resume: Optional[TuningState] = None,
    unlearning: Optional[ReversedSamples] = None,
) -> list[dict[str, Any]]:
    """Tune ``model`` in place with ``mode``; return one history row per epoch.

    ``evaluate(model)`` is called after every epoch and its metrics join that epoch's row.
    ``on_epoch_end(state)`` receives the resumable state after each complete epoch. ``unlearning``: reversed
    backdoor samples mixed into every batch (PAM's data; None: the clean batches as they come).
    """
    run = TuningRun(model, head, mode, config, unlearning)
    run.restore(resume)
    for epoch in range(run.start_epoch, config.epochs):
        row = run.train_epoch(train_loader, epoch)
        if evaluate is not None:
            row.update(evaluate(model))
        run.history.append(row)
        log.info("%s epoch %d/%d: %s", mode.name, epoch + 1, config.epochs,
                 ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if on_epoch_end is not None:
            on_epoch_end(run.snapshot(epoch + 1))
    run.finish()
    return run.history
