"""Attack training that survives being stopped: a checkpoint every few epochs, a deadline, and resume.

A checkpoint holds everything the next epoch depends on: the model, the optimiser, the schedule, the AMP scaler,
the per-epoch losses so far and torch's global RNG state (each epoch's shuffling and augmentation are drawn
from a generator seeded from it), so a resumed run continues with the very batches an uninterrupted run would
have drawn: on the CPU its weights are bit-identical. A small JSON sidecar (``<checkpoint>.json``: epochs done
of how many) lets a caller see the progress without loading the tensors.

The checkpoint is keyed by a fingerprint of the training (config and data); a checkpoint of another training
is ignored with a warning and overwritten, never resumed from.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from fst_plugin.errors import FSTError
from fst_plugin.io_utils import atomic_torch_save, atomic_write_text

log = logging.getLogger(__name__)


class TrainingPaused(FSTError):
    """Training stopped at its deadline after saving a checkpoint; running it again continues from there."""


@dataclass(frozen=True)
class Checkpointing:
    """Where attack training keeps its checkpoint, how often (epochs) it saves it, and when it must pause.

    ``deadline`` is a Unix time: after an epoch, training pauses (checkpoint, then ``TrainingPaused``) when
    another epoch as long as the last one would end past it."""

    path: Optional[Path] = None
    every: int = 5
    deadline: Optional[float] = None

    def progress_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".json")


@dataclass
class TrainingState:
    """What a checkpoint restores: the epochs done and their mean losses."""

    epochs_done: int = 0
    losses: list[float] = field(default_factory=list)


def fingerprint(settings: dict[str, Any], *tensors: torch.Tensor) -> str:
    """A short hash of the training settings and its data (so a checkpoint is only resumed by the same training)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def read_progress(checkpointing: Checkpointing) -> Optional[dict[str, Any]]:
    """The sidecar of a checkpoint (``epochs_done``, ``epochs``, ``saved``), or None when there is none."""
    path = checkpointing.progress_path()
    return json.loads(path.read_text()) if path.is_file() else None


def save(checkpointing: Checkpointing, key: str, epochs: int, state: TrainingState,
         parts: dict[str, Any]) -> None:
    """Write the checkpoint (atomically), then its sidecar."""
    assert checkpointing.path is not None
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    payload = {"fingerprint": key, "epochs_done": state.epochs_done, "losses": list(state.losses), "rng": rng,
               **{name: part.state_dict() for name, part in parts.items()}}
    atomic_torch_save(payload, checkpointing.path)
    atomic_write_text(checkpointing.progress_path(), json.dumps(
        {"epochs_done": state.epochs_done, "epochs": epochs, "saved": time.time()}))
    log.info("checkpoint: %d/%d epochs in %s", state.epochs_done, epochs, checkpointing.path)


def restore(checkpointing: Checkpointing, key: str, parts: dict[str, Any]) -> TrainingState:
    """Load the checkpoint into ``parts`` when it is this training's; the state to continue from."""
    path = checkpointing.path
    if path is None or not path.is_file():
        return TrainingState()
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("fingerprint") != key:
        log.warning("ignoring %s: it is the checkpoint of another training (settings or data differ)", path)
        return TrainingState()
    for name, part in parts.items():
        part.load_state_dict(payload[name])
    torch.set_rng_state(payload["rng"]["cpu"])
    if "cuda" in payload["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    log.info("resuming attack training after epoch %d from %s", payload["epochs_done"], path)
    return TrainingState(int(payload["epochs_done"]), [float(v) for v in payload["losses"]])
