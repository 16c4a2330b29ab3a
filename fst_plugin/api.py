"""The public way to run a defense from Python: ``run_defense("fst", "record/badnet_0_1", epochs=5)``.

Keyword settings are overrides, validated like the command line (before anything is written): on ``yaml_path``
when given, else on the yaml this package ships for ``method`` on the record's own dataset (a dataset it ships none
for is refused), and the registered defense runs them through the same life cycle as ``fst-plugin run`` and
BackdoorBench's launchers. The demo and the benchmark scripts use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fst_plugin.defense.config import DEPRECATED_KEYS, SPECS
from fst_plugin.defense.runner import DefenseResult
from fst_plugin.errors import ConfigError
from fst_plugin.plugins import load_defense


def run_defense(method: str, record: str | Path, **overrides: Any) -> DefenseResult:
    """Run defense ``method`` on the attack record folder ``record``; return its :class:`DefenseResult`.

    ``overrides`` are config keys (see ``fst_plugin.defense.config.DefenseConfig``), e.g. ``dataset_path``,
    ``epochs``, ``device``, ``save_name`` (write to ``defense/<save_name>/``) or ``eval_subset`` (per-epoch
    evaluation on a seeded subset of the test sets); they win over the yaml: ``yaml_path`` when given, else the one
    shipped for ``method`` on the record's dataset (its ``clean_data``; ``dataset`` does not choose it, and one that
    disagrees with the record is refused). A value of None leaves the yaml's value.
    """
    unknown = sorted(set(overrides) - set(SPECS) - set(DEPRECATED_KEYS))
    if unknown:
        raise ConfigError(f"run_defense got unknown setting(s) {', '.join(map(repr, unknown))}",
                          f"use config keys: {', '.join(SPECS)}")
    return load_defense(method)({**overrides, "record": str(record)}).defense(None)
