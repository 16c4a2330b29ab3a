"""Pure-PyTorch core of feature shift tuning: modes, head discovery, the tuning loop and the metrics.

Nothing in this sub-package knows about BackdoorBench, records or files.
"""
from fst_plugin.core.alpha import AlphaChoice, AlphaSearch, choose_alpha, fixed_alpha, split_held_out
from fst_plugin.core.head import ClassifierHead, feature_shift_penalty, find_head, project_head_norm, reinit_head
from fst_plugin.core.metrics import BackdoorMetrics, defense_effectiveness_rating, evaluate_backdoor
from fst_plugin.core.modes import MODES, TuningMode, get_mode
from fst_plugin.core.tuning import (
    TuningConfig,
    TuningRun,
    TuningState,
    tune,
)

__all__ = [
    "AlphaChoice",
    "AlphaSearch",
    "BackdoorMetrics",
    "ClassifierHead",
    "MODES",
    "TuningConfig",
    "TuningMode",
    "TuningRun",
    "TuningState",
    "choose_alpha",
    "fixed_alpha",
    "defense_effectiveness_rating",
    "evaluate_backdoor",
    "feature_shift_penalty",
    "find_head",
    "get_mode",
    "project_head_norm",
    "reinit_head",
    "split_held_out",
    "tune",
]
