"""Unlearning with reversed backdoor samples: the data side of PAM (Min et al., NeurIPS 2024).

During tuning, about ``fraction`` of every batch is replaced by the output of a BTI-DBF trigger generator
(:mod:`fst_plugin.core.trigger_inversion`) while the labels stay the true ones, so the model learns to give
trigger-like images their own class. The generator is fitted in ``rounds`` rounds spread evenly over the tuning
epochs: the first on the model as it came in (before any re-initialisation, so the inversion sees the backdoored
head), each later one on the model tuned so far, towards the target class detected after the first (the
authors' ``btidbfu.py``: pretrain once, then per round decouple, train the generator, unlearn).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from fst_plugin.core.head import ClassifierHead
from fst_plugin.core.trigger_inversion import (
    Inversion,
    InversionConfig,
    TriggerGenerator,
    class_counts,
    invert,
    mask_saturation,
    with_reversed,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnlearningConfig:
    """The authors' CIFAR-10 settings as defaults: 3 rounds, 20% reversed images per batch."""

    rounds: int = 3
    fraction: float = 0.2
    inversion: InversionConfig = field(default_factory=InversionConfig)


def round_starts(epochs: int, rounds: int) -> list[int]:
    """The epochs at which a round begins: ``rounds`` blocks of (nearly) equal length, at most one per epoch."""
    return sorted({r * epochs // rounds for r in range(min(rounds, epochs))})


class ReversedSamples:
    """The trigger generator of one tuning run: fitted at each round's start, mixed into every training batch.

    ``rounds`` holds one diagnostic row a round (the feature split, the mask's saturation, the detected class and
    the share of generated images the model gives it); whether the detected class is the attack's target is for
    the evaluator to say, which knows the record."""

    def __init__(self, config: UnlearningConfig, loader: Iterable, num_classes: int, device: str, seed: int,
                 checkpoint: Optional[Callable[[dict[str, Any]], None]] = None, checkpoint_every_s: float = 300.0) -> None:
        """``checkpoint(state)``, when given, receives the round under way (:meth:`resume_round` takes it back) at
        most every ``checkpoint_every_s`` seconds and at the end of every phase: an inversion runs for hours on a
        CPU, and an epoch checkpoint only comes after it."""
        self.config, self.loader, self.num_classes, self.device = config, loader, num_classes, device
        self.rng = torch.Generator().manual_seed(seed)  # its own: the tuning's shuffling is not shifted
        self.inversion: Optional[Inversion] = None
        self.target: Optional[int] = None
        self.rounds: list[dict[str, Any]] = []
        self.checkpoint, self.checkpoint_every_s = checkpoint, checkpoint_every_s
        self.last_checkpoint = time.monotonic()
        self.pending: Optional[dict[str, Any]] = None  # a round stopped part-way, to continue (resume_round)

    @property
    def generator(self) -> Optional[TriggerGenerator]:
        return None if self.inversion is None else self.inversion.generator

    @property
    def rounds_done(self) -> int:
        return len(self.rounds)

    def fit_round(self, model: nn.Module, head: ClassifierHead) -> None:
        """One inversion round on ``model`` as it is now (pretraining first in round 1); the target class is
        detected after round 1 and pulls the later rounds. ``model`` is left as it was."""
        log.info("trigger inversion round %d of %d%s", self.rounds_done + 1, self.config.rounds,
                 "" if self.target is None else f" (towards class {self.target})")
        started = time.perf_counter()
        self._continue_pending()
        if self.inversion is None:
            channels = next(iter(self.loader))[0].shape[1]
            self.inversion = Inversion.new(channels, self.config.inversion, self.device)
        self.inversion.saved = self._offer_checkpoint
        self.inversion = invert(model, head, self.loader, self.config.inversion, self.device, inversion=self.inversion,
                                target=self.target, generator=self.rng)
        counts = class_counts(model, self.inversion.generator, self.loader, self.device, self.num_classes)
        if self.target is None:
            self.target = int(counts.argmax())
        row = {"round": self.rounds_done + 1, "feature_split": self.inversion.split,
               "mask_saturation": round(mask_saturation(self.inversion.mask), 4),
               "mask_benign_share": round(float((self.inversion.mask > 0.5).float().mean()), 4),
               "detected_class": self.target,
               "share_to_detected": round(float(counts[self.target]) / max(int(counts.sum()), 1), 4),
               "class_counts": counts.tolist(), "seconds": round(time.perf_counter() - started, 1)}
        self.rounds.append(row)
        log.info("inversion round %d: features split at %s; mask saturation %.3f; %.1f%% of reversed samples go to "
                 "class %d (%.0f s)", row["round"], row["feature_split"], row["mask_saturation"],
                 100 * row["share_to_detected"], self.target, row["seconds"])

    def resume_round(self, state: dict[str, Any]) -> None:
        """Continue the round a ``checkpoint`` call saved when that round comes (round 1 before tuning, a later one
        at its epoch), instead of starting it afresh. The generator, its optimisers, the mask, the phase and its
        step and this object's random generator come back; the loader's order after the step does not, so a
        resumed round is not bit-identical to an uninterrupted one."""
        self.pending = state

    def _continue_pending(self) -> None:
        state, self.pending = self.pending, None
        if state is None or state["round"] != self.rounds_done + 1:
            return
        channels = next(iter(self.loader))[0].shape[1]
        self.inversion = Inversion.from_state(state["inversion"], channels, self.config.inversion, self.device)
        self.rng.set_state(state["rng"])
        self.target = state["target"]
        log.info("trigger inversion round %d continues at its %s phase, step %d", state["round"],
                 self.inversion.phase, self.inversion.step)

    def _offer_checkpoint(self, inversion: Inversion, phase_ended: bool) -> None:
        now = time.monotonic()
        if self.checkpoint is None or not (phase_ended or now - self.last_checkpoint >= self.checkpoint_every_s):
            return
        self.last_checkpoint = now
        self.checkpoint({"round": self.rounds_done + 1, "inversion": inversion.state_dict(), "rng": self.rng.get_state(),
                         "target": self.target})

    def start_epoch(self, model: nn.Module, head: ClassifierHead, epoch: int, epochs: int) -> None:
        """Fit the next round when ``epoch`` starts one (the first round is fitted before tuning begins)."""
        if epoch in round_starts(epochs, self.config.rounds)[1:]:
            self.fit_round(model, head)

    def mix(self, images: torch.Tensor) -> torch.Tensor:
        """The batch with ``fraction`` of its images replaced by reversed samples."""
        if self.generator is None:
            raise RuntimeError("no trigger generator yet: fit_round() runs before the first batch")
        return with_reversed(images, self.generator, self.config.fraction, self.rng)

    def generator_state(self) -> dict[str, Any]:
        """The generator with what rebuilds it alone (:func:`generator_from_state`): ``trigger_generator.pt``."""
        inversion, gen = self.config.inversion, self.generator
        return {"generator": None if gen is None else {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()},
                "channels": None if gen is None else gen.out.out_channels, "base_filters": inversion.base_filters,
                "depth": inversion.depth, "target": self.target, "rounds": list(self.rounds)}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the generator with its Adam (it carries across rounds), the rounds, the
        RNG."""
        return {**self.generator_state(), "inversion": None if self.inversion is None else self.inversion.state_dict(),
                "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inversion = None if state["inversion"] is None else Inversion.from_state(
            state["inversion"], state["channels"], self.config.inversion, self.device)
        self.target, self.rounds = state["target"], list(state["rounds"])
        self.rng.set_state(state["rng"])


def generator_from_state(state: dict[str, Any]) -> TriggerGenerator:
    """The trigger generator a run saved (``trigger_generator.pt`` beside a PAM result), in eval mode."""
    gen = TriggerGenerator(state["channels"], state["base_filters"], state["depth"])
    gen.load_state_dict(state["generator"])
    return gen.eval()
