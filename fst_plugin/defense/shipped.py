"""The defense yamls this package ships (``defense_configs/<method>/<dataset>.yaml``), generated from
:class:`~fst_plugin.defense.config.DefenseConfig`.

A BackdoorBench defense yaml holds every key (its scripts, and the self-contained defenses ``fst-plugin export``
writes, read nothing else), so the shipped files stay complete; but only :data:`SHIPPED_VALUES` and
:data:`PAPER_VALUES` below are written by hand: every other value, and every comment, comes from the fields.
``python -m fst_plugin.defense.shipped`` rewrites the files; a test fails when they differ from what this module
generates, so a default changed on the dataclass cannot leave a stale copy in 20 yamls.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fst_plugin.core.modes import MODES
from fst_plugin.defense.config import SPECS, YAML_KEYS
from fst_plugin.errors import ConfigError
from fst_plugin.io_utils import atomic_write_text
from fst_plugin.options import as_text

DATASETS = ("cifar10", "cifar100", "gtsrb", "tiny")
# every shipped yaml: BackdoorBench's loader settings (its defense yamls' values)
SHIPPED_VALUES: dict[str, Any] = {"pin_memory": True, "non_blocking": True, "num_workers": 4}
# the paper's per-dataset settings (Min et al., NeurIPS 2023, sec. 5.1 / app. B); "alpha" only where FST runs
PAPER_VALUES: dict[str, dict[str, Any]] = {
    "cifar10": {},
    "cifar100": {"epochs": 15, "lr": 0.001, "ratio": 0.05, "alpha": 0.001},
    "gtsrb": {"epochs": 15, "alpha": 0.1},
    "tiny": {"epochs": 15, "lr": 0.001, "ratio": 0.05, "alpha": 0.001},
}
# PAM's own settings, every dataset (Min et al., NeurIPS 2024; the authors' fine_tune/BTIDBF cfg.py and defense.sh
# for CIFAR-10): SGD lr 0.01, momentum 0.1, no schedule, 3 rounds of 30 unlearning epochs, 2500 clean images (5%)
METHOD_VALUES: dict[str, dict[str, Any]] = {
    "pam": {"epochs": 90, "lr": 0.01, "sgd_momentum": 0.1, "lr_scheduler": "ConstantLR", "ratio": 0.05},
}
SOURCES = {"pam": "the authors' settings (Min et al., NeurIPS 2024, fine_tune/BTIDBF cfg.py / defense.sh)"}


def shipped_configs_dir() -> Path:
    """The folder of the shipped defense yamls (``<method>/<dataset>.yaml``): the one place that knows it.

    ``fst_plugin/defense_configs`` is a symlink to the repository's top-level ``defense_configs/`` (the
    folder the design keeps at the top). One path then serves every install mode: an editable install and
    any run from the repository root (where the repository's ``fst_plugin/`` shadows an installed one) read
    the top-level folder through the link, and a wheel holds real copies, because setuptools follows the
    link when it collects package data. The fallback is for a checkout whose file system has no symlinks
    (git then writes the link as a small text file): the top-level folder next to the package.
    """
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "defense_configs", package.parent / "defense_configs"):
        if folder.is_dir():
            return folder
    raise ConfigError("the shipped defense configs are missing (no fst_plugin/defense_configs/)",
                      "reinstall backdoorbench-fst")


def shipped_config(method: str, dataset: str) -> Path:
    """Path of the yaml shipped for ``method`` on ``dataset`` (``config`` and unknown datasets: cifar10's)."""
    folder = shipped_configs_dir() / method
    source = folder / f"{'cifar10' if dataset == 'config' else dataset}.yaml"
    if not source.is_file():
        source = folder / "cifar10.yaml"
    if not source.is_file():
        raise ConfigError(f"no shipped config for defense {method!r}",
                          "pass --yaml_path with a yaml of your own (this package ships configs only for its own defenses)")
    return source


def shipped_values(method: str, dataset: str) -> dict[str, Any]:
    """Every yaml key's value for ``method`` on ``dataset``: the field default unless a table above says otherwise."""
    paper = {k: v for k, v in PAPER_VALUES[dataset].items() if k != "alpha" or MODES[method].feature_shift_penalty}
    own = METHOD_VALUES.get(method, {})
    return {key: SPECS[key].default for key in YAML_KEYS} | SHIPPED_VALUES | {"dataset": dataset} | paper | own


def render(method: str, dataset: str) -> str:
    """The text of ``defense_configs/<method>/<dataset>.yaml``."""
    source = SOURCES.get(method, "the paper's settings (Min et al., NeurIPS 2023, sec. 5.1 / app. B)")
    lines = [f"# {method} ({MODES[method].summary}) on {dataset}: {source}.",
             "# BackdoorBench's defense yaml style; every key can be overridden on the command line.",
             "# Generated from fst_plugin.defense.config.DefenseConfig by `python -m fst_plugin.defense.shipped`:",
             "# change the dataclass or the tables in fst_plugin/defense/shipped.py, not this file.", ""]
    for key, value in shipped_values(method, dataset).items():
        spec = SPECS[key]
        lines += [f"# {spec.help}", f"{key}: {as_text(spec, value)}".rstrip()]  # BackdoorBench's style: True, empty
    return "\n".join(lines) + "\n"


def write_all(folder: Path) -> list[Path]:
    """Write every method's yaml for every dataset under ``folder``; return the files."""
    written = []
    for method in MODES:
        for dataset in DATASETS:
            path = folder / method / f"{dataset}.yaml"
            atomic_write_text(path, render(method, dataset))
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all(shipped_configs_dir()):
        print(f"wrote {path}")
    sys.exit(0)
