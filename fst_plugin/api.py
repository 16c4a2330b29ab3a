"""The public way to run a defense from Python: ``run_defense("fst", "record/badnet_0_1", epochs=5)``.

Keyword settings become a :class:`~fst_plugin.defense.config.DefenseConfig` here, validated like the command line
(the yaml, then the overrides, before anything is written), and the registered defense runs it through the same
life cycle as ``fst-plugin run`` and BackdoorBench's launchers. The demo and the benchmark scripts use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fst_plugin.defense.config import DEPRECATED_KEYS, SPECS, load_config
from fst_plugin.defense.runner import DefenseResult
from fst_plugin.defense.shipped import shipped_config
from fst_plugin.errors import ConfigError
from fst_plugin.plugins import load_defense


def run_defense(method: str, record: str | Path, **overrides: Any) -> DefenseResult:
    """Run defense ``method`` on the attack record folder ``record``; return its :class:`DefenseResult`.

    ``overrides`` are config keys (see ``fst_plugin.defense.config.DefenseConfig``), e.g. ``dataset_path``,
    ``epochs``, ``device``, ``save_name`` (write to ``defense/<save_name>/``) or ``eval_subset`` (per-epoch
    evaluation on a seeded subset of the test sets); they win over the yaml, which defaults to the one shipped for
    ``method`` on ``dataset`` (cifar10 unless given). A value of None leaves the yaml's value.
    """
    unknown = sorted(set(overrides) - set(SPECS) - set(DEPRECATED_KEYS))
    if unknown:
        raise ConfigError(f"run_defense got unknown setting(s) {', '.join(map(repr, unknown))}",
                          f"use config keys: {', '.join(SPECS)}")
    if overrides.get("yaml_path") is None:
        overrides["yaml_path"] = str(shipped_config(method, overrides.get("dataset") or "cifar10"))
    config = load_config({**overrides, "record": str(record)})
    return load_defense(method)(config).defense(None)
