"""The query-based reactivation attack (QRA): can an input perturbation alone wake a purified model's backdoor?

Min et al. (NeurIPS 2024, "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense")
propose QRA as the second probe of post-purification robustness, after the retuning attack
(:mod:`fst_plugin.retune`): instead of changing the purified model's weights, an attacker who can only query it
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
  seeded ``choose_index`` draw when a model has none, exactly as :func:`fst_plugin.retune.clean_subset` picks
  the retune's subset); the script takes the first 500 of a fresh ``choose_index_v2(split_ratio)`` draw;
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
model (``retune/retune_result.pt``) and a clean reference record (same dataset, rate 0).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms

from fst_plugin.data import PoisonedTestSet, TransformedDataset, dataset_info, get_transform, load_clean_split, materialise
from fst_plugin.errors import ConfigError, RecordError, TrainingDiverged
from fst_plugin.io_utils import atomic_torch_save, atomic_write_text
from fst_plugin.models import build_model
from fst_plugin.models.factory import load_weights
from fst_plugin.probe_config import CLEAN_REFERENCE, QraConfig, RetuneConfig
from fst_plugin.record import AttackRecord, PoisonedImage, load_attack_record, load_untrusted
from fst_plugin.record.defense_output import environment_versions
from fst_plugin.record.layout import QRA_RESULT_NAME, RUN_INFO_NAME, DefenseLayout
from fst_plugin.record.poison_pool import PoisonPool, poisoned_pool
from fst_plugin.retune import (
    clean_subset,
    inside_record,
    load_model_to_retune,
    pick_poisoned,
    read_poisoned_image,
    state_dict_of,
)
from fst_plugin.runtime import progress, resolve_device, seed_everything

log = logging.getLogger(__name__)

HIDDEN = 1024
MODELS = ("purified", "retuned", "clean_reference")  # the run_info "metrics" keys


# ----- configuration and result ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QraResult:
    defense: str
    save_dir: Path
    target: int
    metrics: dict[str, dict[str, float]]      # MODELS → acc, clean_target, asr, ra (+ the same with _qra)
    n_clean: int
    poisoned_indices: tuple[int, ...]
    clean_index_source: str
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


# ----- the generator and the perturbation -------------------------------------------------------------------
class ReactivationAE(nn.Module):
    """The script's autoencoder: an MLP on the flattened normalised image, tanh out (a direction in [-1, 1])."""

    def __init__(self, shape: tuple[int, int, int], hidden: int = HIDDEN) -> None:
        super().__init__()
        self.shape = tuple(shape)
        pixels = int(np.prod(shape))
        self.net = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, pixels), nn.Tanh())

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.net(normalised.flatten(1)).view(-1, *self.shape)


class Perturbation(nn.Module):
    """Pixels in [0, 1] → the model input: normalise(clamp(pixels + clamp(eps·AE(normalise(pixels)), ±eps), 0, 1))."""

    def __init__(self, ae: ReactivationAE, eps: float, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.ae, self.eps = ae, float(eps)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def perturbed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        delta = torch.clamp(self.ae(self.normalise(pixels)) * self.eps, -self.eps, self.eps)
        return torch.clamp(pixels + delta, 0, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.perturbed_pixels(pixels))


def pixel_transform(dataset: str) -> transforms.Compose:
    """The dataset's test transform without its final Normalize: images as [0, 1] tensors, the space of eps."""
    steps = get_transform(dataset, train=False).transforms
    assert isinstance(steps[-1], transforms.Normalize), steps
    return transforms.Compose(steps[:-1])


def load_perturbation(path: Path, trust: bool = False) -> Perturbation:
    """A saved ``qra_result.pt`` as a ready :class:`Perturbation` (eval mode)."""
    saved = load_untrusted(path, "QRA result", trust=trust)
    ae = ReactivationAE(tuple(saved["shape"]), int(saved["hidden"]))
    ae.load_state_dict(saved["model"])
    return Perturbation(ae, saved["eps"], tuple(saved["mean"]), tuple(saved["std"])).eval()


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
                          f"{list(pool.targets[:5])})", "QRA reactivates one target class: use an all-to-one attack's record")
    return pool.targets[0]


def load_retuned(config: QraConfig, record: AttackRecord) -> tuple[nn.Module, str]:
    """The retuned version of the purified model (``retune/retune_result.pt``), or the command that makes it."""
    path = DefenseLayout.of(record.record_dir, config.defense).retune_result
    if not path.is_file():
        raise RecordError(f"{config.defense!r} has no retune result in {record.record_dir} (no {path})",
                          f"run `fst-plugin retune --record {record.record_dir} --defense {config.defense}` first")
    inside_record(path, record.record_dir, "retune result")
    state, name, classes = state_dict_of(load_untrusted(path, "retune result", trust=config.trust_record), path)
    name, classes = name or record.model_name, classes or record.num_classes
    model = build_model(name, classes, dataset_info(record.clean_data).channels)
    load_weights(model, state, name)
    return model, name


def build_qra_set(record: AttackRecord, train_split: Dataset, subset: np.ndarray, index_source: str,
                  config: QraConfig, poisoned: list[PoisonedImage], target: int) -> QraSet:
    """Clean images (the subset's first ``clean_num``) then the poisoned ones, all as [0, 1] test-transform pixels."""
    if config.clean_num > len(subset):
        raise ConfigError(f"--clean_num {config.clean_num} is larger than the clean tuning subset "
                          f"({len(subset)} images, {index_source})",
                          f"pass --clean_num {len(subset)} or fewer (or a larger --ratio)")
    to_pixels = pixel_transform(record.clean_data)
    mode = "L" if dataset_info(record.clean_data).channels == 1 else "RGB"
    clean_indices = np.asarray(subset[:config.clean_num], dtype=np.int64)
    images, labels, true = [], [], []
    for index in clean_indices.tolist():
        image, label = train_split[index][:2]
        images.append(to_pixels(image))
        labels.append(int(label))
        true.append(int(label))
    for img in poisoned:
        images.append(to_pixels(read_poisoned_image(img, mode)))
        labels.append(target)
        true.append(img.original_label)
    return QraSet(torch.stack(images), torch.tensor(labels), torch.tensor(true), clean_indices, poisoned, index_source)


def prepare_qra(config: QraConfig) -> QraPlan:
    """Validate everything and build the three models, the training set and the test sets; writes nothing."""
    config.validate()
    record = load_attack_record(config.record, trust=config.trust_record)
    save_dir = DefenseLayout.of(record.record_dir, config.defense).qra_dir
    inside_record(save_dir, record.record_dir, "QRA output folder")
    pool = poisoned_pool(record)
    target = attack_target(record, pool)
    poisoned = pick_poisoned(pool, config.poison_num, config.random_seed, record,
                             outside_class=target)  # fail fast, before loading
    device = resolve_device(config.device)
    as_retune = RetuneConfig(record=config.record, defense=config.defense, random_seed=config.random_seed,
                             ratio=config.ratio, dataset_path=config.dataset_path, trust_record=config.trust_record)
    purified, model_name, _ = load_model_to_retune(as_retune, record)
    retuned, _ = load_retuned(config, record)
    clean, _, _ = load_model_to_retune(RetuneConfig(record=config.record, defense=CLEAN_REFERENCE,
                                                    reference_record=config.reference_record,
                                                    trust_record=config.trust_record), record)
    models = {"purified": purified, "retuned": retuned, "clean_reference": clean}
    for model in models.values():
        model.eval().requires_grad_(False)  # the generator is the only thing trained
    root = record.clean_data_folder(config.dataset_path)
    train_split = load_clean_split(record.clean_data, root, train=True)
    test_split = load_clean_split(record.clean_data, root, train=False)
    subset, source = clean_subset(as_retune, record, len(train_split))
    training = build_qra_set(record, train_split, subset, source, config, poisoned, target)
    log.info("qra %s: target %d, %d clean (%s) + %d poisoned training images (train indices %s...)", config.defense,
             target, len(training.clean_indices), source, len(poisoned), [p.original_index for p in poisoned[:5]])
    to_pixels = pixel_transform(record.clean_data)
    channels = dataset_info(record.clean_data).channels
    clean_test = materialise(TransformedDataset(test_split, to_pixels))
    bd_test = materialise(PoisonedTestSet(record.bd_test.images, channels, to_pixels))
    return QraPlan(config, record, save_dir, device, target, models, model_name, training, clean_test, bd_test, pool)


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
    for epoch in progress(range(cfg.epochs), cfg.show_progress, "qra epochs"):
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


@torch.no_grad()
def measure(plan: QraPlan, perturb: Perturbation, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Each model's C-Acc and target rate on the clean test images, ASR and RA on the poisoned ones, without and
    with the perturbation (``*_qra``); one perturbation per batch, shared by the three models."""
    device, target = plan.device, plan.target
    out: dict[str, dict[str, float]] = {name: {} for name in MODELS}
    # (name, data, key counting "prediction == backdoor label", key counting "prediction == true label")
    for set_name, data, target_key, true_key in (("clean", plan.clean_test, "clean_target", "acc"),
                                                 ("poisoned", plan.bd_test, "asr", "ra")):
        hits = {(name, key + suffix): 0 for name in MODELS for key in (target_key, true_key) for suffix in ("", "_qra")}
        for batch in progress(DataLoader(data, batch_size=batch_size, shuffle=False), plan.config.show_progress,
                              f"qra measure ({set_name})"):
            pixels = batch[0].to(device)
            if set_name == "clean":
                true = batch[1].to(device)
                wanted = {target_key: torch.full_like(true, target), true_key: true}
            else:
                wanted = {target_key: batch[1].to(device), true_key: batch[4].to(device)}
            inputs = {"": perturb.normalise(pixels), "_qra": perturb(pixels)}
            for name in MODELS:
                for suffix, x in inputs.items():
                    pred = plan.models[name](x).argmax(1)
                    for key, labels in wanted.items():
                        hits[(name, key + suffix)] += int((pred == labels).sum().item())
        for (name, key), count in hits.items():
            out[name][key] = count / len(data)
    order = ("acc", "clean_target", "asr", "ra")
    return {name: {k: out[name][k] for k in [*order, *(o + "_qra" for o in order)]} for name in MODELS}


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
    result = QraResult(cfg.defense, plan.save_dir, plan.target, metrics, len(plan.training.clean_indices),
                       tuple(img.original_index for img in plan.training.poisoned), plan.training.index_source, wall,
                       history)
    write_qra_outputs(plan, result, perturb)
    return result


def write_qra_outputs(plan: QraPlan, result: QraResult, perturb: Perturbation) -> None:
    """``qra_df.csv``, ``run_info.json``, then ``qra_result.pt`` (its presence means the run finished)."""
    atomic_write_text(plan.save_dir / "qra_df.csv", pd.DataFrame(result.history).to_csv())
    info = {"method": "qra", "protocol": "query-based reactivation attack (stable_backdoor_purification "
                                         "fine_tune/qra.py)",
            "defense": result.defense, "record": str(plan.record.record_dir),
            "reference_record": str(plan.config.reference_record), "model_name": plan.model_name,
            "device": plan.device, "seed": plan.config.random_seed, "target": result.target,
            "clean_index_source": result.clean_index_source, "n_clean": result.n_clean,
            "n_poisoned": len(result.poisoned_indices), "poisoned_train_indices": list(result.poisoned_indices),
            "poison_pool": plan.pool.summary(), "wall_time_s": result.wall_time_s, "metrics": result.metrics, "config": asdict(plan.config),
            "versions": environment_versions()}
    atomic_write_text(plan.save_dir / RUN_INFO_NAME, json.dumps(info, indent=2, default=str))
    ae = perturb.ae
    atomic_torch_save({"shape": list(ae.shape), "hidden": HIDDEN, "eps": perturb.eps,
                       "mean": perturb.mean.flatten().tolist(), "std": perturb.std.flatten().tolist(),
                       "model": {k: v.detach().cpu() for k, v in ae.state_dict().items()}},
                      plan.save_dir / QRA_RESULT_NAME)


def read_metrics(save_dir: Path) -> Optional[dict[str, dict[str, float]]]:
    """A finished run's metrics (``run_info.json`` next to ``qra_result.pt``), or None when it has not finished."""
    if not (save_dir / QRA_RESULT_NAME).is_file() or not (save_dir / RUN_INFO_NAME).is_file():
        return None
    return json.loads((save_dir / RUN_INFO_NAME).read_text())["metrics"]
