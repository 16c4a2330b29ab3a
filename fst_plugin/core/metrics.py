"""C-Acc, ASR and RA as BackdoorBench defines them, and the defense effectiveness rating (DER).

One evaluator, :func:`evaluate_backdoor`, over data loaders (one model, with the losses; the defenses and the
retuning attack). :func:`evaluate_backdoor_tensors` feeds it test sets held in memory (the benchmark), and
:func:`backdoor_rates` several models through an input map such as a perturbation, with the clean images' rate
of the target class (QRA).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from fst_plugin.distributed import EvalShard, all_reduce_sum


@dataclass(frozen=True)
class BackdoorMetrics:
    """Fractions in [0, 1], as in BackdoorBench's CSVs; losses are mean cross-entropy per batch."""

    test_acc: float
    test_asr: float
    test_ra: float
    clean_test_loss_avg_over_batch: float
    bd_test_loss_avg_over_batch: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[float, float, float]:
    """Return (mean batch loss, accuracy w.r.t. item[1], accuracy w.r.t. item[4] if present)."""
    if isinstance(loader, EvalShard):
        return _sharded_accuracy(model, loader, device)
    criterion = nn.CrossEntropyLoss()
    loss_sum, hits, hits_original, seen, batches = 0.0, 0, 0, 0, 0
    for batch in loader:
        inputs, labels = batch[0].to(device), batch[1].to(device)
        logits = model(inputs)
        preds = logits.argmax(1)
        loss_sum += criterion(logits, labels).item()
        hits += (preds == labels).sum().item()
        if len(batch) >= 5:
            hits_original += (preds == batch[4].to(device)).sum().item()
        seen += labels.numel()
        batches += 1
    if seen == 0:
        return float("nan"), float("nan"), float("nan")
    return loss_sum / batches, hits / seen, hits_original / seen


@torch.no_grad()
def _sharded_accuracy(model: nn.Module, shard: EvalShard, device: torch.device) -> tuple[float, float, float]:
    """:func:`_accuracy` under torchrun: each rank scores its images into full-length per-image vectors, the
    vectors are summed over the ranks (every image is scored by exactly one rank), and the mean loss is taken
    over the one-process batches, so the numbers are those of one process (up to float rounding)."""
    scores = torch.zeros(3, shard.total, dtype=torch.float64, device=device)  # loss, hit, hit w.r.t. item[4]
    for positions, batch in shard:
        inputs, labels = batch[0].to(device), batch[1].to(device)
        logits = model(inputs)
        preds, positions = logits.argmax(1), positions.to(device)
        scores[0, positions] = nn.functional.cross_entropy(logits.float(), labels, reduction="none").double()
        scores[1, positions] = (preds == labels).double()
        if len(batch) >= 5:
            scores[2, positions] = (preds == batch[4].to(device)).double()
    scores = all_reduce_sum(scores)
    if shard.total == 0:
        return float("nan"), float("nan"), float("nan")
    batch_means = torch.stack([chunk.mean() for chunk in scores[0].split(shard.batch_size)])
    hits = scores[1:].sum(1) / shard.total
    return batch_means.mean().item(), hits[0].item(), hits[1].item()


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Every item's prediction and label (item[1]) on the CPU, and the mean per-image cross-entropy, in eval
    mode: what a paired comparison of several models on one set needs (FST's ``alpha: auto``)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    preds, labels, loss_sum = [], [], 0.0
    for batch in loader:
        inputs, targets = batch[0].to(device), batch[1].to(device)
        logits = model(inputs)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
        labels.append(targets.cpu())
    model.train(was_training)
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), float("nan")
    preds_all, labels_all = torch.cat(preds), torch.cat(labels)
    return preds_all, labels_all, loss_sum / len(labels_all)


def evaluate_backdoor(model: nn.Module, clean_loader: Iterable, bd_loader: Iterable,
                      device: str | torch.device = "cpu") -> BackdoorMetrics:
    """C-Acc on the clean test set; ASR and RA on the poisoned test set.

    ``bd_loader`` yields BackdoorBench's items (img, backdoor label, original index, poison flag,
    original label): ASR counts predictions equal to the backdoor label, RA those equal to the true label.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    clean_loss, acc, _ = _accuracy(model, clean_loader, device)
    bd_loss, asr, ra = _accuracy(model, bd_loader, device)
    model.train(was_training)
    return BackdoorMetrics(acc, asr, ra, clean_loss, bd_loss)


@dataclass(frozen=True)
class BackdoorTestSets:
    """A clean and a poisoned test set as tensors (inputs before the ``prepare`` map of :func:`backdoor_rates`)."""

    clean_inputs: torch.Tensor
    clean_labels: torch.Tensor
    bd_inputs: torch.Tensor
    bd_labels: torch.Tensor           # the backdoor labels (ASR counts predictions equal to them)
    bd_original_labels: torch.Tensor  # the true labels (RA)


def backdoor_rates(models: Mapping[str, nn.Module], tests: BackdoorTestSets, device: str | torch.device,
                   prepare: Callable[[torch.Tensor], torch.Tensor], target: Optional[int] = None,
                   batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Each model's C-Acc (``acc``), ASR and RA, counted as :func:`evaluate_backdoor` counts them, plus with
    ``target`` the share of clean test images predicted as ``target`` (``clean_target``, the target class's own
    images included); keys in the order acc, clean_target, asr, ra. ``prepare`` maps an input batch to the models'
    input (a normalisation, a perturbation). The models are used as they are (put them in eval mode)."""
    device = torch.device(device)
    clean_target = torch.full_like(tests.clean_labels, -1 if target is None else target)
    n_clean, n_bd = len(tests.clean_labels), len(tests.bd_labels)
    rates: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        # one pass per set: the clean items carry the target as their 5th column (scored like RA's true label)
        _, acc, to_target = _accuracy(model, _tensor_batches(prepare, batch_size, device, tests.clean_inputs,
                                                             tests.clean_labels, torch.arange(n_clean),
                                                             torch.zeros(n_clean, dtype=torch.long), clean_target),
                                      device)
        _, asr, ra = _accuracy(model, _tensor_batches(prepare, batch_size, device, tests.bd_inputs, tests.bd_labels,
                                                      torch.arange(n_bd), torch.ones(n_bd, dtype=torch.long),
                                                      tests.bd_original_labels), device)
        rates[name] = {"acc": acc, **({"clean_target": to_target} if target is not None else {}), "asr": asr, "ra": ra}
    return rates


def defense_effectiveness_rating(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 ∈ [0, 1] (FT-SAM paper)."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def evaluate_backdoor_tensors(model: nn.Module, clean: tuple[torch.Tensor, torch.Tensor],
                              poisoned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                              prepare: Callable[[torch.Tensor], torch.Tensor] = lambda images: images,
                              batch_size: int = 500, device: str | torch.device = "cpu") -> BackdoorMetrics:
    """:func:`evaluate_backdoor` on test sets held in memory: ``clean`` = (images, labels), ``poisoned`` =
    (images, backdoor labels, original labels). ``prepare`` turns a slice of images into the model's input
    (e.g. uint8 to normalised float) one batch at a time, so a whole test set is never converted at once."""
    bd_images, bd_labels, original = poisoned
    index, flag = torch.arange(len(bd_labels)), torch.ones(len(bd_labels), dtype=torch.long)
    # the poisoned items in BackdoorBench's shape: (image, backdoor label, index, poison flag, original label)
    return evaluate_backdoor(model, _tensor_batches(prepare, batch_size, device, *clean),
                             _tensor_batches(prepare, batch_size, device, bd_images, bd_labels, index, flag, original),
                             device)


def _tensor_batches(prepare: Callable[[torch.Tensor], torch.Tensor], batch_size: int, device: str | torch.device,
                    images: torch.Tensor, *columns: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Items of in-memory test sets, batch by batch: ``prepare``-d images on ``device``, then the columns."""
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        yield (prepare(images[part].to(device)), *(column[part] for column in columns))
