"""FST, FE-tuning, FT-init, LP and vanilla FT as BackdoorBench defenses.

Each class follows BackdoorBench's defense life cycle — ``add_arguments(parser)``, ``__init__(args)``
(yaml merged with the command line, command line wins), ``set_result(result_file)``, ``set_logger()``,
``mitigation()``, ``defense(result_file)`` — and subclasses BackdoorBench's ``defense.base.defense`` when
imported inside a checkout (a stand-in with the same method names otherwise). All five share one
implementation, :class:`TuningDefense`; a subclass only names its tuning mode.

Nothing is written before the record, config, data, model and head have all been validated, so bad input
leaves no half-written result behind.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import logging.handlers
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from pprint import pformat
from typing import Any, ClassVar, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fst_plugin.adapter.backend import backdoorbench_root, make_backend
from fst_plugin.defense.config import DefenseConfig, add_arguments as add_config_arguments, load_config, overrides_from, resume_values
from fst_plugin.core import ClassifierHead, TuningConfig, TuningState, evaluate_backdoor, find_head, get_mode, tune
from fst_plugin.data import PoisonedTestSet, TransformedDataset, dataset_info, materialise
from fst_plugin.data.tensor_data import TensorBatches, decode, fits_tensor_path, nonstandard_transform
from fst_plugin.distributed import (World, check_batch_size, rank_device, session, shard_eval_loader, shard_train,
                                    world_from_env)
from fst_plugin.errors import ConfigError, RecordError
from fst_plugin.io_utils import atomic_torch_save, atomic_write_text
from fst_plugin.models.factory import load_weights
from fst_plugin.record import AttackRecord, load_attack_record, load_untrusted
from fst_plugin.record.defense_output import write_defense_outputs
from fst_plugin.record.layout import DefenseLayout, checkpoint_file, index_file
from fst_plugin.runtime import resolve_device, seed_everything

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s [%(levelname)-8s] [%(filename)s:%(lineno)d] %(message)s"
LOG_DATEFMT = "%Y-%m-%d:%H:%M:%S"
EVAL_SUBSET_BATCH = 256
TENSOR_EVAL_BATCH = {"cuda": 1024, "cpu": 256}  # tensor path's evaluation batch (no gradients: large is cheap)


@dataclass
class DefensePlan:
    """A validated run, built by :meth:`TuningDefense.prepare` (which writes nothing) and carried out by ``run``."""

    device: str
    model: nn.Module
    head: ClassifierHead
    indices: np.ndarray              # the clean tuning subset (indices into the clean training set)
    checkpoint: Path                 # the per-epoch resume state
    resume_key: str                  # the settings the checkpoint is valid for (fst_plugin.defense.config.resume_values)
    resume: Optional[TuningState]    # the state to continue from (--resume), else None
    train_loader: Iterable           # a DataLoader (per-image path) or TensorBatches (tensor path)
    clean_loader: Iterable
    bd_loader: Iterable
    data_path: str = "backdoorbench"  # the path the tuning set took: "tensor" or "backdoorbench"
    channels_last: bool = False      # tensor path on CUDA: the model runs in channels_last
    eval_amp: bool = False           # tensor path on CUDA with amp: evaluation under autocast
    world: World = World()           # this process among torchrun's (size 1 without torchrun)


@dataclass
class DefenseResult:
    """What a finished run returns; its files are in ``save_path`` (see fst_plugin.record.layout)."""

    method: str
    model: nn.Module
    history: list[dict[str, Any]]    # one row per epoch, the columns of <method>_df.csv
    before: dict[str, float]         # test_acc, test_asr, test_ra (and losses) of the backdoored model
    after: dict[str, float]          # test_acc, test_asr, test_ra after the last epoch
    save_path: Path
    wall_time_s: float


class DefenseBase:
    """Stand-in for BackdoorBench's ``defense.base.defense`` (same method names) outside a checkout."""

    def set_result(self, result_file: str) -> None: ...
    def set_trainer(self, *args: Any) -> None: ...
    def set_logger(self) -> None: ...
    def denoising(self) -> None: ...
    def mitigation(self) -> Any: ...
    def inhibition(self) -> None: ...
    def defense(self, result_file: str) -> Any: ...
    def detect(self) -> None: ...


def _defense_base() -> type:
    """BackdoorBench's base class when running inside a checkout, else the stand-in."""
    root = backdoorbench_root()
    if root is not None:
        if str(root) not in sys.path:
            sys.path.append(str(root))
        try:
            from defense.base import defense as backdoorbench_defense  # type: ignore
            return backdoorbench_defense
        except ImportError:
            pass
    return DefenseBase


def choose_clean_indices(n: int, ratio: float, index_file: Optional[str]) -> np.ndarray:
    """BackdoorBench's ``choose_index``: an index file, else ``random.sample(range(n), int(n * ratio))``."""
    if index_file:
        path = Path(index_file)
        if not path.is_file():
            raise ConfigError(f"index file {path} does not exist", "pass --index with an existing file, or omit it to use --ratio")
        try:
            indices = np.atleast_1d(np.loadtxt(path, dtype=np.int64))
        except ValueError as exc:
            raise ConfigError(f"index file {path} is not a list of integers ({exc})", "write one integer index per line") from None
        if indices.ndim != 1 or indices.size == 0:
            raise ConfigError(f"index file {path} holds no indices", "write one integer index per line")
        bad = indices[(indices < 0) | (indices >= n)]
        if bad.size:
            raise ConfigError(f"index file {path} holds index {int(bad[0])}, outside 0..{n - 1} of the clean training set",
                              "use indices of the clean training set")
        values, counts = np.unique(indices, return_counts=True)
        if (counts > 1).any():
            dup = int(values[counts > 1][0])
            raise ConfigError(f"index file {path} lists index {dup} more than once", "remove the duplicate indices")
        return indices
    count = int(n * ratio)
    if count < 1:
        raise ConfigError(f"ratio {ratio} of {n} training images selects no image", "raise --ratio")
    return np.asarray(random.sample(range(n), count), dtype=np.int64)


class TuningDefense(_defense_base()):  # type: ignore[misc]
    """One BackdoorBench defense per tuning mode; subclasses set ``method``."""

    method: ClassVar[str] = "fst"

    # ----- BackdoorBench life cycle -----------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """BackdoorBench ft's arguments (same names) plus FST's, one per config key (see fst_plugin.defense.config)."""
        add_config_arguments(parser)

    def __init__(self, args: argparse.Namespace) -> None:
        self.config: DefenseConfig = replace(load_config(overrides_from(args)), terminal_info=list(sys.argv))
        info = dataset_info(self.config.dataset)
        args.__dict__ = {**self.config.to_dict(), "num_classes": info.num_classes,
                         "input_height": info.height, "input_width": info.width, "input_channel": info.channels,
                         "img_size": info.img_size, "dataset_path": f"{self.config.dataset_path}/{self.config.dataset}"}
        self.args = args
        self.result: Optional[AttackRecord] = None
        self._memory_log: Optional[logging.handlers.MemoryHandler] = None
        self._log_file: Optional[logging.FileHandler] = None
        if self.config.result_file or self.config.record:
            self.set_result(self.config.result_file)

    def record_dir(self, result_file: Optional[str]) -> Path:
        if self.config.record:
            return Path(self.config.record)
        if not result_file:
            raise ConfigError("no attack record given", "pass --result_file NAME (record/NAME) or --record DIR")
        candidate = Path(result_file)
        if (candidate / "attack_result.pt").is_file():
            return candidate
        return Path("record") / result_file

    def set_result(self, result_file: Optional[str]) -> None:
        """Load and validate the attack record (writes nothing)."""
        record_dir = self.record_dir(result_file).resolve()
        if self.result is not None and self.result.record_dir == record_dir:
            return
        self.result = load_attack_record(record_dir, trust=self.config.trust_record)
        self.layout = DefenseLayout.of(record_dir, self.config.save_name or self.method, self.method)
        self.args.save_path = str(self.layout.folder)
        self.args.checkpoint_save = self.config.checkpoint_save or str(self.layout.checkpoint_dir)
        self.args.log = self.config.log or str(self.layout.log_dir)

    def set_logger(self) -> None:
        """BackdoorBench's log format on the console; the log file opens once outputs may be written."""
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        formatter = logging.Formatter(fmt=LOG_FORMAT, datefmt=LOG_DATEFMT)
        if not any(type(h) is logging.StreamHandler for h in root.handlers):
            console = logging.StreamHandler()
            console.setFormatter(formatter)
            if not world_from_env().is_main:  # under torchrun only rank 0 tells the story (warnings still show)
                console.setLevel(logging.WARNING)
            root.addHandler(console)
        if self._memory_log is None:
            self._memory_log = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
            self._memory_log.setFormatter(formatter)
            root.addHandler(self._memory_log)
        log.info(pformat(self.args.__dict__))
        if self.config.trust_record:
            log.warning("--trust-record is ON: records and checkpoints are fully unpickled and can run code")

    def _open_log_file(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_dir / (time.strftime("%Y_%m_%d_%H_%M_%S", time.localtime()) + ".log"))
        handler.setFormatter(logging.Formatter(fmt=LOG_FORMAT, datefmt=LOG_DATEFMT))
        if self._memory_log is not None:
            self._memory_log.setTarget(handler)
            self._memory_log.flush()
            logging.getLogger().removeHandler(self._memory_log)
            self._memory_log = None
        logging.getLogger().addHandler(handler)
        self._log_file = handler

    def defense(self, result_file: Optional[str] = None) -> DefenseResult:
        self.set_result(result_file)
        self.set_logger()
        return self.mitigation()

    def mitigation(self) -> DefenseResult:
        try:
            return self.run(self.prepare())
        finally:
            self._close_logs()

    def _close_logs(self) -> None:
        """Detach this run's handlers (a rejected run's buffer is dropped: nothing was written)."""
        root = logging.getLogger()
        for handler in (self._memory_log, self._log_file):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
        self._memory_log = self._log_file = None

    # ----- the work ---------------------------------------------------------------------------------
    def prepare(self) -> DefensePlan:
        """Validate everything and build model, head and data; writes nothing."""
        cfg, record = self.config, self.result
        if record is None:
            raise ConfigError("no attack record loaded", "pass --result_file NAME or --record DIR")
        if record.clean_data != cfg.dataset:
            raise ConfigError(f"the record was made on {record.clean_data!r} but --dataset is {cfg.dataset!r}",
                              f"pass --dataset {record.clean_data} (and its yaml)")
        info = dataset_info(cfg.dataset)
        if record.num_classes != info.num_classes:
            raise RecordError(f"the record says num_classes={record.num_classes} but {cfg.dataset} has {info.num_classes}",
                              "check the record's dataset, or re-run the attack")
        world = world_from_env()
        device = rank_device(resolve_device(cfg.device), world)
        check_batch_size(cfg.batch_size, world)
        seed_everything(cfg.random_seed)
        backend = make_backend()
        log.info("models, transforms and data from: %s", backend.name)
        if cfg.model and cfg.model != record.model_name:
            log.warning("yaml/CLI model %r differs from the record's %r; using the record's", cfg.model, record.model_name)
        model = backend.build_model(record.model_name, record.num_classes)
        load_weights(model, record.state_dict, record.model_name)
        head = find_head(model, record.num_classes, cfg.head, cfg.whole_classifier)
        log.info("classifier head: %s", ", ".join(head.names))
        data_root = record.clean_data_folder(self.config.dataset_path, self.config.dataset)
        train_raw = backend.clean_split(cfg.dataset, data_root, train=True)
        test_raw = backend.clean_split(cfg.dataset, data_root, train=False)
        indices = choose_clean_indices(len(train_raw), cfg.ratio, cfg.index)
        log.info("clean tuning set: %d of %d training images", len(indices), len(train_raw))
        resume_key = self._resume_key(indices)
        checkpoint = checkpoint_file(Path(self.args.checkpoint_save))
        resume = self._load_checkpoint(checkpoint, resume_key) if cfg.resume else None
        eval_rng = np.random.default_rng(cfg.random_seed)  # one generator: the clean subset, then the poisoned one
        poisoned = PoisonedTestSet(record.bd_test.images, info.channels)
        use_tensors = cfg.input_pipeline == "tensor" and self._tensor_path_ok(backend, len(indices), len(test_raw),
                                                                          len(poisoned))
        if use_tensors:
            plan_data = self._tensor_data(device, train_raw, test_raw, poisoned, indices, eval_rng)
        else:
            plan_data = self._per_image_data(backend, device, train_raw, test_raw, poisoned, indices, eval_rng)
        return DefensePlan(device=device, model=model, head=head, indices=indices, checkpoint=checkpoint,
                           resume_key=resume_key, resume=resume, world=world, **plan_data)

    def _tensor_path_ok(self, backend: Any, n_train: int, n_test: int, n_poisoned: int) -> bool:
        """Whether the tensor path reproduces this run's data: the backend's transforms are the standard ones and
        every set fits the decoded-size bound (``fits_tensor_path``); otherwise say why and use the per-image path."""
        cfg = self.config
        for train in (True, False):
            problem = nonstandard_transform(backend.transform(cfg.dataset, train=train), cfg.dataset, train)
            if problem:
                log.info("per-image data path: %s's %s, which the tensor path does not reproduce", backend.name,
                         problem)
                return False
        subset = cfg.eval_subset or max(n_test, n_poisoned)
        sets = ((n_train, "tuning images"), (min(n_test, subset), "clean test images"),
                (min(n_poisoned, subset), "poisoned test images"))
        if all([fits_tensor_path(n, cfg.dataset, what=what) for n, what in sets]):  # a list: log every set
            return True
        log.info("per-image data path: a set is above the tensor path's bound (see above)")
        return False

    def _tensor_data(self, device: str, train_raw: Dataset, test_raw: Dataset, poisoned: Dataset,
                     indices: np.ndarray, eval_rng: np.random.Generator) -> dict[str, Any]:
        """Decode the tuning subset and both test sets once; crop, flip and normalise batches on the device."""
        cfg = self.config
        on_cuda = torch.device(device).type == "cuda"
        eval_batch = max(cfg.batch_size, TENSOR_EVAL_BATCH["cuda" if on_cuda else "cpu"])

        def test_batches(dataset: Dataset) -> TensorBatches:
            keep = self._eval_indices(len(dataset), eval_rng)
            return TensorBatches(decode(dataset, cfg.dataset, keep), cfg.dataset, eval_batch, device=device,
                                 channels_last=on_cuda)

        log.info("tensor data path: BackdoorBench's transforms as batched tensor operations on %s", device)
        train = TensorBatches(decode(train_raw, cfg.dataset, indices), cfg.dataset, cfg.batch_size, shuffle=True,
                              augment=True, device=device, channels_last=on_cuda)
        return dict(train_loader=train, clean_loader=test_batches(test_raw), bd_loader=test_batches(poisoned),
                    data_path="tensor", channels_last=on_cuda, eval_amp=on_cuda and cfg.amp)

    def _per_image_data(self, backend: Any, device: str, train_raw: Dataset, test_raw: Dataset, poisoned: Dataset,
                        indices: np.ndarray, eval_rng: np.random.Generator) -> dict[str, Any]:
        """BackdoorBench's per-image path: DataLoaders running the backend's PIL transforms on every item."""
        cfg = self.config
        test_transform = backend.transform(cfg.dataset, train=False)
        pin = cfg.pin_memory and device.startswith("cuda")
        loader_args = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin)
        train_set = TransformedDataset(train_raw, backend.transform(cfg.dataset, train=True), indices)
        return dict(train_loader=DataLoader(train_set, shuffle=True, **loader_args),
                    clean_loader=self._test_loader(TransformedDataset(test_raw, test_transform), loader_args, eval_rng),
                    bd_loader=self._test_loader(TransformedDataset(poisoned, test_transform), loader_args, eval_rng),
                    data_path="backdoorbench")

    def _eval_indices(self, n: int, rng: np.random.Generator) -> Optional[list[int]]:
        """With ``eval_subset``: the test images evaluated each epoch, drawn with ``random_seed`` (the same on both
        data paths); else None (all of them)."""
        size = self.config.eval_subset
        if not size:
            return None
        return np.sort(rng.choice(n, size=min(size, n), replace=False)).tolist()

    def _test_loader(self, dataset: Dataset, loader_args: dict[str, Any], rng: np.random.Generator) -> DataLoader:
        """The full test set, or with ``eval_subset`` a subset decoded once (the test transform is deterministic,
        so each epoch's evaluation then costs forward passes only)."""
        keep = self._eval_indices(len(dataset), rng)
        if keep is None:
            return DataLoader(dataset, shuffle=False, **loader_args)
        return DataLoader(materialise(Subset(dataset, keep)), batch_size=EVAL_SUBSET_BATCH, shuffle=False)

    def tuning_config(self, device: str) -> TuningConfig:
        cfg = self.config
        return TuningConfig(epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.wd,
                            alpha=cfg.alpha, projection=cfg.projection,
                            projection_bound=cfg.projection_bound, device=device, amp=cfg.amp,
                            seed=cfg.random_seed,
                            show_progress=None if world_from_env().is_main else False)  # one bar under torchrun

    def _resume_key(self, indices: np.ndarray) -> str:
        relevant = resume_values(self.config)
        relevant["method"] = self.method
        relevant["indices"] = hashlib.sha256(np.ascontiguousarray(indices).tobytes()).hexdigest()
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()

    def _load_checkpoint(self, path: Path, key: str) -> Optional[TuningState]:
        if not path.is_file():
            log.info("--resume: no checkpoint at %s, starting from epoch 0", path)
            return None
        data = load_untrusted(path, "checkpoint", trust=self.config.trust_record)
        if not isinstance(data, dict) or data.get("resume_key") != key or "state" not in data:
            raise RecordError(f"checkpoint {path} was written by a run with other settings",
                              "resume with the same yaml and arguments, or delete the checkpoint to start afresh")
        try:
            return TuningState.from_dict(data["state"])
        except TypeError:  # not a mapping of exactly TuningState's fields
            raise RecordError(f"checkpoint {path} does not hold a tuning state", "delete it to start afresh") from None

    def run(self, plan: DefensePlan) -> DefenseResult:
        """Tune as planned and write the outputs (the first write happens here, after every check). Under
        torchrun every rank tunes its shard in one process group and only rank 0 writes."""
        with session(plan.world, plan.device):
            if plan.world.enabled:
                plan.train_loader = shard_train(plan.train_loader, plan.world, self.config.random_seed)
                plan.clean_loader = shard_eval_loader(plan.clean_loader, plan.world)
                plan.bd_loader = shard_eval_loader(plan.bd_loader, plan.world)
            return self._tune_and_write(plan)

    def _tune_and_write(self, plan: DefensePlan) -> DefenseResult:
        cfg, record, writes = self.config, self.result, plan.world.is_main
        assert record is not None
        mode = get_mode(self.method)
        log_dir = Path(self.args.log)
        if writes:
            self._open_log_file(log_dir)
            atomic_write_text(index_file(log_dir), "".join(f"{i}\n" for i in plan.indices.tolist()))
        else:
            self._close_logs()  # the buffered log of a rank that writes nothing
        log.info("world size %d (%s): global batch %d, %d per process", plan.world.size,
                 "torchrun" if plan.world.enabled else "one process", cfg.batch_size,
                 cfg.batch_size // plan.world.size)
        device, model = plan.device, plan.model
        model.to(device, memory_format=torch.channels_last) if plan.channels_last else model.to(device)

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            with torch.autocast(torch.device(device).type, enabled=plan.eval_amp):
                return evaluate_backdoor(m, plan.clean_loader, plan.bd_loader, device).as_dict()

        started = time.time()
        before = evaluate(model)
        log.info("before %s: %s", self.method, before)

        def save_checkpoint(state: TuningState) -> None:
            if writes:
                atomic_torch_save({"resume_key": plan.resume_key, "state": state.to_dict()}, plan.checkpoint)

        history = tune(model, plan.head, mode, plan.train_loader, self.tuning_config(device),
                       evaluate=evaluate, on_epoch_end=save_checkpoint, resume=plan.resume)
        wall = time.time() - started
        after = {k: history[-1][k] for k in ("test_acc", "test_asr", "test_ra")}
        if not writes:
            return DefenseResult(method=self.method, model=model, history=history, before=before, after=after,
                                 save_path=self.layout.folder, wall_time_s=wall)
        write_defense_outputs(self.layout, record.model_name, record.num_classes, model.state_dict(),
                              history, {"method": self.method, "mode": mode.__dict__, "record": str(record.record_dir),
                                        "seed": cfg.random_seed, "device": device, "wall_time_s": wall,
                                        "world_size": plan.world.size,
                                        "before": before, "after": after, "config": cfg.to_dict()})
        plan.checkpoint.unlink(missing_ok=True)  # only an unfinished run needs it (--resume)
        log.info("%s done in %.1f s: C-Acc %.4f ASR %.4f RA %.4f -> %s", self.method, wall,
                 after["test_acc"], after["test_asr"], after["test_ra"], self.layout.folder)
        return DefenseResult(method=self.method, model=model, history=history, before=before, after=after,
                             save_path=self.layout.folder, wall_time_s=wall)


class FST(TuningDefense):
    """Feature Shift Tuning: re-init head, α·⟨W, W₀⟩ penalty, head-norm projection."""
    method = "fst"


class FETuning(TuningDefense):
    """FE-tuning: re-initialised, frozen head; tune the feature extractor."""
    method = "fe-tuning"


class FTInit(TuningDefense):
    """FT-init: re-initialise the head, then fine-tune everything."""
    method = "ft-init"


class LP(TuningDefense):
    """Linear probing: tune the head only."""
    method = "lp"


class VanillaFT(TuningDefense):
    """Vanilla fine-tuning of all parameters."""
    method = "vanilla-ft"
