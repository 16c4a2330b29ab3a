"""Train backdoored CIFAR-10 models and write them as BackdoorBench attack records (no BackdoorBench needed).

    python -m bench_scripts.records --protocol cpu --data data/cifar10 --attacks badnets:0.01 blended:0.01

Attacks: badnets (3×3 white patch, bottom-right), blended (alpha 0.2, a seeded noise key or --blend-pattern
IMAGE), sig (clean-label sinusoid, delta 40, f 6), wanet (a fixed warp, k 4, s 0.5, static poisoning);
all-to-one, target label 0; the rate is the fraction of the whole training set that is poisoned. Everything is
seeded by --seed (poisoned indices, trigger keys, training order). A record whose ``attack_result.pt`` exists
is reused (the cache), unless --force. ``--jobs N`` trains N records side by side in separate processes, each
with its share of the cores.
``--checkpoint-every E`` saves each record's training state every E epochs under ``<cache>/<protocol>/
attack_checkpoint/`` and a re-run resumes from it; ``--stop-after-s S`` pauses training (checkpoint saved) when
the next epoch would end S seconds after the start, and ``--compile`` adds torch.compile (CUDA graphs on CUDA). A
record whose training fails (a NaN/inf loss: ``TrainingDiverged``) is not written; the others still finish, and
the script exits with status 2 and one line per failed record. Each record is a job of the grid
(bench_scripts/jobs): ``--executor ray --address HOST:PORT`` trains them on a Ray cluster (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from bench_scripts.common import (
    CLEAN_LABEL,
    DATASET,
    TARGET,
    add_protocol_args,
    link_data,
    log_timing,
    make_trigger,
    record_name,
    start,
    trigger_key,
)
from bench_scripts.jobs.cli import add_executor_arguments, run_jobs
from bench_scripts.jobs.graph import Graph
from bench_scripts.jobs.job import Job
from fst_plugin.attacks import (
    Attack,
    BackdooredModel,
    Checkpointing,
    Split,
    TrainConfig,
    backdoor_and_record,
    class_balanced_subset,
    poison_indices,
)
from fst_plugin.data.arrays import load_split_arrays
from fst_plugin.record import layout
from fst_plugin.runtime import resolve_device

log = logging.getLogger("bench.make_records")
CHECKPOINT_FOLDER = "attack_checkpoint"  # beside record/ in the cache root: training states of unfinished records


def parse_grid(items: list[str] | None, default: tuple) -> list[tuple[str, float]]:
    if not items:
        return list(default)
    out = []
    for item in items:
        attack, _, rate = item.partition(":")
        out.append((attack, float(rate)))
    return out


@dataclass(frozen=True)
class Resumable:
    """How record training checkpoints (every ``every`` epochs, 0: never), pauses (a Unix time) and compiles."""

    every: int = 0
    deadline: Optional[float] = None
    compile: bool = False

    def checkpointing(self, root: Path, name: str) -> Checkpointing:
        if not self.every:
            return Checkpointing(deadline=self.deadline)
        return Checkpointing(checkpoint_path(root, name), self.every, self.deadline)


def checkpoint_path(root: Path, name: str) -> Path:
    """Where record ``name``'s training state is kept below the cache root ``root`` while it trains."""
    return Path(root) / CHECKPOINT_FOLDER / f"{name}.pt"


def make_record(protocol, data_dir: Path, root: Path, attack: str, rate: float, seed: int,
                blend_pattern: str | None = None, force: bool = False, results_dir: Path | None = None,
                resumable: Resumable = Resumable()) -> Path:
    """Train one backdoored model and write ``root/record/<record_name(...)>``; return its folder."""
    key = trigger_key(attack, blend_pattern)
    record_dir = layout.record_dir(root, record_name(attack, rate, seed, key))
    if layout.is_finished(record_dir) and not force:
        log.info("cached: %s", record_dir)
        return record_dir
    started = time.time()
    device = resolve_device(protocol.device)
    rng = np.random.default_rng(seed)
    x_train, y_train = load_split_arrays(DATASET, data_dir, train=True)
    x_test, y_test = load_split_arrays(DATASET, data_dir, train=False)
    train_size, test_size = len(y_train), len(y_test)
    train_idx = (class_balanced_subset(y_train, protocol.train_per_class, rng) if protocol.train_per_class
                 else np.arange(train_size))
    test_idx = (class_balanced_subset(y_test, protocol.test_per_class, rng) if protocol.test_per_class
                else np.arange(test_size))
    x_train, y_train, x_test, y_test = x_train[train_idx], y_train[train_idx], x_test[test_idx], y_test[test_idx]
    trigger = make_trigger(attack, seed, blend_pattern)
    clean_label = attack in CLEAN_LABEL
    chosen = poison_indices(y_train, rate, TARGET, rng, clean_label=clean_label)
    log.info("%s %.3g%%: %d of %d training images poisoned (%s), model %s, %d epochs on %s",
             attack, 100 * rate, len(chosen), len(y_train), "clean-label" if clean_label else "relabelled",
             protocol.model, protocol.epochs, device)

    epochs: list[dict] = []
    t0 = time.time()

    def on_epoch(epoch: int, loss: float) -> None:
        epochs.append({"epoch": epoch + 1, "loss": round(loss, 4), "elapsed_s": round(time.time() - t0, 1)})
        log.info("epoch %d/%d loss %.4f (%.0f s)", epoch + 1, protocol.epochs, loss, time.time() - t0)

    def describe(result: BackdooredModel) -> dict:
        info = {"attack": attack, "rate": rate, "target": TARGET, "seed": seed, "clean_label": clean_label,
                "protocol": protocol.name, "model": protocol.model, "n_poisoned": int(len(chosen)),
                "train_size": int(len(y_train)), "train_s": round(result.train_s, 1), "epochs": epochs,
                "fast_eval": {"test_acc": result.test_acc, "test_asr": result.test_asr},
                "blend_pattern": blend_pattern if key else None, "trigger_key": key,
                "test_indices": test_idx.tolist(),
                "train_indices": train_idx.tolist() if protocol.train_per_class else None}
        return {"attack": attack, "pratio": rate, "bench_json": json.dumps(info)}

    # BackdoorBench's bd_test: every non-target test image with the trigger, indexed in the full test split.
    result = backdoor_and_record(
        record_dir, model_name=protocol.model, dataset=DATASET,
        train=Split(x_train, y_train, train_idx, train_size), test=Split(x_test, y_test, test_idx, test_size),
        attack=Attack(trigger, chosen, TARGET, relabel=not clean_label),
        train_config=TrainConfig(epochs=protocol.epochs, batch_size=protocol.batch_size, lr=protocol.lr,
                                 momentum=protocol.momentum, nesterov=protocol.nesterov, schedule=protocol.schedule,
                                 weight_decay=protocol.weight_decay, label_smoothing=protocol.label_smoothing,
                                 device=device, amp=protocol.amp, seed=seed, show_progress=False,
                                 compile=resumable.compile,
                                 checkpointing=resumable.checkpointing(root, record_dir.name)),
        keep_bd_train=True, on_epoch_end=on_epoch, record_extra=describe)
    train_s, acc, asr = result.train_s, result.test_acc, result.test_asr
    wall = time.time() - started
    if results_dir is not None:
        log_timing(results_dir, f"make_record {record_dir.name}", wall, train_s=round(train_s, 1),
                   test_acc=round(100 * acc, 2), test_asr=round(100 * asr, 2))
    return record_dir


@dataclass(frozen=True)
class MakeRecord:
    """One record to make, as a job's work: the arguments of ``make_record``, picklable for any worker.

    torch is seeded first, so the model's initialisation depends on the seed alone, not on which records this
    process made before (a record made in a worker equals one made alone). A record whose training fails is not
    written: the record is written after training."""

    protocol: Any
    data_dir: Path
    root: Path
    attack: str
    rate: float
    seed: int
    blend_pattern: Optional[str]
    force: bool
    results_dir: Optional[Path]
    resumable: Resumable = Resumable()

    @property
    def name(self) -> str:
        return record_name(self.attack, self.rate, self.seed, trigger_key(self.attack, self.blend_pattern))

    @property
    def record_dir(self) -> Path:
        return layout.record_dir(self.root, self.name)

    def __call__(self) -> str:
        torch.manual_seed(self.seed)
        make_record(self.protocol, self.data_dir, self.root, self.attack, self.rate, self.seed, self.blend_pattern,
                    self.force, self.results_dir, self.resumable)
        return ""

    def job(self) -> Job:
        """The record as a job of the grid: finished when its ``attack_result.pt`` exists (written last)."""
        keyed = trigger_key(self.attack, self.blend_pattern) is not None   # only Blended reads the key image
        inputs = (self.data_dir, *((Path(self.blend_pattern),) if keyed else ()))
        return Job(self.name, "record", self, inputs=inputs, outputs=(layout.attack_result(self.record_dir),),
                   resources=self.protocol.resources)


def main(argv: list[str] | None = None) -> list[Path]:
    """Make the records; exit with status 2 and one line per failed record if any failed (the others finish)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--attacks", nargs="*", help="attack:rate items (default: the protocol's grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blend-pattern", help="image file used as Blended's key (default: seeded noise)")
    parser.add_argument("--epochs", type=int, help="override the protocol's attack epochs")
    parser.add_argument("--force", action="store_true", help="retrain even when the record is cached")
    add_executor_arguments(parser, "records trained side by side, each in its own process with its share of the "
                                   "cores (on one GPU they share it; with several, one GPU each)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="EPOCHS",
                        help="save the training state every EPOCHS epochs and resume from it (0: never)")
    parser.add_argument("--stop-after-s", type=float, metavar="S",
                        help="pause training (checkpoint saved) before an epoch would end S seconds from now")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA graphs on CUDA)")
    run = start(parser, argv, protocol_flags=("epochs",))
    args, protocol, root, results = run.args, run.protocol, run.root, run.results
    if args.jobs < 1 or args.checkpoint_every < 0:
        parser.error(f"--jobs must be at least 1 and --checkpoint-every at least 0, got {args.jobs} and "
                     f"{args.checkpoint_every}")
    if args.stop_after_s is not None and not args.checkpoint_every:
        parser.error("--stop-after-s needs --checkpoint-every (a paused training must leave a checkpoint)")
    resumable = Resumable(args.checkpoint_every,
                          None if args.stop_after_s is None else time.time() + args.stop_after_s, args.compile)
    link_data(root, args.data)
    records = [MakeRecord(protocol, args.data, root, attack, rate, args.seed, args.blend_pattern, args.force, results,
                          resumable)
               for attack, rate in dict.fromkeys(parse_grid(args.attacks, protocol.grid))]
    run_jobs(Graph(r.job() for r in records), args, root, force=args.force)
    return [r.record_dir for r in records]


if __name__ == "__main__":
    main()
