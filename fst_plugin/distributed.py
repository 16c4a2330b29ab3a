"""Scale-out on torchrun: the world this process belongs to, and the few collective steps a defense needs.

``torchrun --nproc_per_node N ...`` starts N copies of the program with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in the environment. :func:`world_from_env` reads them without any collective call, so a run
validates its input first (a bad value fails on every rank alike, before the group exists); :func:`session`
then opens the process group (nccl on CUDA, gloo on the CPU) and closes it again.

Batch semantics: ``batch_size`` is the GLOBAL batch. Each step's gradient is that of the mean loss over the
whole global batch (:func:`global_mean_loss` weights each rank's sum by the global count), so N processes
take the same optimiser steps as one process with the same ``batch_size``; each rank holds
``batch_size / N`` images.

* The DataLoader path shards with a :class:`~torch.utils.data.DistributedSampler` (:func:`shard_train_loader`).
* Any other iterable of global batches (the tensor path's ``TensorBatches``) is sliced per rank
  (:class:`RankSlices`): every rank draws the same global batch (same shuffle, same augmentation, since those
  draw from generators seeded identically on every rank) and keeps its part.
* Evaluation (:class:`EvalShard`) gives each rank every N-th image; per-image losses and hits are summed over
  the ranks (``all_reduce``), so C-Acc, ASR, RA and the per-batch loss are those of one process.

BatchNorm statistics stay per rank (no SyncBatchNorm; DDP broadcasts rank 0's running statistics at every
forward): see the README's "Scale-out with torchrun".

This module sits low in the house (torch and fst_plugin.errors only): the core imports it.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from fst_plugin.errors import ConfigError

log = logging.getLogger(__name__)

GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # a rank stuck this long in a collective fails instead of hanging


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes (size 1: an ordinary single-process run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files."""
        return self.rank == 0


SINGLE = World()


def world_from_env() -> World:
    """The world torchrun describes in the environment (no collective call; SINGLE without torchrun)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer",
                          "launch with torchrun, or unset these variables") from None
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={size}", "launch with torchrun")
    return World(rank, size, local_rank)


def current_world() -> World:
    """The world of the open process group, else SINGLE (what the core asks while tuning)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), world_from_env().local_rank)
    return SINGLE


def rank_device(device: str, world: World) -> str:
    """Under torchrun on CUDA each rank takes GPU ``LOCAL_RANK``; the CPU stays the CPU."""
    if not world.enabled or not device.startswith("cuda"):
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {world.local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                          "start at most as many processes per node as there are GPUs (--nproc_per_node)")
    if device not in ("cuda", f"cuda:{world.local_rank}"):
        log.warning("device %s ignored under torchrun: rank %d uses cuda:%d (LOCAL_RANK)",
                    device, world.rank, world.local_rank)
    return f"cuda:{world.local_rank}"


def check_batch_size(batch_size: int, world: World) -> int:
    """The per-rank batch (``batch_size`` is the global batch); refuses one that does not divide."""
    if batch_size % world.size:
        raise ConfigError(f"batch_size {batch_size} is the global batch and does not divide among "
                          f"{world.size} processes", f"pass a batch_size that is a multiple of {world.size}")
    return batch_size // world.size


@contextlib.contextmanager
def session(world: World, device: str) -> Iterator[World]:
    """Open the process group for ``world`` (nccl on CUDA, gloo on the CPU) and close it on the way out.

    Nothing happens for a single process or when the caller already opened a group. On an error the group is
    destroyed too, and the exception goes on, so the process exits and torchrun stops the other ranks."""
    if not world.enabled or dist.is_initialized():
        yield world
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=GROUP_TIMEOUT)
    log.info("distributed: rank %d of world size %d, backend %s, device %s", world.rank, world.size, backend, device)
    try:
        yield world
        dist.barrier()  # nobody leaves before rank 0 has written the outputs
    finally:
        dist.destroy_process_group()


AUX_HEADS = ("aux1", "aux2", "AuxLogits")  # torchvision's GoogLeNet and Inception-v3


def has_idle_parameters(model: nn.Module) -> bool:
    """Whether a trainable parameter of ``model`` can never get a gradient: torchvision's GoogLeNet and Inception-v3
    kept with their auxiliary classifiers but with ``aux_logits`` off (BackdoorBench's form, see
    ``backdoorbench_form`` of the model factory) run those heads in training mode and drop their output."""
    for module in model.modules():
        if getattr(module, "aux_logits", None) is False:
            heads = [head for head in (getattr(module, name, None) for name in AUX_HEADS) if isinstance(head, nn.Module)]
            if any(p.requires_grad for head in heads for p in head.parameters()):
                return True
    return False


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when a group is open (only the parameters that train now are
    synchronised, so wrap after freezing); else ``model`` itself. DDP broadcasts rank 0's weights first.

    A model with trainable parameters that never get a gradient (:func:`has_idle_parameters`: GoogLeNet's and
    Inception-v3's aux heads) is wrapped with ``find_unused_parameters``; without it DDP stops at the second step.
    Why not freeze the aux heads instead: which parameters train is the tuning mode's decision, taken by the core
    before it wraps (and undone by ``finish``), and the result would be the same: DDP leaves a parameter no rank
    used with no gradient, so SGD and its weight decay skip it exactly as one process does. The search for unused
    parameters walks the autograd graph at every step, so only models that need it pay for it."""
    if not current_world().enabled:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    idle = has_idle_parameters(model)
    if idle:
        log.info("the model has trainable parameters that get no gradient (aux heads): DDP looks for them each step")
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=idle)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over the ranks (``values`` itself with one process)."""
    if current_world().enabled:
        values = values.clone()
        dist.all_reduce(values)
    return values


def global_mean_loss(logits: torch.Tensor, targets: torch.Tensor, criterion: nn.Module
                     ) -> tuple[torch.Tensor, Optional[float], int, int]:
    """(loss to back-propagate on this rank, global mean loss, global hits, global count) of one step; the
    global mean is None with one process (the loss itself is it; read it once, after any penalty is added).

    With N ranks the loss is this rank's cross-entropy sum · N / global count: DDP averages gradients over
    the ranks, so the step is the gradient of the mean over the whole global batch, even when the last batch
    splits unevenly. The reported loss is the same on every rank, so a non-finite loss stops every rank."""
    hits = (logits.argmax(1) == targets).sum()
    if not current_world().enabled:
        return criterion(logits, targets), None, int(hits.item()), targets.numel()
    loss_sum = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    totals = all_reduce_sum(torch.stack([loss_sum.detach(), hits.float(),
                                         torch.tensor(float(targets.numel()), device=logits.device)]))
    count = int(totals[2].item())
    return loss_sum * current_world().size / count, (totals[0] / count).item(), int(totals[1].item()), count


def begin_epoch(loader: Iterable, epoch: int) -> None:
    """Tell a DistributedSampler which epoch starts (its shuffle is seeded with seed + epoch)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def shard_train_loader(loader: DataLoader, world: World, seed: int) -> DataLoader:
    """The tuning DataLoader for this rank: a DistributedSampler (shuffled with ``seed`` + epoch) and the
    per-rank batch. Every rank gets the same number of batches (the sampler pads with repeated images)."""
    sampler = DistributedSampler(loader.dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=check_batch_size(loader.batch_size, world), sampler=sampler,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


class RankSlices:
    """This rank's part of each global batch of ``batches`` (``TensorBatches`` or any iterable of tuples of
    tensors). Each epoch starts from rank 0's torch generator state, so every rank draws the same global batches
    (shuffle and augmentation) as one process would. A last global batch smaller than the world is dropped (a
    rank would have no image), with a log."""

    def __init__(self, batches: Iterable, world: World) -> None:
        self.batches, self.world = batches, world

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if current_world().enabled:  # the batches draw shuffle and augmentation from torch's generator: rank 0's
            state = [torch.get_rng_state()]
            dist.broadcast_object_list(state, src=0)
            torch.set_rng_state(state[0])
        for batch in self.batches:
            if len(batch[0]) < self.world.size:
                log.info("dropped a last batch of %d image(s): fewer than the %d processes", len(batch[0]),
                         self.world.size)
                continue
            yield tuple(t.tensor_split(self.world.size)[self.world.rank] for t in batch)


class EvalShard:
    """Every ``world.size``-th image of an evaluation loader, for this rank, with each image's position.

    ``batch_size`` is the one-process loader's batch: the per-batch mean loss is rebuilt on that partition."""

    def __init__(self, loader: Iterable, world: World) -> None:
        self.world = world
        self.batch_size = int(loader.batch_size)  # type: ignore[attr-defined]
        if isinstance(loader, DataLoader):
            self.total = len(loader.dataset)  # type: ignore[arg-type]
            mine = list(range(world.rank, self.total, world.size))
            self._loader: Iterable = DataLoader(loader.dataset, batch_size=self.batch_size, sampler=mine,
                                                num_workers=loader.num_workers, pin_memory=loader.pin_memory)
            self._sliced = False
        else:  # a TensorBatches: cheap to iterate whole, keep every world.size-th image of each batch
            self.total = len(loader.data)  # type: ignore[attr-defined]
            self._loader, self._sliced = loader, True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Yields (positions in the full set, this rank's part of the batch)."""
        if not self._sliced:
            mine = torch.arange(self.world.rank, self.total, self.world.size)
            start = 0
            for batch in self._loader:
                yield mine[start:start + len(batch[0])], batch
                start += len(batch[0])
            return
        start = 0
        for batch in self._loader:
            keep = slice(self.world.rank, None, self.world.size)
            yield torch.arange(start, start + len(batch[0]))[keep], tuple(t[keep] for t in batch)
            start += len(batch[0])


def shard_eval_loader(loader: Any, world: World) -> Any:
    """``loader`` as an :class:`EvalShard` under torchrun, else unchanged."""
    return EvalShard(loader, world) if world.enabled else loader


def shard_train(loader: Any, world: World, seed: int) -> Any:
    """This rank's tuning batches: a DistributedSampler for a DataLoader, :class:`RankSlices` otherwise."""
    if isinstance(loader, DataLoader):
        return shard_train_loader(loader, world, seed)
    return RankSlices(loader, world)
