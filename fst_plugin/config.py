"""Defense configuration: BackdoorBench's yaml keys plus ours, validated into one dataclass.

BackdoorBench's convention is kept: the yaml gives the defaults, every command-line value that is not None
overrides it. Validation then names the first problem (unknown key, wrong type, out-of-range value) and
the fix, before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

import yaml

from fst_plugin.core.tuning import PROJECTION_BOUNDS
from fst_plugin.errors import ConfigError

PROJECTION_CHOICES = {"auto": None, "on": True, "off": False, True: True, False: False, None: None}


def setting(default: Any = None, help: str = "", *, choices: Optional[Collection[str]] = None,
            check: Optional[tuple[str, Callable[[Any], bool]]] = None, resume: bool = True, in_yaml: bool = True,
            flags: Sequence[str] = (), switch: bool = False, default_factory: Optional[Callable[[], Any]] = None) -> Any:
    """A config key: its default, ``help`` (the ``--help`` text), ``choices`` or a range ``check`` (text, test),
    whether it ``resume``-s (its value joins the checkpoint's key, so a resume with another value is refused),
    whether every shipped yaml holds it (``in_yaml``), extra command-line ``flags`` and whether it is a value-less
    ``switch``. The type is the field's annotation. Everything else (argparse, validation, the resume key,
    the yaml check) is derived from these fields, so adding a key is this one line plus the yamls."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "check": check, "resume": resume,
                "in_yaml": in_yaml, "flags": tuple(flags), "switch": switch}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DefenseConfig:
    """Every setting a tuning defense reads (yaml key = field name = command-line flag)."""

    # BackdoorBench's shared defense keys
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:N", resume=False)
    amp: bool = setting(False, "mixed precision (CUDA only)")
    pin_memory: bool = setting(False, "dataloader pin_memory", flags=("-pm",), resume=False)
    non_blocking: bool = setting(False, ".to(), non_blocking", flags=("-nb",))
    prefetch: bool = setting(False, "accepted for BackdoorBench compatibility", flags=("-pf",))
    checkpoint_load: Optional[str] = setting(None, "accepted for BackdoorBench compatibility")
    checkpoint_save: Optional[str] = setting(None, "folder of the per-epoch resume checkpoint", resume=False)
    log: Optional[str] = setting(None, "folder of the log and index.txt", resume=False)
    dataset_path: str = setting("./data", "folder holding <dataset>/ (default ./data)")
    dataset: str = setting("cifar10", "mnist, cifar10, cifar100, gtsrb, tiny")
    epochs: int = setting(10, "tuning epochs", check=("> 0", lambda v: v > 0))
    batch_size: int = setting(128, "tuning batch size", check=("> 0", lambda v: v > 0))
    num_workers: int = setting(0, "dataloader workers", check=(">= 0", lambda v: v >= 0), resume=False)
    lr: float = setting(0.01, "learning rate of sgd", check=("> 0", lambda v: v > 0))
    lr_scheduler: str = setting("CosineAnnealingLR", "learning-rate schedule", choices=("CosineAnnealingLR",))
    model: Optional[str] = setting(None, "informational; the record's model_name is used")
    client_optimizer: str = setting("sgd", "optimiser", choices=("sgd",))
    sgd_momentum: float = setting(0.9, "momentum of sgd", check=("in [0, 1)", lambda v: 0 <= v < 1))
    wd: float = setting(0.0, "weight decay of sgd", check=(">= 0", lambda v: v >= 0))
    frequency_save: int = setting(0, "accepted for BackdoorBench compatibility", check=(">= 0", lambda v: v >= 0))
    # what numpy and BackdoorBench's fix_random accept
    random_seed: int = setting(0, "random seed (tuning subset, re-initialisation, shuffling, evaluation subset)",
                               check=("in [0, 2**32)", lambda v: 0 <= v < 2**32))
    ratio: float = setting(0.02, "fraction of the clean training set used for tuning",
                           check=("in (0, 1]", lambda v: 0 < v <= 1))
    index: Optional[str] = setting(None, "file of clean training indices (overrides --ratio)")
    # ours
    alpha: float = setting(0.2, "weight of the feature-shift penalty alpha*<W, W0>",
                           check=(">= 0", lambda v: v >= 0))
    head: Optional[str] = setting(None, "dotted name of the classifier layer (default: found)")
    projection: Optional[bool] = setting(None, "rescale the head to ||W0|| after every step (auto: the mode's "
                                               "default, on)", choices=("auto", "on", "off"))
    projection_bound: str = setting("equal", "equal: ||W|| = ||W0|| after every step (official code, default); "
                                             "at_most: ||W|| <= ||W0|| (the paper's constraint)",
                                    choices=PROJECTION_BOUNDS)
    whole_classifier: bool = setting(False, "treat every Linear of the head's block as head")
    save_name: Optional[str] = setting(None, "write to defense/<save_name>/ instead of defense/<method>/ "
                                             "(variants of one defense side by side)", resume=False)
    eval_subset: Optional[int] = setting(None, "evaluate each epoch on this many clean and poisoned test images "
                                               "(a subset seeded by random_seed; default: the full test sets)",
                                         check=("> 0", lambda v: v > 0))
    data_path: str = setting("tensor", "tensor: decode the tuning and test images once and augment/normalise whole "
                                       "batches on the device; backdoorbench: BackdoorBench's per-image DataLoader "
                                       "path", choices=("tensor", "backdoorbench"))
    trust_record: bool = setting(False, "UNSAFE: fully unpickle records/checkpoints from a source you trust",
                                 flags=("--trust-record",), switch=True, resume=False, in_yaml=False)
    resume: bool = setting(False, "continue from the last complete epoch checkpoint", switch=True, resume=False,
                           in_yaml=False)
    # where things are (set by the command line)
    result_file: Optional[str] = setting(None, "attack record name: record/<result_file>", resume=False, in_yaml=False)
    record: Optional[str] = setting(None, "attack record folder (standalone alternative to --result_file)",
                                    resume=False, in_yaml=False)
    yaml_path: Optional[str] = setting(None, "the defense yaml", resume=False, in_yaml=False)
    terminal_info: list = setting(None, "", default_factory=list, resume=False, in_yaml=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KEYS: dict[str, dataclasses.Field] = {f.name: f for f in fields(DefenseConfig)}
_FIELD_TYPES = {name: f.type for name, f in KEYS.items()}
_CHOICES = {name: set(f.metadata["choices"]) for name, f in KEYS.items()
            if f.metadata["choices"] and name != "projection"}  # projection's words map to values (PROJECTION_CHOICES)
_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {name: f.metadata["check"] for name, f in KEYS.items()
                                                        if f.metadata["check"]}
YAML_KEYS = tuple(name for name, f in KEYS.items() if f.metadata["in_yaml"])
RESUME_KEYS = tuple(name for name, f in KEYS.items() if f.metadata["resume"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (``--<key>`` plus BackdoorBench's short aliases), every default None so the yaml
    rules. Values are read as text and validated by :func:`build_config`, like yaml values: a wrong one is one
    line naming the key and the fix (``--amp yes`` included), never a silent False."""
    for name, f in KEYS.items():
        if f.name == "terminal_info":
            continue
        meta = f.metadata
        flags = [flag for flag in meta["flags"] if not flag.startswith("--")] + [f"--{name}"] + \
                [flag for flag in meta["flags"] if flag.startswith("--")]
        if meta["switch"]:
            parser.add_argument(*flags, dest=name, action="store_const", const=True, help=meta["help"])
        else:
            kind = _FIELD_TYPES[name].replace("Optional[", "").rstrip("]")
            metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else kind.upper()
            parser.add_argument(*flags, dest=name, type=str, metavar=metavar, help=meta["help"])


def missing_yaml_keys(values: Mapping[str, Any]) -> list[str]:
    """The config keys a defense yaml should hold and does not (every shipped yaml holds all of them)."""
    return [key for key in YAML_KEYS if key not in values]


def resume_values(config: DefenseConfig) -> dict[str, Any]:
    """The settings a checkpoint is only valid for (a resume with any other value is refused)."""
    values = config.to_dict()
    return {key: values[key] for key in RESUME_KEYS}


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
        raise ConfigError(wrong.problem, f"set {key} to True or False (or true, false, 1, 0)")
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
