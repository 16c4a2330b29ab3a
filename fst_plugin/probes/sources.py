"""What a probe reads from an attack record: which model, which clean subset, which poisoned images.

Shared by the retuning attack and QRA, each piece taking only the settings it needs, so every model of a record is
probed with the same images whichever probe asks.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fst_plugin.data import dataset_info, load_clean_split
from fst_plugin.errors import ConfigError, DataError, RecordError
from fst_plugin.probes.config import CLEAN_REFERENCE, NO_DEFENSE
from fst_plugin.record import AttackRecord, PoisonedImage, load_attack_record
from fst_plugin.record import choose_clean_indices
from fst_plugin.record.layout import DefenseLayout
from fst_plugin.record.poison_pool import PoisonPool
from fst_plugin.record.result_model import ResultModel, load_result_model, model_from_state, read_result
from fst_plugin.runtime import seed_everything

log = logging.getLogger(__name__)


def inside_record(path: Path, record_dir: Path, what: str) -> Path:
    """``path`` resolved, or a one-line error when it (or a link on its way) leads outside the record folder."""
    resolved = path.resolve()
    if not resolved.is_relative_to(record_dir.resolve()):
        raise RecordError(f"{what} {path} resolves to {resolved}, outside the record folder {record_dir}",
                          "keep defense outputs inside record/<name>/ (no links pointing elsewhere)")
    return resolved


# ----- which model ----------------------------------------------------------------------------------------
def reference_model(record: AttackRecord, reference_record: Path, trust: bool) -> ResultModel:
    """The clean reference: the model of another record, trained on the attacked record's dataset at rate 0."""
    reference = load_attack_record(reference_record, trust=trust, check_files=False)
    if reference.clean_data != record.clean_data or reference.num_classes != record.num_classes:
        raise RecordError(f"reference record {reference.record_dir} is a {reference.clean_data} model with "
                          f"{reference.num_classes} classes, the attacked record a {record.clean_data} one with "
                          f"{record.num_classes}", "pass a reference trained on the attacked record's dataset")
    if reference.model_name != record.model_name:
        log.warning("reference model %s differs from the attacked model %s", reference.model_name, record.model_name)
    return model_from_state(reference.state_dict, reference.model_name, reference.num_classes,
                            dataset_info(record.clean_data).channels)


def defended_model(record: AttackRecord, defense: str, trust: bool) -> ResultModel:
    """A defense's ``defense_result.pt`` in the record (ours or BackdoorBench's built-ins')."""
    path = DefenseLayout.of(record.record_dir, defense).result
    if not path.is_file():
        found = sorted(p.parent.name for p in (record.record_dir / "defense").glob("*/defense_result.pt"))
        raise RecordError(f"defense {defense!r} has no output in {record.record_dir} (no {path.name})",
                          f"run the defense first, or pass one of: {', '.join(found + [NO_DEFENSE, CLEAN_REFERENCE])}")
    inside_record(path, record.record_dir, "defense result")
    saved = read_result(path, "defense result", trust)
    name, classes = saved.name or record.model_name, saved.num_classes or record.num_classes
    if classes != record.num_classes:
        raise RecordError(f"defense result {path} has {classes} classes, the record {record.num_classes}",
                          "re-run the defense on this record")
    return model_from_state(saved.state, name, classes, dataset_info(record.clean_data).channels)


def model_to_probe(record: AttackRecord, defense: str, reference_record: Optional[Path], trust: bool) -> ResultModel:
    """The model a probe starts from: a defense's result, the attacked model (``none``) or the clean reference."""
    if defense == NO_DEFENSE:
        return model_from_state(record.state_dict, record.model_name, record.num_classes,
                                dataset_info(record.clean_data).channels)
    if defense == CLEAN_REFERENCE:
        assert reference_record is not None  # the configs' validate() pairs the two
        return reference_model(record, reference_record, trust)
    return defended_model(record, defense, trust)


def retuned_model(record: AttackRecord, defense: str, trust: bool) -> ResultModel:
    """The retuned version of a model (``retune/retune_result.pt``), or the command that makes it."""
    path = DefenseLayout.of(record.record_dir, defense).retune_result
    if not path.is_file():
        raise RecordError(f"{defense!r} has no retune result in {record.record_dir} (no {path})",
                          f"run `fst-plugin retune --record {record.record_dir} --defense {defense}` first")
    inside_record(path, record.record_dir, "retune result")
    return load_result_model(path, "retune result", trust, record.model_name, record.num_classes,
                             dataset_info(record.clean_data).channels)


# ----- which clean images ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CleanSubset:
    """The clean training indices a defense tuned on, and where they came from (its index file, or the draw)."""

    indices: np.ndarray
    source: str


def clean_splits(record: AttackRecord, dataset_path: Path) -> tuple[Dataset, Dataset]:
    """The record's clean train and test splits, read from ``dataset_path``."""
    root = record.clean_data_folder(dataset_path)
    return load_clean_split(record.clean_data, root, train=True), load_clean_split(record.clean_data, root, train=False)


def clean_subset(record: AttackRecord, defense: str, ratio: float, seed: int, n_train: int) -> CleanSubset:
    """The defense's own clean tuning indices, or BackdoorBench's ``choose_index`` draw when it left none."""
    if defense not in (NO_DEFENSE, CLEAN_REFERENCE):
        index = DefenseLayout.of(record.record_dir, defense).index
        if index.is_file():
            inside_record(index, record.record_dir, "index file")
            return CleanSubset(choose_clean_indices(n_train, ratio, str(index)), str(index))
    seed_everything(seed)
    indices = choose_clean_indices(n_train, ratio, None)
    source = f"drawn: random.sample of int({n_train} * {ratio}) after seeding {seed}"
    log.info("%s has no log/index.txt; clean subset %s", defense, source)
    return CleanSubset(indices, source)


# ----- which poisoned images ------------------------------------------------------------------------------
def pick_poisoned(pool: PoisonPool, poison_num: int, seed: int, record: AttackRecord,
                  outside_class: Optional[int] = None) -> list[PoisonedImage]:
    """``poison_num`` images of the record's poisoned pool (ordered by original index), after a seeded shuffle.
    ``outside_class`` leaves out the images whose original label is that class (QRA's pool)."""
    candidates = [img for img in pool.images if outside_class is None or img.original_label != outside_class]
    if not candidates:  # a clean-label record's whole pool is the target class: nothing to reactivate from
        raise RecordError(f"attack record {record.record_dir.name} has no poisoned training image outside the target "
                          f"class ({pool.rule} pool of {len(pool.images)}, all of class {outside_class})",
                          "QRA needs a dirty-label record (poisons relabelled from other classes); a clean-label "
                          "attack such as SIG cannot be probed with it")
    if poison_num > len(candidates):
        where = "of" if outside_class is None else "outside the target class in"
        raise ConfigError(f"--poison_num {poison_num} is larger than the {len(candidates)} poisoned training images "
                          f"{where} {record.record_dir.name} ({pool.rule} pool)",
                          f"pass --poison_num {len(candidates)} or fewer")
    random.Random(seed).shuffle(candidates)
    chosen = candidates[:poison_num]
    for img in chosen:
        if not img.path.is_file():
            raise RecordError(f"attack record {record.record_dir}: poisoned training image {img.path} is missing",
                              "restore the record's bd_train_dataset/ folder or re-run the attack")
    return chosen


def read_poisoned_image(img: PoisonedImage, channels: int) -> Image.Image:
    """One of the record's poisoned training PNGs with ``channels`` channels (1: "L", else "RGB"), or one
    ``DataError``."""
    try:
        with Image.open(img.path) as pil:
            return pil.convert("L" if channels == 1 else "RGB")
    except OSError as exc:
        raise DataError(f"poisoned training image {img.path} cannot be read ({exc})",
                        "restore the record's bd_train_dataset/ folder or re-run the attack") from None
