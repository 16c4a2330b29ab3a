"""The retuning attack: does a purified model re-learn its backdoor from a handful of poisoned images?

Min et al. (NeurIPS 2024, "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense") show that many purified models regain their backdoor after a few epochs of ordinary fine-tuning on
a small set that holds only a few poisoned images. This module runs that measurement on any model of a
BackdoorBench record: a defense's ``defense_result.pt`` (ours or BackdoorBench's built-ins'), the attacked
model itself (``none``) or a clean reference model (same architecture trained on clean data only, the
authors' "exact purification", given as another record or as a clean model file).

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
``random.sample`` of ``int(n * ratio)`` indices after seeding, which equals what our defenses draw with the same
seed and ratio; ``--clean_subset drawn`` takes that draw for every model, the script's way, so that models whose
defenses tuned on different subsets are retuned on the same images); the poisoned pool holds only the images that
carry the attack (:func:`fst_plugin.record.poison_pool.poisoned_pool`: WaNet's and InputAware's flagged cross
samples, which keep their true label, are left out) and is ordered by original index before the seeded shuffle (the
script shuffles a ``glob`` listing, whose order depends on the file system) and uses its own ``random.Random(seed)``
so every model of a record is attacked with the same poisoned images; the default seed is 0 (the script's is 42); RA
is measured too; and the retuned model is saved in BackdoorBench's ``defense_result`` format.

Output, written only after everything was validated and the retune finished, each file atomically:
``record/<name>/defense/<method>/retune/{retune_df.csv, run_info.json, retune_result.pt}`` (the result last).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fst_plugin.core import TuningConfig, evaluate_backdoor, find_head, get_mode, tune
from fst_plugin.data import PoisonedTestSet, TransformedDataset, dataset_info, get_transform
from fst_plugin.errors import ConfigError
from fst_plugin.probes import sources
from fst_plugin.probes.config import RetuneConfig
from fst_plugin.probes.output import ProbeResult, ProbeRun, cpu_state, run_info, write_probe_outputs
from fst_plugin.record import AttackRecord, PoisonedImage, load_attack_record
from fst_plugin.record.defense_output import CSV_COLUMNS
from fst_plugin.record.layout import RETUNE_RESULT_NAME, DefenseLayout
from fst_plugin.record.poison_pool import PoisonPool, poisoned_pool
from fst_plugin.runtime import resolve_device

log = logging.getLogger(__name__)
PROTOCOL = "retuning attack (stable_backdoor_purification fine_tune/ft_poison.py)"


@dataclass(frozen=True)
class RetuneResult(ProbeResult):
    """The model's C-Acc, ASR and RA (and test losses) before and after the retune."""

    before: dict[str, float]
    after: dict[str, float]


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
def build_retune_set(record: AttackRecord, train_split: Dataset, subset: sources.CleanSubset, poison_num: int,
                     seed: int, pool: PoisonPool) -> RetuneSet:
    """The official tuning set: the subset's first ``poison_num`` items swapped for poisoned images (test
    transform, target label); the rest clean with the train transform, drawn once (fixed augmentation)."""
    channels = dataset_info(record.clean_data).channels
    if poison_num > len(subset.indices):
        raise ConfigError(f"--poison_num {poison_num} is larger than the clean tuning subset "
                          f"({len(subset.indices)} images)",
                          f"pass --poison_num {len(subset.indices)} or fewer (or a larger --ratio)")
    poisoned = sources.pick_poisoned(pool, poison_num, seed, record)
    test_transform, train_transform = get_transform(record.clean_data, False), get_transform(record.clean_data, True)
    images, labels = [], []
    for img in poisoned:
        images.append(test_transform(sources.read_poisoned_image(img, channels)))
        labels.append(img.bd_label)
    clean_indices = np.asarray(subset.indices[poison_num:], dtype=np.int64)
    torch.manual_seed(seed)  # the clean images' one augmentation draw
    for index in clean_indices.tolist():
        image, label = train_split[index][:2]
        images.append(train_transform(image))
        labels.append(int(label))
    return RetuneSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), poisoned, clean_indices,
                     np.asarray(subset.indices, dtype=np.int64), subset.source, pool)


def prepare_retune(config: RetuneConfig) -> RetunePlan:
    """Validate everything and build model, tuning set and test sets; writes nothing."""
    config.validate()
    record = load_attack_record(config.record, trust=config.trust_record)
    save_dir = DefenseLayout.of(record.record_dir, config.defense).retune_dir
    sources.inside_record(save_dir, record.record_dir, "retune output folder")
    pool = poisoned_pool(record)
    sources.pick_poisoned(pool, config.poison_num, config.random_seed, record)  # pool large enough: fail fast
    device = resolve_device(config.device)
    reference = sources.CleanReference(config.reference_record, config.reference_model)
    probed = sources.model_to_probe(record, config.defense, reference, config.trust_record)
    train_split, test_split = sources.clean_splits(record, config.dataset_path)
    subset = sources.clean_subset(record, config.defense, config.ratio, config.random_seed, len(train_split),
                                  config.clean_subset)
    tuning = build_retune_set(record, train_split, subset, config.poison_num, config.random_seed, pool)
    log.info("retune %s: %d poisoned (train indices %s, %s pool of %d, %d flagged images left out) + %d clean "
             "images (%s)", config.defense, len(tuning.poisoned), [p.original_index for p in tuning.poisoned],
             pool.rule, len(pool.images), pool.excluded, len(tuning.clean_indices), subset.source)
    test_transform = get_transform(record.clean_data, False)
    return RetunePlan(config, record, save_dir, device, probed.model, probed.name, probed.num_classes, tuning,
                      TransformedDataset(test_split, test_transform),
                      PoisonedTestSet(record.bd_test.images, dataset_info(record.clean_data).channels, test_transform))


# ----- running it ---------------------------------------------------------------------------------------
def retune_model(model: nn.Module, num_classes: int, dataset: Dataset, config: RetuneConfig,
                 device: str) -> list[dict[str, Any]]:
    """Plain fine-tuning as the authors' script does it: the core's loop in ``vanilla-ft`` mode (every parameter,
    the whole model in train mode) without head-norm projection, at a constant learning rate; one row per epoch
    (loss, train accuracy)."""
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=False,
                        num_workers=config.num_workers,
                        generator=torch.Generator().manual_seed(config.random_seed))
    settings = TuningConfig(epochs=config.epochs, lr=config.lr, momentum=0.9, weight_decay=0.0, projection=False,
                            lr_schedule="constant", device=device, seed=config.random_seed,
                            show_progress=config.show_progress)
    return tune(model, find_head(model, num_classes), get_mode("vanilla-ft"), loader, settings)


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
    history = retune_model(plan.model, plan.num_classes, plan.tuning.dataset(), cfg, plan.device)
    after = evaluate()
    history[-1].update(after)
    wall = time.time() - started
    log.info("after retune (%s): C-Acc %.4f ASR %.4f RA %.4f (%.0f s)", cfg.defense, after["test_acc"],
             after["test_asr"], after["test_ra"], wall)
    result = RetuneResult(cfg.defense, plan.save_dir, plan.tuning.index_source, len(plan.tuning.clean_indices),
                          tuple(p.original_index for p in plan.tuning.poisoned), wall, history, before, after)
    write_retune_outputs(plan, result)
    return result


def write_retune_outputs(plan: RetunePlan, result: RetuneResult) -> None:
    """``retune_df.csv``, ``run_info.json``, then ``retune_result.pt`` (its presence means the run finished)."""
    df = pd.DataFrame(result.history)
    df = df[[c for c in CSV_COLUMNS if c in df] + [c for c in df if c not in CSV_COLUMNS]]
    run = ProbeRun("retune", PROTOCOL, plan.record, plan.model_name, plan.device, plan.tuning.pool, plan.config)
    info = run_info(run, result, {"before": result.before, "after": result.after})
    saved = {"model_name": plan.model_name, "num_classes": plan.num_classes, "model": cpu_state(plan.model)}
    write_probe_outputs(plan.save_dir, "retune_df.csv", df, info, RETUNE_RESULT_NAME, saved)
