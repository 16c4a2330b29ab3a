"""Defense configuration: BackdoorBench's yaml keys plus ours, validated into one dataclass.

BackdoorBench's convention is kept: the yaml gives the defaults, every command-line value that is not None
overrides it. Validation then names the first problem (unknown key, wrong type, out-of-range value) and
the fix, before anything is written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from fst_plugin.core.tuning import PROJECTION_BOUNDS
from fst_plugin.errors import ConfigError

PROJECTION_CHOICES = {"auto": None, "on": True, "off": False, True: True, False: False, None: None}


@dataclass
class DefenseConfig:
    """Every setting a tuning defense reads (yaml key = field name)."""

    # BackdoorBench's shared defense keys
    device: str = "auto"
    amp: bool = False
    pin_memory: bool = False
    non_blocking: bool = False
    prefetch: bool = False
    checkpoint_load: Optional[str] = None
    checkpoint_save: Optional[str] = None
    log: Optional[str] = None
    dataset_path: str = "./data"
    dataset: str = "cifar10"
    epochs: int = 10
    batch_size: int = 128
    num_workers: int = 0
    lr: float = 0.01
    lr_scheduler: str = "CosineAnnealingLR"
    model: Optional[str] = None
    client_optimizer: str = "sgd"
    sgd_momentum: float = 0.9
    wd: float = 0.0
    frequency_save: int = 0
    random_seed: int = 0
    ratio: float = 0.02
    index: Optional[str] = None
    # ours
    alpha: float = 0.2
    head: Optional[str] = None
    projection: Optional[bool] = None
    projection_bound: str = "equal"
    whole_classifier: bool = False
    trust_record: bool = False
    resume: bool = False
    # where things are (set by the command line)
    result_file: Optional[str] = None
    record: Optional[str] = None
    yaml_path: Optional[str] = None
    terminal_info: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_TYPES = {f.name: f.type for f in fields(DefenseConfig)}
_CHOICES = {"lr_scheduler": {"CosineAnnealingLR"}, "client_optimizer": {"sgd"},
            "projection_bound": set(PROJECTION_BOUNDS)}
_RANGES: dict[str, tuple[str, Any]] = {
    "epochs": ("> 0", lambda v: v > 0),
    "batch_size": ("> 0", lambda v: v > 0),
    "num_workers": (">= 0", lambda v: v >= 0),
    "lr": ("> 0", lambda v: v > 0),
    "sgd_momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "wd": (">= 0", lambda v: v >= 0),
    "frequency_save": (">= 0", lambda v: v >= 0),
    "ratio": ("in (0, 1]", lambda v: 0 < v <= 1),
    "alpha": (">= 0", lambda v: v >= 0),
    "random_seed": ("in [0, 2**32)", lambda v: 0 <= v < 2**32),  # what numpy and BackdoorBench's fix_random accept
}


def _coerce(key: str, value: Any) -> Any:
    kind = _FIELD_TYPES[key]
    optional = kind.startswith("Optional")
    if value is None or (optional and value == ""):
        if optional or kind == "list":
            return None if optional else []
        raise ConfigError(f"config key {key!r} is empty", f"give {key} a value of type {kind}")
    if key == "projection":
        if isinstance(value, str):
            value = value.strip().lower()
        try:
            return PROJECTION_CHOICES[value]
        except (KeyError, TypeError):  # TypeError: a list or mapping (unhashable)
            raise ConfigError(f"projection is {value!r}", "use auto, on or off") from None
    base = kind.replace("Optional[", "").rstrip("]")
    wrong = ConfigError(f"config key {key!r} is {value!r} ({type(value).__name__}), expected {base}",
                        f"set {key} to a {base} value in the yaml or on the command line")
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise wrong
    if base == "int":
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise wrong from None
        raise wrong
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):  # YAML 1.1 reads 1e-2 as a string
            raise wrong
        try:
            out = float(value)
        except (ValueError, OverflowError):  # OverflowError: an int beyond the float range
            raise wrong from None
        if out != out or out in (float("inf"), float("-inf")):
            raise wrong
        return out
    if base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    if base == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
        raise wrong
    raise wrong  # pragma: no cover


def build_config(values: Mapping[str, Any]) -> DefenseConfig:
    """Validate a merged mapping (yaml + command line) into a :class:`DefenseConfig`."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"the config is a {type(values).__name__}, not a mapping of key: value",
                          "write the yaml as 'key: value' lines")
    unknown = sorted(str(k) for k in values if k not in _FIELD_TYPES)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))}",
                          f"remove or correct them; known keys are {', '.join(_FIELD_TYPES)}")
    clean = {key: _coerce(key, value) for key, value in values.items()}
    for key, value in clean.items():
        if key in _RANGES and value is not None:
            text, ok = _RANGES[key]
            if not ok(value):
                raise ConfigError(f"config key {key!r} is {value}, which is not {text}",
                                  f"set {key} {text}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"config key {key!r} is {value!r}",
                              f"use {' or '.join(sorted(_CHOICES[key]))}"
                              + (" (the only one this defense implements)" if len(_CHOICES[key]) == 1 else ""))
    return DefenseConfig(**clean)


def shipped_configs_dir() -> Path:
    """The folder of the shipped defense yamls (``<method>/<dataset>.yaml``): the one place that knows it.

    ``fst_plugin/defense_configs`` is a symlink to the repository's top-level ``defense_configs/`` (the
    folder the design keeps at the top). One path then serves every install mode: an editable install and
    any run from the repository root (where the repository's ``fst_plugin/`` shadows an installed one) read
    the top-level folder through the link, and a wheel holds real copies, because setuptools follows the
    link when it collects package data. The fallback is for a checkout whose file system has no symlinks
    (git then writes the link as a small text file): the top-level folder next to the package.
    """
    package = Path(__file__).resolve().parent
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a defense yaml: a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"yaml file {path} does not exist",
                          "pass --yaml_path pointing at a defense yaml (e.g. config/defense/fst/cifar10.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: bad bytes, !!int abc, 5000-digit ints
        raise ConfigError(f"yaml file {path} is not valid YAML ({str(exc).splitlines()[0]})",
                          "fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"yaml file {path} holds a {type(data).__name__}, not a mapping of key: value",
                          "write the yaml as 'key: value' lines")
    return data


def merge(yaml_values: Mapping[str, Any], cli_values: Mapping[str, Any]) -> dict[str, Any]:
    """BackdoorBench's rule: command-line values that are not None win over the yaml."""
    merged = dict(yaml_values)
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    return merged


def load_config(yaml_path: str | Path | None, cli_values: Mapping[str, Any]) -> DefenseConfig:
    values = read_yaml(yaml_path) if yaml_path else {}
    return build_config(merge(values, cli_values))
