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
from fst_plugin.errors import ConfigError, DataError, ModelError, RecordError
from fst_plugin.probes.config import CLEAN_REFERENCE, NO_DEFENSE, OWN_SUBSET
from fst_plugin.record import AttackRecord, PoisonedImage, load_attack_record
from fst_plugin.record import choose_clean_indices
from fst_plugin.record.layout import DefenseLayout, defense_results
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
@dataclass(frozen=True)
class CleanReference:
    """Where the clean reference comes from: another record trained at rate 0 (``--reference_record``), or a bare
    model file (``--reference_model``), since BackdoorBench writes no clean record and its users hold a clean
    model's weights instead (e.g. ``clean_model.pth``). The configs' ``validate()`` allows at most one."""

    record: Optional[Path] = None
    model_file: Optional[Path] = None

    @property
    def given(self) -> bool:
        return self.record is not None or self.model_file is not None

    def as_info(self) -> dict[str, str]:
        """``run_info.json``'s note of where the reference came from (nothing when none was given)."""
        if self.record is not None:
            return {"reference_record": str(self.record)}
        return {} if self.model_file is None else {"reference_model": str(self.model_file)}


def reference_model(record: AttackRecord, reference: CleanReference, trust: bool) -> ResultModel:
    """The clean reference: the model of another record trained on the attacked record's dataset at rate 0, or a
    clean model file built as the attacked record's architecture."""
    if reference.model_file is not None:
        return reference_from_file(record, reference.model_file, trust)
    assert reference.record is not None  # the configs' validate() asks for one of the two
    other = load_attack_record(reference.record, trust=trust, check_files=False)
    if other.clean_data != record.clean_data or other.num_classes != record.num_classes:
        raise RecordError(f"reference record {other.record_dir} is a {other.clean_data} model with "
                          f"{other.num_classes} classes, the attacked record a {record.clean_data} one with "
                          f"{record.num_classes}", "pass a reference trained on the attacked record's dataset")
    if other.model_name != record.model_name:
        log.warning("reference model %s differs from the attacked model %s", other.model_name, record.model_name)
    return model_from_state(other.state_dict, other.model_name, other.num_classes,
                            dataset_info(record.clean_data).channels)


def reference_from_file(record: AttackRecord, path: Path, trust: bool) -> ResultModel:
    """A clean model file as the reference: a state_dict, bare or under ``'model'`` / ``'state_dict'`` (read with
    the allow-list unless ``trust``), built as the record's ``model_name`` for its ``num_classes`` and channels,
    unless the file names its own (BackdoorBench's ``{'model_name', 'num_classes', 'model'}``). Its dataset cannot
    be checked: the file does not say."""
    saved = read_result(path, "reference model", trust)
    name, classes = saved.name or record.model_name, saved.num_classes or record.num_classes
    if classes != record.num_classes:
        raise RecordError(f"reference model {path} has {classes} classes, the attacked record {record.num_classes}",
                          "pass a clean model trained on the attacked record's dataset")
    if name != record.model_name:
        log.warning("reference model %s differs from the attacked model %s", name, record.model_name)
    channels = dataset_info(record.clean_data).channels
    try:
        return model_from_state(saved.state, name, classes, channels)
    except ModelError as exc:
        raise ModelError(f"reference model {path} is not a {name} with {classes} classes and {channels} input "
                         f"channel(s) ({exc.problem})",
                         f"pass the state_dict of a clean {name} trained on {record.clean_data} (the attacked "
                         "record's architecture)") from None


def defended_model(record: AttackRecord, defense: str, trust: bool) -> ResultModel:
    """A defense's ``defense_result.pt`` in the record (ours or BackdoorBench's built-ins')."""
    path = DefenseLayout.of(record.record_dir, defense).result
    if not path.is_file():
        found = [p.parent.name for p in defense_results(record.record_dir)]
        raise RecordError(f"defense {defense!r} has no output in {record.record_dir} (no {path.name})",
                          f"run the defense first, or pass one of: {', '.join(found + [NO_DEFENSE, CLEAN_REFERENCE])}")
    inside_record(path, record.record_dir, "defense result")
    saved = read_result(path, "defense result", trust)
    name, classes = saved.name or record.model_name, saved.num_classes or record.num_classes
    if classes != record.num_classes:
        raise RecordError(f"defense result {path} has {classes} classes, the record {record.num_classes}",
                          "re-run the defense on this record")
    return model_from_state(saved.state, name, classes, dataset_info(record.clean_data).channels)


def model_to_probe(record: AttackRecord, defense: str, reference: CleanReference, trust: bool) -> ResultModel:
    """The model a probe starts from: a defense's result, the attacked model (``none``) or the clean reference."""
    if defense == NO_DEFENSE:
        return model_from_state(record.state_dict, record.model_name, record.num_classes,
                                dataset_info(record.clean_data).channels)
    if defense == CLEAN_REFERENCE:
        assert reference.given  # the configs' validate() pairs the two
        return reference_model(record, reference, trust)
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


def clean_subset(record: AttackRecord, defense: str, ratio: float, seed: int, n_train: int,
                 source: str = OWN_SUBSET) -> CleanSubset:
    """The defense's own clean tuning indices, or BackdoorBench's ``choose_index`` draw when it left none or when
    ``source`` is ``drawn`` (``--clean_subset``, :data:`fst_plugin.probes.config.CLEAN_SUBSETS`)."""
    if source == OWN_SUBSET and defense not in (NO_DEFENSE, CLEAN_REFERENCE):
        index = DefenseLayout.of(record.record_dir, defense).index
        if index.is_file():
            inside_record(index, record.record_dir, "index file")
            return CleanSubset(choose_clean_indices(n_train, ratio, str(index)), str(index))
    seed_everything(seed)
    indices = choose_clean_indices(n_train, ratio, None)
    drawn = f"drawn: random.sample of int({n_train} * {ratio}) after seeding {seed}"
    log.info("%s: clean subset %s%s", defense, drawn, " (no log/index.txt)" if source == OWN_SUBSET else
             f" (--clean_subset {source})")
    return CleanSubset(indices, drawn)


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
