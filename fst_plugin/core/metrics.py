"""C-Acc, ASR and RA as BackdoorBench defines them, and the defense effectiveness rating (DER)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

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

    def batches(images: torch.Tensor, *columns: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, len(images), batch_size):
            part = slice(start, start + batch_size)
            yield (prepare(images[part]), *(column[part] for column in columns))

    bd_images, bd_labels, original = poisoned
    index, flag = torch.arange(len(bd_labels)), torch.ones(len(bd_labels), dtype=torch.long)
    # the poisoned items in BackdoorBench's shape: (image, backdoor label, index, poison flag, original label)
    return evaluate_backdoor(model, batches(*clean), batches(bd_images, bd_labels, index, flag, original), device)
