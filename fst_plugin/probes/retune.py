"""The retuning attack: does a purified model re-learn its backdoor from a handful of poisoned images?

Min et al. (NeurIPS 2024, "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense") show that many purified models regain their backdoor after a few epochs of ordinary fine-tuning on
a small set that holds only a few poisoned images. This module runs that measurement on any model of a
BackdoorBench record: a defense's ``defense_result.pt`` (ours or BackdoorBench's built-ins'), the attacked
model itself (``none``) or a clean reference model (same architecture trained on clean data only, the
authors' "exact purification", given as another record).

What we take from the authors' script (``fine_tune/ft_poison.py`` of AISafety-HKUST/stable_backdoor_purification):

* the tuning set is a clean subset of the training split (2% by default) whose first ``poison_num`` items
  are replaced by poisoned training images of the attack (the record's ``bd_train`` PNGs), each labelled
  with the attack's target; the poisoned images are picked by shuffling the whole poisoned pool with the
  seeded RNG and taking the first ``poison_num``;
* the poisoned images go through the test transform (no augmentation), the clean ones through the train
  transform; the script applies the transforms once while building the set, so each clean image keeps one
  fixed random crop/flip for every epoch (kept here: the protocol is the measurement);
* SGD over every parameter, momentum 0.9, no weight decay, no learning-rate schedule, the whole model in
  train mode (BatchNorm statistics move), cross-entropy, batches shuffled each epoch, the last partial batch
  kept; defaults lr 0.01, batch 128, 5 epochs, 5 poisoned images;
* clean accuracy and ASR measured on the clean test split and the record's poisoned test split, before and
  after.

Where we differ, on purpose: the clean subset is the defense's own tuning subset (its ``log/index.txt``) so the
attacker re-uses exactly what the defender tuned on (when a model has none, e.g. ``none``, the reference or a
BackdoorBench defense that writes no index, the subset is drawn as BackdoorBench's ``choose_index`` does:
``random.sample`` of ``int(n * ratio)`` indices after seeding, which equals what our defenses draw with the
same seed and ratio); the poisoned pool holds only the images that carry the attack
(:func:`fst_plugin.record.poison_pool.poisoned_pool`: WaNet's and InputAware's flagged cross samples, which
keep their true label, are left out) and is ordered by original index before the seeded shuffle (the script
shuffles a ``glob`` listing, whose order depends on the file system) and uses its own ``random.Random(seed)``
so every model of a record is attacked with the same poisoned images; the default seed is 0 (the script's is
42); RA is measured too; and the retuned model is saved in BackdoorBench's ``defense_result`` format.

Output, written only after everything was validated and the retune finished, each file atomically:
``record/<name>/defense/<method>/retune/{retune_df.csv, run_info.json, retune_result.pt}`` (the result last).
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fst_plugin.adapter.defenses import choose_clean_indices
from fst_plugin.core import evaluate_backdoor
from fst_plugin.data import PoisonedTestSet, TransformedDataset, dataset_info, get_transform, load_clean_split
from fst_plugin.errors import ConfigError, DataError, RecordError, TrainingDiverged
from fst_plugin.io_utils import atomic_torch_save, atomic_write_text
from fst_plugin.models import build_model
from fst_plugin.models.factory import load_weights
from fst_plugin.probe_config import CLEAN_REFERENCE, NO_DEFENSE, RetuneConfig
from fst_plugin.record import AttackRecord, PoisonedImage, load_attack_record, load_untrusted
from fst_plugin.record.defense_output import CSV_COLUMNS, environment_versions
from fst_plugin.record.poison_pool import PoisonPool, poisoned_pool
from fst_plugin.record.layout import RETUNE_RESULT_NAME, RUN_INFO_NAME, DefenseLayout
from fst_plugin.runtime import progress, resolve_device, seed_everything

log = logging.getLogger(__name__)



# ----- configuration and result ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RetuneResult:
    defense: str
    save_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    clean_index_source: str
    n_clean: int
    poisoned_indices: tuple[int, ...]
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RetuneSet:
    """The tuning set: ``poisoned`` replace the first items of the clean subset, ``clean_indices`` the rest."""

    images: torch.Tensor          # transformed, in tuning-set order (poisoned first)
    labels: torch.Tensor
    poisoned: list[PoisonedImage]
    clean_indices: np.ndarray     # the clean training indices kept (the subset minus its first poison_num)
    subset: np.ndarray            # the whole clean subset (defense's index.txt or drawn)
    index_source: str
    pool: PoisonPool              # where ``poisoned`` were drawn from

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.images, self.labels)


@dataclass
class RetunePlan:
    """Everything validated and built; nothing written yet."""

    config: RetuneConfig
    record: AttackRecord
    save_dir: Path
    device: str
    model: nn.Module
    model_name: str
    num_classes: int
    tuning: RetuneSet
    clean_test: Dataset
    bd_test: Dataset


# ----- building the pieces ------------------------------------------------------------------------------
def inside_record(path: Path, record_dir: Path, what: str) -> Path:
    """``path`` resolved, or a one-line error when it (or a link on its way) leads outside the record folder."""
    resolved = path.resolve()
    if not resolved.is_relative_to(record_dir.resolve()):
        raise RecordError(f"{what} {path} resolves to {resolved}, outside the record folder {record_dir}",
                          "keep defense outputs inside record/<name>/ (no links pointing elsewhere)")
    return resolved


def state_dict_of(data: Any, path: Path) -> tuple[dict[str, torch.Tensor], Optional[str], Optional[int]]:
    """BackdoorBench's ``{'model_name', 'num_classes', 'model'}`` or a bare state_dict (the authors' own format)."""
    if isinstance(data, Mapping) and "model" in data:
        state, name, classes = data["model"], data.get("model_name"), data.get("num_classes")
    else:
        state, name, classes = data, None, None
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise RecordError(f"defense result {path} holds no state_dict", "re-run the defense that wrote it")
    if name is not None and not isinstance(name, str):
        raise RecordError(f"defense result {path}: model_name is {name!r}", "re-run the defense that wrote it")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, (int, np.integer))):
        raise RecordError(f"defense result {path}: num_classes is {classes!r}", "re-run the defense that wrote it")
    return dict(state), name, None if classes is None else int(classes)


def load_model_to_retune(config: RetuneConfig, record: AttackRecord) -> tuple[nn.Module, str, int]:
    """The model the attack starts from: a defense's result, the attacked model, or the clean reference."""
    if config.defense == NO_DEFENSE:
        state, name, classes = record.state_dict, record.model_name, record.num_classes
    elif config.defense == CLEAN_REFERENCE:
        assert config.reference_record is not None
        reference = load_attack_record(config.reference_record, trust=config.trust_record, check_files=False)
        if reference.clean_data != record.clean_data or reference.num_classes != record.num_classes:
            raise RecordError(f"reference record {reference.record_dir} is a {reference.clean_data} model with "
                              f"{reference.num_classes} classes, the attacked record a {record.clean_data} one with "
                              f"{record.num_classes}", "pass a reference trained on the attacked record's dataset")
        if reference.model_name != record.model_name:
            log.warning("reference model %s differs from the attacked model %s", reference.model_name,
                        record.model_name)
        state, name, classes = reference.state_dict, reference.model_name, reference.num_classes
    else:
        path = DefenseLayout.of(record.record_dir, config.defense).result
        if not path.is_file():
            found = sorted(p.parent.name for p in (record.record_dir / "defense").glob("*/defense_result.pt"))
            raise RecordError(f"defense {config.defense!r} has no output in {record.record_dir} (no {path.name})",
                              f"run the defense first, or pass one of: {', '.join(found + [NO_DEFENSE, CLEAN_REFERENCE])}")
        inside_record(path, record.record_dir, "defense result")
        state, saved_name, saved_classes = state_dict_of(
            load_untrusted(path, "defense result", trust=config.trust_record), path)
        name, classes = saved_name or record.model_name, saved_classes or record.num_classes
        if classes != record.num_classes:
            raise RecordError(f"defense result {path} has {classes} classes, the record {record.num_classes}",
                              "re-run the defense on this record")
    model = build_model(name, classes, dataset_info(record.clean_data).channels)
    load_weights(model, state, name)
    return model, name, classes


def clean_subset(config: RetuneConfig, record: AttackRecord, n_train: int) -> tuple[np.ndarray, str]:
    """The defense's own clean tuning indices, or BackdoorBench's ``choose_index`` draw when it left none."""
    if config.defense not in (NO_DEFENSE, CLEAN_REFERENCE):
        index = DefenseLayout.of(record.record_dir, config.defense).index
        if index.is_file():
            inside_record(index, record.record_dir, "index file")
            return choose_clean_indices(n_train, config.ratio, str(index)), str(index)
    seed_everything(config.random_seed)
    indices = choose_clean_indices(n_train, config.ratio, None)
    source = f"drawn: random.sample of int({n_train} * {config.ratio}) after seeding {config.random_seed}"
    log.info("%s has no log/index.txt; clean subset %s", config.defense, source)
    return indices, source


def pick_poisoned(pool: PoisonPool, poison_num: int, seed: int, record: AttackRecord,
                  outside_class: Optional[int] = None) -> list[PoisonedImage]:
    """``poison_num`` images of the record's poisoned pool (:func:`poisoned_pool`; ordered by original index),
    after a seeded shuffle. ``outside_class`` leaves out the images whose original label is that class (QRA's
    pool)."""
    candidates = [img for img in pool.images if outside_class is None or img.original_label != outside_class]
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


def read_poisoned_image(img: PoisonedImage, mode: str) -> Image.Image:
    """One of the record's poisoned training PNGs in ``mode`` ("RGB" or "L"), or one ``DataError``."""
    try:
        with Image.open(img.path) as pil:
            return pil.convert(mode)
    except OSError as exc:
        raise DataError(f"poisoned training image {img.path} cannot be read ({exc})",
                        "restore the record's bd_train_dataset/ folder or re-run the attack") from None


def build_retune_set(record: AttackRecord, train_split: Dataset, subset: np.ndarray, index_source: str,
                     poison_num: int, seed: int, pool: PoisonPool) -> RetuneSet:
    """The official tuning set: the subset's first ``poison_num`` items swapped for poisoned images (test
    transform, target label); the rest clean with the train transform, drawn once (fixed augmentation)."""
    info = dataset_info(record.clean_data)
    if poison_num > len(subset):
        raise ConfigError(f"--poison_num {poison_num} is larger than the clean tuning subset ({len(subset)} images)",
                          f"pass --poison_num {len(subset)} or fewer (or a larger --ratio)")
    poisoned = pick_poisoned(pool, poison_num, seed, record)
    test_transform, train_transform = get_transform(record.clean_data, False), get_transform(record.clean_data, True)
    mode = "L" if info.channels == 1 else "RGB"
    images, labels = [], []
    for img in poisoned:
        images.append(test_transform(read_poisoned_image(img, mode)))
        labels.append(img.bd_label)
    clean_indices = np.asarray(subset[poison_num:], dtype=np.int64)
    torch.manual_seed(seed)  # the clean images' one augmentation draw
    for index in clean_indices.tolist():
        image, label = train_split[index][:2]
        images.append(train_transform(image))
        labels.append(int(label))
    return RetuneSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), poisoned, clean_indices,
                     np.asarray(subset, dtype=np.int64), index_source, pool)


def prepare_retune(config: RetuneConfig) -> RetunePlan:
    """Validate everything and build model, tuning set and test sets; writes nothing."""
    config.validate()
    record = load_attack_record(config.record, trust=config.trust_record)
    save_dir = DefenseLayout.of(record.record_dir, config.defense).retune_dir
    inside_record(save_dir, record.record_dir, "retune output folder")
    pool = poisoned_pool(record)
    pick_poisoned(pool, config.poison_num, config.random_seed, record)  # pool large enough: fail fast
    device = resolve_device(config.device)
    model, model_name, num_classes = load_model_to_retune(config, record)
    root = record.clean_data_folder(config.dataset_path)
    train_split = load_clean_split(record.clean_data, root, train=True)
    test_split = load_clean_split(record.clean_data, root, train=False)
    subset, source = clean_subset(config, record, len(train_split))
    tuning = build_retune_set(record, train_split, subset, source, config.poison_num, config.random_seed, pool)
    log.info("retune %s: %d poisoned (train indices %s, %s pool of %d, %d flagged images left out) + %d clean "
             "images (%s)", config.defense, len(tuning.poisoned), [p.original_index for p in tuning.poisoned],
             pool.rule, len(pool.images), pool.excluded, len(tuning.clean_indices), source)
    test_transform = get_transform(record.clean_data, False)
    return RetunePlan(config, record, save_dir, device, model, model_name, num_classes, tuning,
                      TransformedDataset(test_split, test_transform),
                      PoisonedTestSet(record.bd_test.images, dataset_info(record.clean_data).channels, test_transform))


# ----- running it ---------------------------------------------------------------------------------------
def retune_model(model: nn.Module, dataset: Dataset, config: RetuneConfig, device: str) -> list[dict[str, Any]]:
    """Plain fine-tuning as the authors' script does it; returns one row per epoch (loss, train accuracy)."""
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=0.0)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=False,
                        num_workers=config.num_workers,
                        generator=torch.Generator().manual_seed(config.random_seed))
    history = []
    for epoch in range(config.epochs):
        model.train()
        loss_sum, correct, seen, batches = 0.0, 0, 0, 0
        for inputs, targets in progress(loader, config.show_progress, f"retune epoch {epoch + 1}/{config.epochs}"):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss = criterion(logits, targets)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"the retune loss became {loss.item()} in epoch {epoch + 1}",
                                       f"lower --lr (now {config.lr}); nothing was written")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == targets).sum().item()
            seen += targets.numel()
            batches += 1
        history.append({"epoch": epoch, "batch": batches, "train_epoch_loss_avg_over_batch": loss_sum / batches,
                        "train_acc": correct / seen})
        log.info("retune epoch %d/%d: loss %.4f train acc %.4f", epoch + 1, config.epochs,
                 loss_sum / batches, correct / seen)
    model.eval()
    return history


def run_retune(config: RetuneConfig) -> RetuneResult:
    """Prepare (validating everything), retune, evaluate before/after, then write the outputs."""
    plan = prepare_retune(config)
    cfg = plan.config
    loader_args = dict(batch_size=256, shuffle=False, num_workers=cfg.num_workers)
    clean_loader, bd_loader = DataLoader(plan.clean_test, **loader_args), DataLoader(plan.bd_test, **loader_args)

    def evaluate() -> dict[str, float]:
        return evaluate_backdoor(plan.model, clean_loader, bd_loader, plan.device).as_dict()

    started = time.time()
    plan.model.to(plan.device)
    before = evaluate()
    log.info("before retune (%s): C-Acc %.4f ASR %.4f RA %.4f", cfg.defense, before["test_acc"],
             before["test_asr"], before["test_ra"])
    seed_everything(cfg.random_seed)
    history = retune_model(plan.model, plan.tuning.dataset(), cfg, plan.device)
    after = evaluate()
    history[-1].update(after)
    wall = time.time() - started
    log.info("after retune (%s): C-Acc %.4f ASR %.4f RA %.4f (%.0f s)", cfg.defense, after["test_acc"],
             after["test_asr"], after["test_ra"], wall)
    result = RetuneResult(cfg.defense, plan.save_dir, before, after, plan.tuning.index_source,
                          len(plan.tuning.clean_indices), tuple(p.original_index for p in plan.tuning.poisoned),
                          wall, history)
    write_retune_outputs(plan, result)
    return result


def write_retune_outputs(plan: RetunePlan, result: RetuneResult) -> None:
    """``retune_df.csv``, ``run_info.json``, then ``retune_result.pt`` (its presence means the run finished)."""
    df = pd.DataFrame(result.history)
    df = df[[c for c in CSV_COLUMNS if c in df] + [c for c in df if c not in CSV_COLUMNS]]
    atomic_write_text(plan.save_dir / "retune_df.csv", df.to_csv())
    info = {"method": "retune", "protocol": "retuning attack (stable_backdoor_purification fine_tune/ft_poison.py)",
            "defense": result.defense, "record": str(plan.record.record_dir), "model_name": plan.model_name,
            "device": plan.device, "seed": plan.config.random_seed, "clean_index_source": result.clean_index_source,
            "n_clean": result.n_clean, "n_poisoned": len(result.poisoned_indices),
            "poisoned_train_indices": list(result.poisoned_indices), "poison_pool": plan.tuning.pool.summary(),
            "wall_time_s": result.wall_time_s, "before": result.before, "after": result.after,
            "config": asdict(plan.config),  # its paths become text through json's default=str
            "versions": environment_versions()}
    atomic_write_text(plan.save_dir / RUN_INFO_NAME, json.dumps(info, indent=2, default=str))
    atomic_torch_save({"model_name": plan.model_name, "num_classes": plan.num_classes,
                       "model": {k: v.detach().cpu() for k, v in plan.model.state_dict().items()}},
                      plan.save_dir / RETUNE_RESULT_NAME)
