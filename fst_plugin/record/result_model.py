"""A saved model result (``defense_result.pt``, ``retune_result.pt``, an attack record's weights) as a ready model.

BackdoorBench's defenses save ``{'model_name', 'num_classes', 'model'}``; the FST authors' scripts a bare
state_dict; a training script's checkpoint often ``{'state_dict': ..., 'epoch': ...}``. One reader for all, used by the probes and the benchmark scripts. A model saved while pruned by
``torch.nn.utils.prune`` (BackdoorBench's fp keeps its mask on the last linear layer) holds ``<name>_orig`` and
``<name>_mask``; they are read as the pruned ``<name>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

from fst_plugin.errors import RecordError
from fst_plugin.models import build_model
from fst_plugin.models.factory import load_weights
from fst_plugin.record.safe_load import load_untrusted


@dataclass(frozen=True)
class ResultModel:
    """A model with the weights of a saved result, and the architecture and class count it was built with."""

    model: nn.Module
    name: str
    num_classes: int


@dataclass(frozen=True)
class SavedState:
    """A result file's weights and, when it names them, its architecture and class count."""

    state: dict[str, torch.Tensor]
    name: Optional[str]
    num_classes: Optional[int]


def read_result(path: Path, what: str, trust: bool = False) -> SavedState:
    """The weights (and names) a result file holds, read without trusting its pickle unless ``trust``:
    BackdoorBench's ``{'model_name', 'num_classes', 'model'}``, a checkpoint's ``{'state_dict': ...}`` or a bare
    state_dict (the authors' own format). A bare state_dict's values are tensors, so a ``'state_dict'`` key holding
    a mapping cannot be one of its parameters."""
    data = load_untrusted(path, what, trust=trust)
    if isinstance(data, Mapping) and "model" in data:
        state, name, classes = data["model"], data.get("model_name"), data.get("num_classes")
    elif isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        state, name, classes = data["state_dict"], data.get("model_name"), data.get("num_classes")
    else:
        state, name, classes = data, None, None
    fix = f"re-run the command that wrote this {what}"
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise RecordError(f"{what} {path} holds no state_dict", fix)
    if name is not None and not isinstance(name, str):
        raise RecordError(f"{what} {path}: model_name is {name!r}", fix)
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, (int, np.integer))):
        raise RecordError(f"{what} {path}: num_classes is {classes!r}", fix)
    return SavedState(fold_pruning(state), name, None if classes is None else int(classes))


def fold_pruning(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each pruned ``<name>_orig`` / ``<name>_mask`` pair replaced by ``<name>`` = orig × mask."""
    out = dict(state)
    for key in [k for k in state if k.endswith("_orig") and k[:-5] + "_mask" in state]:
        base = key[:-5]
        out[base] = out.pop(key) * out.pop(base + "_mask")
    return out


def model_from_state(state: Mapping[str, torch.Tensor], name: str, num_classes: int,
                     channels: int = 3) -> ResultModel:
    """``name`` built for ``num_classes`` classes and ``channels`` input channels, with ``state`` loaded."""
    model = build_model(name, num_classes, channels)
    load_weights(model, dict(state), name)
    return ResultModel(model, name, num_classes)


def load_result_model(path: Path, what: str, trust: bool = False, model_name: Optional[str] = None,
                      num_classes: Optional[int] = None, channels: int = 3) -> ResultModel:
    """A result file as a model; ``model_name`` and ``num_classes`` stand in where the file names none."""
    saved = read_result(path, what, trust)
    name, classes = saved.name or model_name, saved.num_classes or num_classes
    if name is None or classes is None:
        raise RecordError(f"{what} {path} names no model_name or num_classes",
                          f"re-run the command that wrote this {what}")
    return model_from_state(saved.state, name, classes, channels)
