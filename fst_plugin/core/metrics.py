"""C-Acc, ASR and RA as BackdoorBench defines them, and the defense effectiveness rating (DER).

Two entry points: :func:`evaluate_backdoor` over data loaders (one model, with the losses; the defenses and the
retuning attack), and :func:`backdoor_rates` over test sets held as tensors (several models on the same batches,
through an input map such as a perturbation; QRA).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from fst_plugin.distributed import EvalShard, all_reduce_sum
from fst_plugin.runtime import progress


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


@torch.no_grad()
def backdoor_rates(models: Mapping[str, nn.Module], tests: BackdoorTestSets, device: str | torch.device,
                   prepare: Callable[[torch.Tensor], torch.Tensor], target: Optional[int] = None,
                   batch_size: int = 256, show_progress: Optional[bool] = None) -> dict[str, dict[str, float]]:
    """Each model's C-Acc (``acc``), ASR and RA, plus with ``target`` the share of clean test images predicted
    as ``target`` (``clean_target``, the target class's own images included); keys in the order acc,
    clean_target, asr, ra. ``prepare`` maps an input batch to the models' input once per batch, shared by the
    models (a normalisation, a perturbation). The models are used as they are (put them in eval mode)."""
    clean_wanted = {"acc": tests.clean_labels}
    if target is not None:
        clean_wanted["clean_target"] = torch.full_like(tests.clean_labels, target)
    bd_wanted = {"asr": tests.bd_labels, "ra": tests.bd_original_labels}
    rates: dict[str, dict[str, float]] = {name: {} for name in models}
    for set_name, inputs, wanted in (("clean", tests.clean_inputs, clean_wanted),
                                     ("poisoned", tests.bd_inputs, bd_wanted)):
        hits = {(name, key): 0 for name in models for key in wanted}
        for start in progress(range(0, len(inputs), batch_size), show_progress, f"measure ({set_name})"):
            batch = prepare(inputs[start:start + batch_size].to(device))
            labels = {key: values[start:start + batch_size].to(device) for key, values in wanted.items()}
            for name, model in models.items():
                pred = model(batch).argmax(1)
                for key, wanted_labels in labels.items():
                    hits[(name, key)] += int((pred == wanted_labels).sum().item())
        for (name, key), count in hits.items():
            rates[name][key] = count / len(inputs) if len(inputs) else float("nan")
    return rates


def defense_effectiveness_rating(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 ∈ [0, 1] (FT-SAM paper)."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0
