"""A defense's settings: BackdoorBench's yaml keys plus ours, each declared once on :class:`DefenseConfig`.

BackdoorBench's convention is kept: the yaml gives the values, every command-line (or keyword) value that is not
None overrides it. Validation then names the first problem (unknown key, wrong type, out-of-range value) and the
fix, before anything is written. The flags, the validation, the resume key, the shipped yamls
(:mod:`fst_plugin.defense.shipped`) and the docs table all derive from the fields (:mod:`fst_plugin.options`).
Defaults of the tuning itself (epochs, lr, momentum, weight decay, alpha, projection bound) belong to the core's
:class:`~fst_plugin.core.tuning.TuningConfig`; the fields here read them from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from fst_plugin.core.alpha import STRENGTH_PREFIX, AlphaSearch, parse_strength
from fst_plugin.core.trigger_inversion import InversionConfig
from fst_plugin.core.tuning import PROJECTION_BOUNDS, TuningConfig
from fst_plugin.core.unlearning import UnlearningConfig
from fst_plugin.errors import ConfigError
from fst_plugin.options import add_overrides, build, option, option_specs

log = logging.getLogger(__name__)
INPUT_PIPELINES = ("tensor", "backdoorbench")
DEPRECATED_KEYS = {"data_path": "input_pipeline"}  # old name -> new name: accepted, with one log line
_SWITCH_WORDS = {"auto": None, "on": True, "off": False}
LR_SCHEDULERS = {"CosineAnnealingLR": "cosine", "ConstantLR": "constant"}  # BackdoorBench's name -> the core's


def _auto_on_off(value: Any, key: str) -> Optional[bool]:
    """``auto`` / ``on`` / ``off`` (a yaml may also say True or False) → None (the mode's default), True, False."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else value
    if isinstance(word, str) and word in _SWITCH_WORDS:
        return _SWITCH_WORDS[word]
    raise ConfigError(f"{key} is {value!r}", "use auto, on or off")


def parse_projection(value: Any) -> Optional[bool]:
    return _auto_on_off(value, "projection")


def parse_pam(value: Any) -> Optional[bool]:
    return _auto_on_off(value, "pam")


def parse_alpha(value: Any) -> Union[float, str]:
    """A number (the paper's way: 0.2 on CIFAR-10), ``auto`` (chosen on held-out clean tuning data by
    :func:`choose_alpha`) or ``strength=S`` (α = S / Σ‖W₀‖² of the backdoored head: :func:`fixed_alpha`)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        strength = parse_strength(value)
    except ValueError:
        raise ConfigError(f"config key 'alpha' is {value!r}", "write the strength as a number > 0, e.g. "
                          "alpha: strength=2 (alpha = 2 / the backdoored head's squared norm)") from None
    if strength is not None:
        return f"{STRENGTH_PREFIX}{strength:g}"
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = math.nan
        if math.isfinite(number):
            return number
    raise ConfigError(f"config key 'alpha' is {value!r}", "set alpha to a number >= 0 (the paper's 0.2 on "
                      "CIFAR-10), to auto (chosen on held-out clean tuning data) or to strength=S (S / the "
                      "backdoored head's squared norm)")


def alpha_search(settings: Any) -> AlphaSearch:
    """``alpha: auto``'s search from a :class:`DefenseConfig` (or the exported script's args: same names)."""
    return AlphaSearch(budget=settings.alpha_budget, held_out=settings.alpha_held_out)


def lr_schedule_of(lr_scheduler: str) -> str:
    """The core's schedule for BackdoorBench's ``lr_scheduler`` name."""
    return LR_SCHEDULERS[lr_scheduler]


def unlearning_config(settings: Any) -> UnlearningConfig:
    """PAM's reversed-sample settings from a :class:`DefenseConfig` (or the exported script's args: same names)."""
    inversion = InversionConfig(pretrain_steps=settings.inversion_pretrain_steps,
                                mask_steps=settings.inversion_mask_steps,
                                generator_steps=settings.inversion_generator_steps,
                                base_filters=settings.generator_filters, bf16=settings.amp)
    return UnlearningConfig(rounds=settings.unlearn_rounds, fraction=settings.reversed_fraction, inversion=inversion)


def _positive(value: Any) -> bool:
    return value > 0


def _not_negative(value: Any) -> bool:
    return value >= 0


@dataclass(frozen=True)
class DefenseConfig:
    """Every setting a tuning defense reads (yaml key = field name = command-line flag)."""

    # BackdoorBench's shared defense keys
    device: str = option("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:N", resume=False)
    amp: bool = option(False, "mixed precision: the tuning on CUDA; PAM's trigger generator in bfloat16 on CUDA and "
                              "on CPUs with native bf16")
    pin_memory: bool = option(False, "dataloader pin_memory", flags=("-pm",), resume=False)
    non_blocking: bool = option(False, ".to(), non_blocking", flags=("-nb",))
    prefetch: bool = option(False, "accepted for BackdoorBench compatibility", flags=("-pf",))
    checkpoint_load: Optional[str] = option(None, "accepted for BackdoorBench compatibility")
    checkpoint_save: Optional[str] = option(None, "folder of the per-epoch resume checkpoint (default: "
                                                  "defense/<name>/checkpoint/, removed when the run finishes)",
                                            resume=False)
    log: Optional[str] = option(None, "folder of the log and index.txt (default: defense/<name>/log/)",
                                resume=False)
    dataset_path: str = option("./data", "folder holding <dataset>/ (default ./data)")
    dataset: str = option("cifar10", "mnist, cifar10, cifar100, gtsrb, tiny")
    epochs: int = option(TuningConfig.epochs, "tuning epochs", check=("> 0", _positive))
    batch_size: int = option(128, "tuning batch size", check=("> 0", _positive))
    num_workers: int = option(0, "dataloader workers", check=(">= 0", _not_negative), resume=False)
    lr: float = option(TuningConfig.lr, "learning rate of sgd", check=("> 0", _positive))
    lr_scheduler: str = option("CosineAnnealingLR", "learning-rate schedule (ConstantLR: no schedule, PAM's)",
                               choices=tuple(LR_SCHEDULERS))
    model: Optional[str] = option(None, "informational; the record's model_name is used")
    client_optimizer: str = option("sgd", "optimiser", choices=("sgd",))
    sgd_momentum: float = option(TuningConfig.momentum, "momentum of sgd",
                                 check=("in [0, 1)", lambda v: 0 <= v < 1))
    wd: float = option(TuningConfig.weight_decay, "weight decay of sgd", check=(">= 0", _not_negative))
    frequency_save: int = option(0, "accepted for BackdoorBench compatibility", check=(">= 0", _not_negative))
    # what numpy and BackdoorBench's fix_random accept
    random_seed: int = option(TuningConfig.seed, "random seed (tuning subset, re-initialisation, shuffling, "
                                                 "evaluation subset)", check=("in [0, 2**32)", lambda v: 0 <= v < 2**32))
    ratio: float = option(0.02, "fraction of the clean training set used for tuning",
                          check=("in (0, 1]", lambda v: 0 < v <= 1))
    index: Optional[str] = option(None, "file of clean training indices (overrides --ratio)")
    # ours
    alpha: Union[float, str] = option(TuningConfig.alpha, "weight of the feature-shift penalty alpha*<W, W0>; auto: "
                                      "chosen on a held-out part of the clean tuning set; strength=S: S over the "
                                      "backdoored head's squared norm, the same on every head (docs/modes.md)",
                                      parse=parse_alpha,
                                      check=(">= 0, auto or strength=S", lambda v: isinstance(v, str) or v >= 0))
    alpha_budget: float = option(AlphaSearch.budget, "alpha auto: held-out accuracy (a fraction) the chosen alpha may "
                                 "cost against the same tuning without the penalty", check=("in [0, 1)",
                                                                                           lambda v: 0 <= v < 1))
    alpha_held_out: float = option(AlphaSearch.held_out, "alpha auto: share of the clean tuning set held out to score "
                                   "the candidates", check=("in (0, 1)", lambda v: 0 < v < 1))
    head: Optional[str] = option(None, "dotted name of the classifier layer (default: found)")
    projection: Optional[bool] = option(None, "rescale the head to ||W0|| after every step (auto: the mode's "
                                              "default, on)", choices=tuple(_SWITCH_WORDS), parse=parse_projection)
    projection_bound: str = option(TuningConfig.projection_bound, "equal: ||W|| = ||W0|| after every step (official "
                                   "code, default); at_most: ||W|| <= ||W0|| (the paper's constraint)",
                                   choices=PROJECTION_BOUNDS)
    whole_classifier: bool = option(False, "treat every Linear of the head's block as head")
    # PAM (Min et al., NeurIPS 2024): any mode can take it; the pam defense has it on
    pam: Optional[bool] = option(None, "PAM: path-aware steps on batches with reversed backdoor samples (auto: the "
                                       "mode's default, on for pam only)", choices=tuple(_SWITCH_WORDS), parse=parse_pam)
    pam_rho: float = option(0.5, "PAM's step along the path back to the backdoored model (0: plain steps, "
                                 "unlearning only)", check=(">= 0", _not_negative))
    unlearn_rounds: int = option(UnlearningConfig.rounds, "PAM: trigger-inversion rounds, spread evenly over the "
                                 "epochs", check=("> 0", _positive))
    reversed_fraction: float = option(UnlearningConfig.fraction, "PAM: share of each batch replaced by reversed "
                                      "samples", check=("in (0, 1]", lambda v: 0 < v <= 1))
    inversion_pretrain_steps: int = option(InversionConfig.pretrain_steps, "PAM: optimiser steps pretraining the "
                                           "trigger generator to reproduce clean images (the authors': 50 epochs of "
                                           "20 batches)", check=(">= 0", _not_negative))
    inversion_mask_steps: int = option(InversionConfig.mask_steps, "PAM: optimiser steps fitting the benign-feature "
                                       "mask, per round (the authors': 20 epochs)", check=(">= 0", _not_negative))
    inversion_generator_steps: int = option(InversionConfig.generator_steps, "PAM: optimiser steps training the "
                                            "trigger generator, per round (the authors': 30 epochs)",
                                            check=(">= 0", _not_negative))
    generator_filters: int = option(InversionConfig.base_filters, "PAM: width of the trigger generator's first "
                                    "U-Net block", check=("> 0", _positive))
    save_name: Optional[str] = option(None, "write to defense/<save_name>/ instead of defense/<method>/ "
                                            "(variants of one defense side by side)", resume=False)
    eval_subset: Optional[int] = option(None, "evaluate each epoch on this many clean and poisoned test images "
                                              "(a subset seeded by random_seed; default: the full test sets)",
                                        check=("> 0", _positive))
    input_pipeline: str = option("tensor", "how the images are loaded. tensor: decode the tuning and test images "
                                           "once and augment/normalise whole batches on the device; backdoorbench: "
                                           "BackdoorBench's per-image DataLoader (formerly data_path)",
                                 choices=INPUT_PIPELINES)
    trust_record: bool = option(False, "UNSAFE: fully unpickle records/checkpoints from a source you trust",
                                flags=("--trust-record",), switch=True, resume=False, in_yaml=False)
    resume: bool = option(False, "continue from the last complete epoch checkpoint", switch=True, resume=False,
                          in_yaml=False)
    # where things are (set by the command line)
    result_file: Optional[str] = option(None, "attack record name: record/<result_file>", resume=False,
                                        in_yaml=False)
    record: Optional[str] = option(None, "attack record folder (standalone alternative to --result_file)",
                                   resume=False, in_yaml=False)
    yaml_path: Optional[str] = option(None, "the defense yaml", resume=False, in_yaml=False)
    terminal_info: list = field(default_factory=list)  # the command line that started the run (BackdoorBench's)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SPECS = {spec.name: spec for spec in option_specs(DefenseConfig)}
YAML_KEYS = tuple(name for name, spec in SPECS.items() if spec.in_yaml)
RESUME_KEYS = tuple(name for name, spec in SPECS.items() if spec.resume)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (``--<key>`` plus BackdoorBench's short aliases), every default None so the yaml
    rules; the deprecated names stay accepted, unlisted."""
    add_overrides(parser, DefenseConfig)
    for old in DEPRECATED_KEYS:
        parser.add_argument(f"--{old}", dest=old, type=str, help=argparse.SUPPRESS)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings :func:`add_arguments` parsed (None where not given): the one read of the namespace."""
    return {key: value for key, value in vars(args).items() if key in SPECS or key in DEPRECATED_KEYS}


def missing_yaml_keys(values: Mapping[str, Any]) -> list[str]:
    """The config keys a defense yaml should hold and does not (every shipped yaml holds all of them)."""
    return [key for key in YAML_KEYS if key not in values]


def resume_values(config: DefenseConfig) -> dict[str, Any]:
    """The settings a checkpoint is only valid for (a resume with any other value is refused)."""
    values = config.to_dict()
    return {key: values[key] for key in RESUME_KEYS}


def _renamed(values: Mapping[str, Any], seen: set[str]) -> dict[str, Any]:
    """``values`` with each deprecated key under its new name (collected in ``seen``)."""
    out = dict(values)
    for old, new in DEPRECATED_KEYS.items():
        if old in out:
            if new in out:
                raise ConfigError(f"both {old!r} and {new!r} are given", f"keep {new} only ({old} is its old name)")
            out[new] = out.pop(old)
            seen.add(old)
    return out


def build_config(yaml_values: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> DefenseConfig:
    """The yaml's values, overridden by every value of ``overrides`` that is not None, validated into a
    :class:`DefenseConfig` (BackdoorBench's rule: the command line wins over the yaml)."""
    if not isinstance(yaml_values, Mapping):
        return build(DefenseConfig, yaml_values)  # the one-line error about a config that is no mapping
    seen: set[str] = set()
    merged = _renamed(yaml_values, seen)
    merged.update(_renamed({k: v for k, v in (overrides or {}).items() if v is not None}, seen))
    for old in sorted(seen):
        log.warning("config key %r is deprecated: it is now %r (same values); rename it", old, DEPRECATED_KEYS[old])
    return build(DefenseConfig, merged)


def load_config(overrides: Mapping[str, Any]) -> DefenseConfig:
    """The yaml at ``overrides['yaml_path']`` (when given) with ``overrides`` applied: the one way the command
    line, BackdoorBench's launcher and :func:`fst_plugin.api.run_defense` turn settings into a config."""
    path = overrides.get("yaml_path")
    return build_config(read_yaml(path) if path else {}, overrides)


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
