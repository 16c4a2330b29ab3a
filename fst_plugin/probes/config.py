"""The settings of the two post-purification probes, ``fst-plugin retune`` and ``fst-plugin qra``.

Kept apart from :mod:`fst_plugin.probes.retune` and :mod:`fst_plugin.probes.qra` (which import torch and pandas) so
that the command line can build its parser from these fields (:mod:`fst_plugin.options`) without loading either: a
default or a help text is written once, here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fst_plugin.errors import ConfigError
from fst_plugin.options import option, parse_fraction

NO_DEFENSE = "none"                   # the attacked model itself (attack_result.pt)
CLEAN_REFERENCE = "clean-reference"   # a model trained on clean data only (--reference_record / --reference_model)
# which clean images a probe tunes with (--clean_subset): the defense's own tuning subset (its log/index.txt; drawn
# when it wrote none), or always the seeded draw at --ratio, as the authors' ft_poison.py does: then every model of a
# record is probed with the same clean images, whatever each defense tuned on (defenses tuned on different ratios)
CLEAN_SUBSETS = ("defense", "drawn")
OWN_SUBSET = CLEAN_SUBSETS[0]
CLEAN_SUBSET_HELP = ("defense: the defense's own tuning subset (its log/index.txt, drawn when it has none); drawn: "
                     "BackdoorBench's seeded draw at --ratio whatever the defense tuned on (the same images for every "
                     "model of a record, as the authors' script)")
REFERENCE_MODEL_HELP = ("a clean model file instead: a state_dict of the record's model_name (e.g. BackdoorBench's "
                        "clean_model.pth), bare or under 'model' / 'state_dict'")


def _reference_flags(record: Optional[Path], model: Optional[Path]) -> list[str]:
    """The clean-reference flags given; more than one is refused in one line (the two name the same model)."""
    given = [flag for flag, value in (("--reference_record", record), ("--reference_model", model))
             if value is not None]
    if len(given) > 1:
        raise ConfigError("--reference_record and --reference_model both name the clean reference",
                          "pass one of them: --reference_record DIR (a record at rate 0) or --reference_model FILE")
    return given


Check = tuple[str, object, str, bool]  # (flag, value, rule, ok)


def _require(checks: tuple[Check, ...]) -> None:
    """The first failed (flag, value, rule, ok) check as a one-line error."""
    for name, value, rule, ok in checks:
        if not ok:
            raise ConfigError(f"--{name} is {value}, it must be {rule}", f"pass --{name} with a value {rule}")


def _training_checks(config: "RetuneConfig | QraConfig") -> tuple[Check, ...]:
    """The checks both probes' training settings share: poisoned images, epochs, lr, batch size, the clean subset."""
    return (("poison_num", config.poison_num, ">= 0", config.poison_num >= 0),
            ("epochs", config.epochs, "> 0", config.epochs > 0),
            ("lr", config.lr, "> 0 and finite", math.isfinite(config.lr) and config.lr > 0),
            ("batch_size", config.batch_size, "> 0", config.batch_size > 0),
            ("ratio", config.ratio, "in (0, 1]", 0 < config.ratio <= 1),
            ("clean_subset", config.clean_subset, f"one of {', '.join(CLEAN_SUBSETS)}",
             config.clean_subset in CLEAN_SUBSETS))


def _check_defense_name(name: str, allowed: str) -> None:
    """``--defense`` must name one folder under ``defense/`` (``allowed`` says what the probe takes)."""
    from fst_plugin.record.layout import is_defense_name  # here: importing the package loads torch

    if not is_defense_name(name):
        raise ConfigError(f"--defense {name!r} is not a defense folder name",
                          f"pass the name of a folder under record/<name>/defense/{allowed}")


@dataclass(frozen=True)
class RetuneConfig:
    """One retuning attack: which model of which record, and the official protocol's settings."""

    record: Path = option(metavar="DIR", help="the attack record folder")
    defense: str = option(metavar="NAME", help="a folder under DIR/defense/ holding defense_result.pt, none (the "
                                               "attacked model) or clean-reference (with --reference_record or "
                                               "--reference_model)")
    reference_record: Optional[Path] = option(None, "record of a model trained on clean data only (e.g. "
                                                    "make_records at rate 0)", metavar="DIR")
    reference_model: Optional[Path] = option(None, REFERENCE_MODEL_HELP, metavar="FILE")
    poison_num: int = option(5, "poisoned training images in the tuning set")
    epochs: int = option(5, "retuning epochs")
    lr: float = option(0.01, "learning rate of sgd")
    batch_size: int = option(128, "batch size")
    random_seed: int = option(0, "seed of the poisoned-image pick, the drawn subset and the shuffling")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    ratio: float = option(0.02, "clean fraction drawn when the model has no log/index.txt (none, clean-reference, "
                                "BackdoorBench defenses that write none) or with --clean_subset drawn")
    clean_subset: str = option(OWN_SUBSET, CLEAN_SUBSET_HELP, choices=CLEAN_SUBSETS)
    dataset_path: Path = option(Path("./data"), "folder holding <dataset>/ (default ./data)")
    num_workers: int = option(0, "dataloader workers")
    trust_record: bool = option(False, "UNSAFE: fully unpickle records from a source you trust",
                                flags=("--trust-record",))
    show_progress: Optional[bool] = None

    def validate(self) -> None:
        """Range and consistency checks (the record and files are checked by :func:`prepare_retune`)."""
        _require((*_training_checks(self), ("num_workers", self.num_workers, ">= 0", self.num_workers >= 0)))
        name = self.defense
        _check_defense_name(name, ", none or clean-reference")
        given = _reference_flags(self.reference_record, self.reference_model)
        if (name == CLEAN_REFERENCE) != bool(given):
            raise ConfigError("a clean reference (--reference_record or --reference_model) goes with --defense "
                              "clean-reference, and only with it",
                              "pass both (--defense clean-reference --reference_record DIR or --reference_model FILE) "
                              "or neither")


@dataclass(frozen=True)
class QraConfig:
    """One QRA run: which purified model of which record, the clean reference, and the script's settings."""

    record: Path = option(metavar="DIR", help="the attack record folder")
    defense: str = option(metavar="NAME", help="a folder under DIR/defense/ holding defense_result.pt and "
                                               "retune/retune_result.pt, or none (the attacked model)")
    # one of the two is required, but checked by validate() so that its absence is the one-line error, not argparse's
    reference_record: Optional[Path] = option(None, "required, or --reference_model: record of a model trained on "
                                                    "clean data only (e.g. make_records at rate 0)", metavar="DIR")
    reference_model: Optional[Path] = option(None, REFERENCE_MODEL_HELP, metavar="FILE")
    eps: float = option(16 / 255, "L-inf budget in [0, 1] pixels (default 16/255)", parse=parse_fraction)
    alpha_qra: float = option(0.2, "weight of the reactivation (KL) term")
    clean_num: int = option(500, "clean training images (from the tuning subset)")
    poison_num: int = option(500, "poisoned training images (bd_train, target class excluded)")
    epochs: int = option(50, "epochs of the generator")
    lr: float = option(0.1, "learning rate of the generator's sgd")
    batch_size: int = option(128, "batch size")
    random_seed: int = option(0, "seed of the image picks, the generator's weights and the shuffling")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    ratio: float = option(0.02, "clean fraction drawn when the model has no log/index.txt or with --clean_subset "
                                "drawn (as retune draws it)")
    clean_subset: str = option(OWN_SUBSET, CLEAN_SUBSET_HELP, choices=CLEAN_SUBSETS)
    dataset_path: Path = option(Path("./data"), "folder holding <dataset>/ (default ./data)")
    trust_record: bool = option(False, "UNSAFE: fully unpickle records from a source you trust",
                                flags=("--trust-record",))
    show_progress: Optional[bool] = None

    def validate(self) -> None:
        """Range and consistency checks (the record, the models and the pools are checked by :func:`prepare_qra`)."""
        finite = math.isfinite
        checks = (("eps", self.eps, "in [0, 1]", finite(self.eps) and 0 <= self.eps <= 1),
                  ("alpha_qra", self.alpha_qra, ">= 0 and finite", finite(self.alpha_qra) and self.alpha_qra >= 0),
                  ("clean_num", self.clean_num, ">= 0", self.clean_num >= 0),
                  *_training_checks(self))
        _require(checks)
        if self.clean_num + self.poison_num == 0:
            raise ConfigError("--clean_num and --poison_num are both 0: QRA has nothing to train on",
                              "pass a positive --clean_num or --poison_num (the script's are 500 and 500)")
        name = self.defense
        _check_defense_name(name, " or none")
        if name == CLEAN_REFERENCE:
            raise ConfigError("--defense clean-reference: QRA attacks a purified model against the clean reference",
                              "pass a defense's name or none, and the clean model as --reference_record or "
                              "--reference_model")
        if not _reference_flags(self.reference_record, self.reference_model):
            raise ConfigError("QRA needs a clean reference model (no --reference_record or --reference_model given)",
                              "pass --reference_record DIR (a record of the same dataset trained at rate 0) or "
                              "--reference_model FILE (a clean model's state_dict, e.g. BackdoorBench's "
                              "clean_model.pth)")
