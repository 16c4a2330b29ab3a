"""The defense yamls this package ships (``defense_configs/<method>/<dataset>.yaml``), generated from
:class:`~fst_plugin.defense.config.DefenseConfig`.

A BackdoorBench defense yaml holds every key (its scripts, and the self-contained defenses ``fst-plugin export``
writes, read nothing else), so the shipped files stay complete; but only :data:`SHIPPED_VALUES` and
:data:`PAPER_VALUES` below are written by hand: every other value, and every comment, comes from the fields.
``python -m fst_plugin.defense.shipped`` rewrites the files; a test fails when they differ from what this module
generates, so a default changed on the dataclass cannot leave a stale copy in 20 yamls.

:func:`resolve_settings` is the one rule by which a run without ``--yaml_path`` (``fst-plugin run``, BackdoorBench's
launchers, :func:`fst_plugin.api.run_defense`) gets its settings: the yaml shipped for its method on the record's
dataset, the command line on top; a dataset with no shipped yaml is refused rather than run with another's values.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from fst_plugin.core.modes import MODES
from fst_plugin.defense.config import SPECS, YAML_KEYS, DefenseConfig, load_config
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


def shipped_config(method: str, dataset: str, whose: str = "dataset") -> Path:
    """Path of the yaml shipped for ``method`` on ``dataset`` (``config``, BackdoorBench's default name, is
    cifar10's). A dataset this package ships no yaml for is refused: another dataset's values would run silently.
    ``whose`` names the dataset in that refusal (e.g. "the record's dataset")."""
    folder = shipped_configs_dir() / method
    if not folder.is_dir():
        raise ConfigError(f"no shipped config for defense {method!r}",
                          "pass --yaml_path with a yaml of your own (this package ships configs only for its own defenses)")
    name = "cifar10" if dataset == "config" else dataset
    source = folder / f"{name}.yaml"
    if name not in DATASETS or not source.is_file():
        raise ConfigError(f"defense {method!r} ships no settings for {whose} {dataset!r} (it ships "
                          f"{', '.join(DATASETS)})", f"pass --yaml_path with a yaml for {dataset} (e.g. a copy of "
                          f"defense_configs/{method}/cifar10.yaml with dataset: {dataset} and your values)")
    return source


@dataclass(frozen=True)
class Settings:
    """A run's validated config and where its values came from (the run's first log line says so)."""

    config: DefenseConfig
    origin: str  # "settings: <yaml> (<why that yaml>), command line on top"


def resolve_settings(method: str, overrides: Mapping[str, Any], dataset: Optional[str]) -> Settings:
    """The config of a run of ``method``: ``overrides['yaml_path']`` when given, else the yaml shipped for
    ``method`` on ``dataset`` (the record's ``clean_data``), with every override that is not None on top.

    ``yaml_path`` is set to the file taken, so the logged config and run_info.json name it. Without a yaml the
    record's dataset decides, not ``overrides['dataset']``: a ``--dataset`` that disagrees with the record is
    refused later (by the runner's check), never used to pick another dataset's values."""
    if overrides.get("yaml_path"):
        config = load_config(overrides)
        return Settings(config, f"settings: {config.yaml_path} (--yaml_path), command line on top")
    if dataset is None:
        raise ConfigError("no attack record given, so no dataset to choose the shipped settings by",
                          "pass --result_file NAME (record/NAME) or --record DIR, or --yaml_path")
    path = shipped_config(method, dataset, whose="the record's dataset")
    config = load_config({**overrides, "yaml_path": str(path)})
    return Settings(config, f"settings: {path} (shipped for {method} on {dataset}, the record's dataset; no "
                            f"--yaml_path), command line on top")


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
