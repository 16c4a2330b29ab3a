"""The one writer of a probe's files: ``<probe>_df.csv``, ``run_info.json``, then ``<probe>_result.pt``.

Each file is written atomically and only after the probe finished; the result file goes last, so its presence
means the run finished (:func:`fst_plugin.probes.qra.read_metrics` and the benchmark rely on it).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd
import torch
from torch import nn

from fst_plugin.io_utils import atomic_torch_save, atomic_write_text
from fst_plugin.probes.config import QraConfig, RetuneConfig
from fst_plugin.record import AttackRecord, PoisonPool
from fst_plugin.record.defense_output import environment_versions
from fst_plugin.record.layout import RUN_INFO_NAME


@dataclass(frozen=True)
class ProbeResult:
    """What both probes report of a finished run."""

    defense: str
    save_dir: Path
    clean_index_source: str
    n_clean: int
    poisoned_indices: tuple[int, ...]
    wall_time_s: float
    history: list[dict[str, Any]]


@dataclass(frozen=True)
class ProbeRun:
    """Where a probe ran: the record, the model it probed, the pool its poisoned images came from."""

    method: str                   # "retune" or "qra"
    protocol: str                 # the authors' script it follows
    record: AttackRecord
    model_name: str
    device: str
    pool: PoisonPool
    config: RetuneConfig | QraConfig


def run_info(run: ProbeRun, result: ProbeResult, measured: dict[str, Any],
             reference: Optional[Mapping[str, str]] = None, target: Optional[int] = None) -> dict[str, Any]:
    """``run_info.json``'s content; ``measured`` holds the probe's numbers (retune: before/after, QRA: metrics),
    ``reference`` (``reference_record`` or ``reference_model``: path) and ``target`` are written by the probes whose
    numbers depend on them (QRA)."""
    return {"method": run.method, "protocol": run.protocol, "defense": result.defense,
            "record": str(run.record.record_dir),
            **(reference or {}),
            "model_name": run.model_name, "device": run.device, "seed": run.config.random_seed,
            **({} if target is None else {"target": target}),
            "clean_index_source": result.clean_index_source, "n_clean": result.n_clean,
            "n_poisoned": len(result.poisoned_indices), "poisoned_train_indices": list(result.poisoned_indices),
            "poison_pool": run.pool.summary(), "wall_time_s": result.wall_time_s, **measured,
            "config": asdict(run.config),  # its paths become text through json's default=str
            "versions": environment_versions()}


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s weights, detached and on the CPU, as saved in a result file."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def write_probe_outputs(save_dir: Path, table_name: str, table: pd.DataFrame, info: dict[str, Any],
                        result_name: str, result: dict[str, Any]) -> None:
    """``table`` as ``table_name`` (csv), ``info`` as ``run_info.json``, then ``result`` as ``result_name``."""
    atomic_write_text(save_dir / table_name, table.to_csv())
    atomic_write_text(save_dir / RUN_INFO_NAME, json.dumps(info, indent=2, default=str))
    atomic_torch_save(result, save_dir / result_name)
