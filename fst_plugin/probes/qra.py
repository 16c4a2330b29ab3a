"""The query-based reactivation attack (QRA): can an input perturbation alone wake a purified model's backdoor?

Min et al. (NeurIPS 2024, "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense")
propose QRA as the second probe of post-purification robustness, after the retuning attack
(:mod:`fst_plugin.probes.retune`): instead of changing the purified model's weights, an attacker who can only query it
learns a small per-image perturbation that makes the *purified* model behave like its *retuned* version (the
one whose backdoor came back), while a *clean* model still classifies the perturbed images correctly. If that
succeeds, the purified model still carries the backdoor's path and a perturbation re-opens it; the clean-model
term keeps the perturbation from being a plain adversarial example (which would fool every model): a real
reactivation fools the purified model, not the clean one, so the clean reference is measured under the same
perturbation. QRA can only reactivate what the retuned model has: if retuning did not bring the backdoor back,
the distillation target itself has a low ASR.

What we take from the authors' script (``fine_tune/qra.py`` of AISafety-HKUST/stable_backdoor_purification):

* the generator: an MLP over the flattened normalised image, ``C·H·W → 1024 → 1024 → 1024 → C·H·W`` with ReLU
  between the layers and tanh out; the perturbation is ``clamp(eps · AE(x), -eps, eps)`` (``eps`` 16/255) added
  in [0, 1] pixel space, clamped to [0, 1] and normalised again;
* the data: ``clean_num`` (500) clean training images labelled (true, true) and ``poison_num`` (500) poisoned
  training images of the attack (the record's ``bd_train``, without those whose original class is the target)
  labelled (target, true), all with the test transform;
* the loss: ``alpha_qra`` (0.2) × KL(purified(x+δ) ‖ retuned(x)) at temperature 1 (the script's
  ``distillation`` with alpha=1, i.e. pure KL, batch mean) + cross-entropy(clean(x+δ), true label); every model
  in eval mode; SGD over the generator only, lr 0.1, momentum 0.9, 50 epochs, batch 128, shuffled, last
  partial batch kept;
* the report: the purified model's rate of predicting the target on the perturbed clean test images and on the
  perturbed poisoned test images (ASR), and the same two rates for the clean model (transferability).

Where we differ, on purpose:

* the clean images are the first ``clean_num`` of the defense's own tuning subset (its ``log/index.txt``, or the
  seeded ``choose_index`` draw when a model has none, exactly as :func:`fst_plugin.probes.sources.clean_subset` picks
  the retune's subset, ``--clean_subset drawn`` included); the script takes the first 500 of a fresh
  ``choose_index_v2(split_ratio)`` draw;
* the poisoned pool is ordered by original index before a ``random.Random(seed)`` shuffle (the script shuffles
  a ``glob`` listing, whose order depends on the file system, with the global RNG), so every model of a record
  is attacked with the same images; images are excluded by their recorded original label, not by the name of
  the folder they sit in;
* the perturbation is added to the [0, 1] pixel tensor itself (the test transform without its Normalize) rather
  than to an un-normalised copy of the normalised tensor: the same value up to float rounding, and with it
  ``eps = 0`` is an exact identity (the perturbed numbers then equal the unperturbed ones bit for bit);
* the retuned model's logits are computed once per training image (it is in eval mode and sees the
  unperturbed image, so they never change) and the three models' parameters are frozen: the same loss and
  gradients for the generator, with less work;
* the target is the record's attack target (the script compares with class 0 on clean images); the target
  rate on clean images counts every clean test image, the target class's own included, as the script does (a
  correct model's floor is therefore the target class's share, 10% on CIFAR-10);
* the report adds the unperturbed rates, C-Acc and RA, and the retuned model's numbers, for all three models,
  on the full clean test split and the record's poisoned test images; no example PNGs are written.

Output, written only after everything was validated and the attack finished, each file atomically:
``record/<name>/defense/<method>/retune/qra/{qra_df.csv, run_info.json, qra_result.pt}`` (the generator's
weights last; its presence means the run finished). It needs ``fst-plugin retune`` to have run first on the same
model (``retune/retune_result.pt``) and a clean reference: a record of the same dataset at rate 0
(``--reference_record``) or a clean model file of the record's architecture (``--reference_model``, e.g.
BackdoorBench's ``clean_model.pth``; BackdoorBench writes no clean record).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fst_plugin.core.metrics import BackdoorTestSets, backdoor_rates
from fst_plugin.data import PoisonedTestSet, TransformedDataset, dataset_info, materialise
from fst_plugin.errors import ConfigError, RecordError, TrainingDiverged
from fst_plugin.probes import sources
from fst_plugin.probes.config import QraConfig
from fst_plugin.probes.output import ProbeResult, ProbeRun, run_info, write_probe_outputs
from fst_plugin.probes.perturbation import Perturbation, ReactivationAE, pixel_transform
from fst_plugin.record import AttackRecord, PoisonedImage, load_attack_record
from fst_plugin.record.layout import QRA_RESULT_NAME, RUN_INFO_NAME, DefenseLayout
from fst_plugin.record.poison_pool import PoisonPool, poisoned_pool
from fst_plugin.runtime import phase, resolve_device, seed_everything

log = logging.getLogger(__name__)

MODELS = ("purified", "retuned", "clean_reference")  # the run_info "metrics" keys
PROTOCOL = "query-based reactivation attack (stable_backdoor_purification fine_tune/qra.py)"


@dataclass(frozen=True)
class QraResult(ProbeResult):
    """The attack's target class and each model's rates without and with the learned perturbation."""

    target: int
    metrics: dict[str, dict[str, float]]      # MODELS → acc, clean_target, asr, ra (+ the same with _qra)


# ----- building the pieces ------------------------------------------------------------------------------
@dataclass
class QraSet:
    """The generator's training images: ``clean_num`` clean ones, then ``poison_num`` poisoned ones."""

    pixels: torch.Tensor          # (N, C, H, W) in [0, 1]
    labels: torch.Tensor          # what the reactivated model should say: true (clean), target (poisoned)
    true_labels: torch.Tensor     # the clean reference's cross-entropy labels
    clean_indices: np.ndarray
    poisoned: list[PoisonedImage]
    index_source: str


@dataclass
class QraPlan:
    """Everything validated and built; nothing written yet."""

    config: QraConfig
    record: AttackRecord
    save_dir: Path
    device: str
    target: int
    models: dict[str, nn.Module]  # MODELS → model (eval mode, frozen)
    model_name: str
    training: QraSet
    clean_test: TensorDataset     # (pixels, label)
    bd_test: TensorDataset        # (pixels, backdoor label, original index, 1, original label)
    pool: PoisonPool              # the record's poisoned pool (the poisoned images come from its non-target part)


def attack_target(record: AttackRecord, pool: PoisonPool) -> int:
    """The all-to-one target of the record's poisoned pool (QRA needs one target)."""
    if len(pool.targets) != 1:
        raise RecordError(f"attack record {record.record_dir} is not all-to-one (backdoor labels "
                          f"{list(pool.targets[:5])})",
                          "QRA reactivates one target class: use an all-to-one attack's record")
    return pool.targets[0]


def build_qra_set(record: AttackRecord, train_split: Dataset, subset: sources.CleanSubset, clean_num: int,
                  poisoned: list[PoisonedImage], target: int) -> QraSet:
    """Clean images (the subset's first ``clean_num``) then the poisoned ones, all as [0, 1] test-transform pixels."""
    if clean_num > len(subset.indices):
        raise ConfigError(f"--clean_num {clean_num} is larger than the clean tuning subset "
                          f"({len(subset.indices)} images, {subset.source})",
                          f"pass --clean_num {len(subset.indices)} or fewer (or a larger --ratio)")
    to_pixels = pixel_transform(record.clean_data)
    channels = dataset_info(record.clean_data).channels
    clean_indices = np.asarray(subset.indices[:clean_num], dtype=np.int64)
    images, labels, true = [], [], []
    for index in clean_indices.tolist():
        image, label = train_split[index][:2]
        images.append(to_pixels(image))
        labels.append(int(label))
        true.append(int(label))
    for img in poisoned:
        images.append(to_pixels(sources.read_poisoned_image(img, channels)))
        labels.append(target)
        true.append(img.original_label)
    return QraSet(torch.stack(images), torch.tensor(labels), torch.tensor(true), clean_indices, poisoned,
                  subset.source)


def prepare_qra(config: QraConfig) -> QraPlan:
    """Validate everything and build the three models, the training set and the test sets; writes nothing."""
    config.validate()  # requires one clean reference: --reference_record or --reference_model
    reference = sources.CleanReference(config.reference_record, config.reference_model)
    record = load_attack_record(config.record, trust=config.trust_record)
    save_dir = DefenseLayout.of(record.record_dir, config.defense).qra_dir
    sources.inside_record(save_dir, record.record_dir, "QRA output folder")
    pool = poisoned_pool(record)
    target = attack_target(record, pool)
    poisoned = sources.pick_poisoned(pool, config.poison_num, config.random_seed, record,
                             outside_class=target)  # fail fast, before loading
    device = resolve_device(config.device)
    purified = sources.model_to_probe(record, config.defense, sources.CleanReference(), config.trust_record)
    retuned = sources.retuned_model(record, config.defense, config.trust_record)
    clean = sources.reference_model(record, reference, config.trust_record)
    models = {"purified": purified.model, "retuned": retuned.model, "clean_reference": clean.model}
    for model in models.values():
        model.eval().requires_grad_(False)  # the generator is the only thing trained
    train_split, test_split = sources.clean_splits(record, config.dataset_path)
    subset = sources.clean_subset(record, config.defense, config.ratio, config.random_seed, len(train_split),
                                  config.clean_subset)
    training = build_qra_set(record, train_split, subset, config.clean_num, poisoned, target)
    log.info("qra %s: target %d, %d clean (%s) + %d poisoned training images (train indices %s...)", config.defense,
             target, len(training.clean_indices), subset.source, len(poisoned),
             [p.original_index for p in poisoned[:5]])
    to_pixels = pixel_transform(record.clean_data)
    channels = dataset_info(record.clean_data).channels
    clean_test = materialise(TransformedDataset(test_split, to_pixels))
    bd_test = materialise(PoisonedTestSet(record.bd_test.images, channels, to_pixels))
    return QraPlan(config, record, save_dir, device, target, models, purified.name, training, clean_test, bd_test,
                   pool)


# ----- running it ---------------------------------------------------------------------------------------
@torch.no_grad()
def logits_of(model: nn.Module, inputs: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    """``model``'s logits for normalised ``inputs``, batch by batch (on the CPU)."""
    return torch.cat([model(inputs[i:i + batch_size].to(device)).cpu() for i in range(0, len(inputs), batch_size)])


def train_generator(plan: QraPlan, perturb: Perturbation) -> list[dict[str, Any]]:
    """The script's optimisation of the generator; one row per epoch (loss, its two terms, train match)."""
    cfg, device = plan.config, plan.device
    purified, retuned, clean = (plan.models[k] for k in MODELS)
    teacher = logits_of(retuned, perturb.normalise(plan.training.pixels.to(device)).cpu(), 256, device)
    data = TensorDataset(plan.training.pixels, teacher, plan.training.labels, plan.training.true_labels)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(cfg.random_seed))
    optimizer = torch.optim.SGD(perturb.ae.parameters(), lr=cfg.lr, momentum=0.9)
    perturb.train()
    history = []
    for epoch in phase("qra generator epochs", range(cfg.epochs), cfg.show_progress, log):
        sums, correct, seen, batches = np.zeros(3), 0, 0, 0
        for pixels, teacher_logits, labels, true_labels in loader:
            pixels, teacher_logits = pixels.to(device), teacher_logits.to(device)
            labels, true_labels = labels.to(device), true_labels.to(device)
            inputs = perturb(pixels)
            logits = purified(inputs)
            kl = F.kl_div(F.log_softmax(logits, 1), F.softmax(teacher_logits, 1), reduction="batchmean")
            ce = F.cross_entropy(clean(inputs), true_labels)
            loss = cfg.alpha_qra * kl + ce
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"the QRA loss became {loss.item()} in epoch {epoch + 1}",
                                       f"lower --lr (now {cfg.lr}); nothing was written")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += (loss.item(), kl.item(), ce.item())
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            batches += 1
        loss_avg, kl_avg, ce_avg = sums / batches
        history.append({"epoch": epoch, "batch": batches, "train_epoch_loss_avg_over_batch": loss_avg,
                        "kl_avg_over_batch": kl_avg, "ce_avg_over_batch": ce_avg, "train_acc": correct / seen})
        log.info("qra epoch %d/%d: loss %.4f (KL %.4f, CE %.4f), purified matches the reactivation labels %.4f",
                 epoch + 1, cfg.epochs, loss_avg, kl_avg, ce_avg, correct / seen)
    perturb.eval()
    return history


def measure(plan: QraPlan, perturb: Perturbation) -> dict[str, dict[str, float]]:
    """Each model's C-Acc and target rate on the clean test images, ASR and RA on the poisoned ones, without and
    with the perturbation (``*_qra``); the same evaluator as every other measurement."""
    clean, bd = plan.clean_test.tensors, plan.bd_test.tensors
    tests = BackdoorTestSets(clean[0], clean[1], bd[0], bd[1], bd[4])
    models = {name: plan.models[name] for name in MODELS}
    plain, perturbed = (backdoor_rates(models, tests, plan.device, prepare, plan.target)
                        for prepare in (perturb.normalise, perturb))
    return {name: {**plain[name], **{key + "_qra": rate for key, rate in perturbed[name].items()}} for name in MODELS}


def run_qra(config: QraConfig) -> QraResult:
    """Prepare (validating everything), train the generator, measure the three models, then write the outputs."""
    plan = prepare_qra(config)
    cfg = plan.config
    started = time.time()
    info = dataset_info(plan.record.clean_data)
    seed_everything(cfg.random_seed)  # the generator's initial weights
    perturb = Perturbation(ReactivationAE((info.channels, info.height, info.width)), cfg.eps, info.mean, info.std)
    perturb.to(plan.device)
    for model in plan.models.values():
        model.to(plan.device)
    history = train_generator(plan, perturb)
    metrics = measure(plan, perturb)
    wall = time.time() - started
    p, r = metrics["purified"], metrics["clean_reference"]
    log.info("qra %s: purified ASR %.4f -> %.4f, clean images to target %.4f -> %.4f; clean reference ASR %.4f -> "
             "%.4f (%.0f s)", cfg.defense, p["asr"], p["asr_qra"], p["clean_target"], p["clean_target_qra"], r["asr"],
             r["asr_qra"], wall)
    result = QraResult(cfg.defense, plan.save_dir, plan.training.index_source, len(plan.training.clean_indices),
                       tuple(img.original_index for img in plan.training.poisoned), wall, history, plan.target,
                       metrics)
    write_qra_outputs(plan, result, perturb)
    return result


def write_qra_outputs(plan: QraPlan, result: QraResult, perturb: Perturbation) -> None:
    """``qra_df.csv``, ``run_info.json``, then ``qra_result.pt`` (its presence means the run finished)."""
    run = ProbeRun("qra", PROTOCOL, plan.record, plan.model_name, plan.device, plan.pool, plan.config)
    reference = sources.CleanReference(plan.config.reference_record, plan.config.reference_model)
    info = run_info(run, result, {"metrics": result.metrics}, reference.as_info(), result.target)
    write_probe_outputs(plan.save_dir, "qra_df.csv", pd.DataFrame(result.history), info, QRA_RESULT_NAME,
                        perturb.saved_form())


def read_metrics(save_dir: Path) -> Optional[dict[str, dict[str, float]]]:
    """A finished run's metrics (``run_info.json`` next to ``qra_result.pt``), or None when it has not finished."""
    if not (save_dir / QRA_RESULT_NAME).is_file() or not (save_dir / RUN_INFO_NAME).is_file():
        return None
    return json.loads((save_dir / RUN_INFO_NAME).read_text())["metrics"]
