"""The tuning modes as data: one mechanism, six settings (the FST paper's five and PAM).

Head-norm projection default: ON in every mode. The official code rescales the head to ‖W₀‖ after every
optimiser step whatever the mode, and the paper's baseline numbers (LP, vanilla FT, FE-tuning, FT-init)
come from that code, so reproducing them needs the same default. ``--projection off`` turns it off for the
ablation (``TuningConfig.projection`` overrides the mode's default). PAM (Min et al., NeurIPS 2024) is the
authors' follow-up: vanilla fine-tuning with path-aware steps on batches holding reversed backdoor samples, and
no projection (their code has none); ``path_aware`` is only its default: any mode can take PAM's step and data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fst_plugin.errors import ConfigError


@dataclass(frozen=True)
class TuningMode:
    """What one tuning mode re-initialises, trains, penalises and projects."""

    name: str
    reinit_head: bool
    train_head: bool
    train_backbone: bool
    feature_shift_penalty: bool
    project_head_norm: bool
    summary: str
    path_aware: bool = False  # PAM's step and reversed-sample unlearning by default

    def uses_pam(self, choice: Optional[bool] = None) -> bool:
        """Whether a run takes PAM's step and data: the user's choice (on/off), else (auto, None) this mode's
        default."""
        return self.path_aware if choice is None else choice


MODES: dict[str, TuningMode] = {
    mode.name: mode
    for mode in (
        TuningMode("lp", reinit_head=False, train_head=True, train_backbone=False,
                   feature_shift_penalty=False, project_head_norm=True,
                   summary="linear probing: tune the head only"),
        TuningMode("vanilla-ft", reinit_head=False, train_head=True, train_backbone=True,
                   feature_shift_penalty=False, project_head_norm=True,
                   summary="vanilla fine-tuning of every parameter"),
        TuningMode("fe-tuning", reinit_head=True, train_head=False, train_backbone=True,
                   feature_shift_penalty=False, project_head_norm=True,
                   summary="re-initialise and freeze the head, tune the feature extractor"),
        TuningMode("ft-init", reinit_head=True, train_head=True, train_backbone=True,
                   feature_shift_penalty=False, project_head_norm=True,
                   summary="re-initialise the head, then fine-tune everything"),
        TuningMode("fst", reinit_head=True, train_head=True, train_backbone=True,
                   feature_shift_penalty=True, project_head_norm=True,
                   summary="feature shift tuning: re-init + alpha*<W, W0> penalty + head-norm projection"),
        TuningMode("pam", reinit_head=False, train_head=True, train_backbone=True,
                   feature_shift_penalty=False, project_head_norm=False, path_aware=True,
                   summary="path-aware minimisation: unlearn reversed backdoor samples, stepping along the path "
                           "away from the backdoored model"),
    )
}
# the FST paper's modes (the demo's table, the grid's ours-columns); PAM is the follow-up's
PAPER_MODES = ("lp", "vanilla-ft", "fe-tuning", "ft-init", "fst")


def get_mode(name: str) -> TuningMode:
    """Look a mode up by name (``fst``, ``fe-tuning``, ``ft-init``, ``lp``, ``vanilla-ft``, ``pam``)."""
    key = name.strip().lower().replace("_", "-")
    if key not in MODES:
        raise ConfigError(f"unknown tuning mode {name!r}", f"use one of {', '.join(MODES)}")
    return MODES[key]
