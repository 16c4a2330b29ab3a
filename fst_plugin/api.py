"""The public way to run a defense from Python: ``run_defense("fst", "record/badnet_0_1", epochs=5)``.

It drives the registered defense through the same life cycle as ``fst-plugin run`` and BackdoorBench's
launchers (yaml, then overrides, validated before anything is written), with typed keyword arguments
instead of an argv list. The demo and the benchmark scripts use it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fst_plugin.adapter.defenses import DefenseResult
from fst_plugin.defense.config import DEPRECATED_KEYS, SPECS
from fst_plugin.defense.shipped import shipped_config
from fst_plugin.errors import ConfigError
from fst_plugin.plugins import load_defense


def run_defense(method: str, record: str | Path, **overrides: Any) -> DefenseResult:
    """Run defense ``method`` on the attack record folder ``record``; return its :class:`DefenseResult`.

    ``overrides`` are config keys (see ``fst_plugin.defense.config.DefenseConfig``), e.g. ``dataset_path``, ``epochs``,
    ``device``, ``save_name`` (write to ``defense/<save_name>/``) or ``eval_subset`` (per-epoch evaluation on a
    seeded subset of the test sets); they win over the yaml, which defaults to the one shipped for ``method``
    on ``dataset`` (cifar10 unless given). A value of None leaves the yaml's value.
    """
    unknown = sorted(set(overrides) - set(SPECS) - set(DEPRECATED_KEYS))
    if unknown:
        raise ConfigError(f"run_defense got unknown setting(s) {', '.join(map(repr, unknown))}",
                          f"use config keys: {', '.join(SPECS)}")
    if overrides.get("yaml_path") is None:
        overrides["yaml_path"] = str(shipped_config(method, overrides.get("dataset") or "cifar10"))
    args = argparse.Namespace(**{**{key: None for key in SPECS}, **overrides,
                                 "record": str(record)})
    defense_cls = load_defense(method)
    return defense_cls(args).defense(None)
