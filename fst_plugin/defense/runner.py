"""One tuning-defense run, in two steps: :func:`prepare` validates everything and builds the model, head and data
(it writes nothing, so bad input leaves no half-written result); :func:`run` tunes and writes the outputs.

Everything a run decides lives here, under the BackdoorBench adapter, the CLI and the Python API, which only turn
their settings into a :class:`~fst_plugin.defense.config.DefenseConfig`: the input pipeline (the tensor path or
BackdoorBench's per-image DataLoaders, :mod:`fst_plugin.defense.pipeline`), the resume key and checkpoint, the
sharding under torchrun and the output files (:mod:`fst_plugin.record.defense_output`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from fst_plugin.core import ClassifierHead, TuningConfig, TuningState, evaluate_backdoor, find_head, get_mode, tune
from fst_plugin.core.alpha import AlphaChoice, choose_alpha, fixed_alpha, split_held_out
from fst_plugin.data import dataset_info
from fst_plugin.defense.backend import make_backend
from fst_plugin.core.unlearning import ReversedSamples
from fst_plugin.defense.config import DefenseConfig, alpha_search, lr_schedule_of, resume_values, unlearning_config
from fst_plugin.defense.pipeline import build_loaders, held_out_loaders
from fst_plugin.distributed import World, check_batch_size, rank_device, session, shard_eval_loader, shard_train, world_from_env
from fst_plugin.errors import ConfigError, RecordError
from fst_plugin.io_utils import atomic_torch_save, atomic_write_text
from fst_plugin.models.factory import load_weights
from fst_plugin.record import AttackRecord, choose_clean_indices, load_untrusted
from fst_plugin.record.defense_output import write_defense_outputs
from fst_plugin.record.layout import (DefenseLayout, checkpoint_file, index_file, inversion_checkpoint_file,
                                      is_finished, record_dir)
from fst_plugin.runtime import resolve_device, seed_everything

log = logging.getLogger(__name__)
EpochHook = Callable[[TuningState], None]


@dataclass
class AlphaData:
    """``alpha: auto``'s two parts of the clean tuning set (indices into the clean training set) and their loaders."""

    fit: np.ndarray
    held_out: np.ndarray
    fit_loader: Iterable
    held_out_loader: Iterable


@dataclass
class DefensePlan:
    """A validated run, built by :func:`prepare` (which writes nothing) and carried out by :func:`run`."""

    method: str
    config: DefenseConfig
    record: AttackRecord
    layout: DefenseLayout            # defense/<save_name or method>/ in the record
    log_dir: Path                    # config.log, else the layout's log/
    device: str
    model: nn.Module
    head: ClassifierHead
    indices: np.ndarray              # the clean tuning subset (indices into the clean training set)
    checkpoint: Path                 # the per-epoch resume state
    resume_key: str                  # the settings the checkpoint is valid for (config.resume_values)
    resume: Optional[TuningState]    # the state to continue from (resume), else None
    train_loader: Iterable           # a DataLoader (per-image path) or TensorBatches (tensor path)
    clean_loader: Iterable
    bd_loader: Iterable
    input_pipeline: str = "backdoorbench"  # the pipeline the data took: "tensor" or "backdoorbench"
    channels_last: bool = False      # tensor path on CUDA: the model runs in channels_last
    eval_amp: bool = False           # tensor path on CUDA with amp: evaluation under autocast
    world: World = World()           # this process among torchrun's (size 1 without torchrun)
    resume_inversion: Optional[dict[str, Any]] = None  # PAM's inversion round saved part-way (resume)
    alpha_data: Optional[AlphaData] = None      # alpha auto: the data it chooses on (None: a number, or resumed)
    alpha_choice: Optional[AlphaChoice] = None  # alpha auto: the choice a resumed run made before it stopped


@dataclass
class DefenseResult:
    """What a finished run returns; its files are in ``save_path`` (see fst_plugin.record.layout)."""

    method: str
    model: nn.Module
    history: list[dict[str, Any]]    # one row per epoch, the columns of <method>_df.csv
    before: dict[str, float]         # test_acc, test_asr, test_ra (and losses) of the backdoored model
    after: dict[str, float]          # test_acc, test_asr, test_ra after the last epoch
    save_path: Path
    wall_time_s: float               # the "before" evaluation, alpha auto's choice, the tuning and its evaluations
    tuning_time_s: float             # the tuning and the per-epoch evaluations only
    alpha: float = 0.0               # the penalty's weight the tuning used (alpha auto: the one it chose)
    alpha_choice: Optional[AlphaChoice] = None  # alpha auto: the choice, its candidates' scores and its time


def record_folder(config: DefenseConfig, result_file: Optional[str] = None) -> Path:
    """The attack record a config names: ``record``, else BackdoorBench's ``record/<result_file>`` (or a folder)."""
    if config.record:
        return Path(config.record)
    result_file = result_file or config.result_file
    if not result_file:
        raise ConfigError("no attack record given", "pass --result_file NAME (record/NAME) or --record DIR")
    candidate = Path(result_file)
    if is_finished(candidate):
        return candidate
    return record_dir(Path(), result_file)


def prepare(config: DefenseConfig, record: AttackRecord, method: str) -> DefensePlan:
    """Validate everything and build model, head and data for defense ``method``; writes nothing."""
    info = dataset_info(config.dataset)  # an unknown dataset first: the record's own is checked against it next
    if record.clean_data != config.dataset:
        raise ConfigError(f"the record was made on {record.clean_data!r} but --dataset is {config.dataset!r}",
                          f"pass --dataset {record.clean_data} (and its yaml)")
    if record.num_classes != info.num_classes:
        raise RecordError(f"the record says num_classes={record.num_classes} but {config.dataset} has "
                          f"{info.num_classes}", "check the record's dataset, or re-run the attack")
    mode = get_mode(method)
    world = world_from_env()
    device = rank_device(resolve_device(config.device), world)
    check_batch_size(config.batch_size, world)
    seed_everything(config.random_seed)
    backend = make_backend()
    log.info("models, transforms and data from: %s", backend.name)
    if config.model and config.model != record.model_name:
        log.warning("yaml/CLI model %r differs from the record's %r; using the record's", config.model,
                    record.model_name)
    model = backend.build_model(record.model_name, record.num_classes, info.channels)  # 1 for MNIST
    load_weights(model, record.state_dict, record.model_name)
    head = find_head(model, record.num_classes, config.head, config.whole_classifier)
    log.info("classifier head: %s", ", ".join(head.names))
    data_root = record.clean_data_folder(config.dataset_path, config.dataset)
    train_raw = backend.clean_split(config.dataset, data_root, train=True)
    test_raw = backend.clean_split(config.dataset, data_root, train=False)
    indices = choose_clean_indices(len(train_raw), config.ratio, config.index)
    log.info("clean tuning set: %d of %d training images", len(indices), len(train_raw))
    layout = DefenseLayout.of(record.record_dir, config.save_name or mode.name, mode.name)
    resume_key = _resume_key(config, mode.name, indices)
    checkpoint = checkpoint_file(Path(config.checkpoint_save) if config.checkpoint_save else layout.checkpoint_dir)
    resume, alpha_choice = (_load_checkpoint(checkpoint, resume_key, config.trust_record) if config.resume
                            else (None, None))
    resume_inversion = (_load_inversion_checkpoint(checkpoint, resume_key, config.trust_record)
                        if config.resume and uses_pam(config, mode.name) else None)
    loaders = build_loaders(config, backend, device, record, train_raw, test_raw, indices)
    alpha_data = None
    if chooses_alpha(config, mode.name) and alpha_choice is None:
        fit, held_out = (indices[positions] for positions in
                         split_held_out(len(indices), config.alpha_held_out, config.random_seed))
        log.info("alpha auto: %d tuning images to tune the candidates on, %d held out to score them", len(fit),
                 len(held_out))
        alpha_data = AlphaData(fit, held_out, *held_out_loaders(config, backend, device, train_raw, fit, held_out,
                                                                loaders["input_pipeline"] == "tensor"))
    return DefensePlan(method=mode.name, config=config, record=record, layout=layout,
                       log_dir=Path(config.log) if config.log else layout.log_dir, device=device, model=model,
                       head=head, indices=indices, checkpoint=checkpoint, resume_key=resume_key, resume=resume,
                       resume_inversion=resume_inversion, world=world, alpha_data=alpha_data,
                       alpha_choice=alpha_choice, **loaders)


def chooses_alpha(config: DefenseConfig, method: str) -> bool:
    """``alpha: auto`` on a mode with the penalty (the other modes ignore alpha)."""
    return config.alpha == "auto" and get_mode(method).feature_shift_penalty


def select_alpha(plan: DefensePlan) -> AlphaChoice:
    """alpha auto's choice on the plan's fit and held-out parts of the clean tuning set (nothing else is read)."""
    if plan.alpha_data is None:
        raise ValueError("the plan holds no alpha auto data (alpha is a number, or the choice was resumed)")
    data = plan.alpha_data
    return choose_alpha(plan.model, plan.head, get_mode(plan.method), data.fit_loader, data.held_out_loader,
                        tuning_config(plan.config, plan.method, plan.device, plan.world), alpha_search(plan.config))


def uses_pam(config: DefenseConfig, method: str) -> bool:
    """PAM's step and data: the config's ``pam``, else the mode's default (on for pam only)."""
    return get_mode(method).uses_pam(config.pam)


def tuning_config(config: DefenseConfig, method: str, device: str, world: World,
                  alpha: Optional[float] = None) -> TuningConfig:
    """The core's settings of a run; ``alpha``: the weight the run tunes with (else the config's number; with auto
    or a strength and no weight given, 0: a mode without the penalty ignores it)."""
    if alpha is None:
        alpha = config.alpha if isinstance(config.alpha, float) else 0.0
    return TuningConfig(epochs=config.epochs, lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.wd,
                        alpha=alpha, projection=config.projection, projection_bound=config.projection_bound,
                        lr_schedule=lr_schedule_of(config.lr_scheduler),
                        pam_rho=config.pam_rho if uses_pam(config, method) else 0.0,
                        device=device, amp=config.amp, seed=config.random_seed,
                        show_progress=None if world.is_main else False)  # one bar under torchrun


def reversed_samples(plan: DefensePlan) -> Optional[ReversedSamples]:
    """PAM's reversed-sample source, fitted on the tuning loader (None when the run does not use PAM). The rank
    that writes saves the inversion round under way beside the epoch checkpoint; ``--resume`` continues it."""
    config = plan.config
    if not uses_pam(config, plan.method):
        return None
    path = inversion_checkpoint_file(plan.checkpoint)

    def save(state: dict[str, Any]) -> None:
        atomic_torch_save({"resume_key": plan.resume_key, "state": state}, path)

    samples = ReversedSamples(unlearning_config(config), plan.train_loader, plan.record.num_classes, plan.device,
                              config.random_seed, checkpoint=save if plan.world.is_main else None)
    if plan.resume_inversion is not None:
        samples.resume_round(plan.resume_inversion)
    return samples


def _resume_key(config: DefenseConfig, method: str, indices: np.ndarray) -> str:
    relevant = resume_values(config)
    relevant["method"] = method
    relevant["indices"] = hashlib.sha256(np.ascontiguousarray(indices).tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def _checked_checkpoint(path: Path, key: str, trust: bool) -> dict[str, Any]:
    """A checkpoint file's contents, refused unless a run with the same settings (``key``) wrote it."""
    data = load_untrusted(path, "checkpoint", trust=trust)
    if not isinstance(data, dict) or data.get("resume_key") != key or "state" not in data:
        raise RecordError(f"checkpoint {path} was written by a run with other settings",
                          "resume with the same yaml and arguments, or delete the checkpoint to start afresh")
    return data


def _load_inversion_checkpoint(checkpoint: Path, key: str, trust: bool) -> Optional[dict[str, Any]]:
    """PAM's inversion round saved part-way beside ``checkpoint`` (None when there is none)."""
    path = inversion_checkpoint_file(checkpoint)
    if not path.is_file():
        return None
    state = _checked_checkpoint(path, key, trust)["state"]
    if not isinstance(state, dict) or not {"round", "inversion", "rng", "target"} <= set(state):
        raise RecordError(f"checkpoint {path} does not hold a trigger-inversion state", "delete it to start afresh")
    return state


def _load_checkpoint(path: Path, key: str, trust: bool) -> tuple[Optional[TuningState], Optional[AlphaChoice]]:
    """The state to continue from and alpha auto's choice, as the checkpoint holds them (the state is None when
    the run stopped after choosing alpha, before its first epoch ended)."""
    if not path.is_file():
        log.info("--resume: no checkpoint at %s, starting from epoch 0", path)
        return None, None
    data = _checked_checkpoint(path, key, trust)
    try:
        choice = None if data.get("alpha_choice") is None else AlphaChoice.from_dict(data["alpha_choice"])
        if data["state"] is None and choice is not None:
            log.info("--resume: alpha %.4g, chosen before the run stopped; starting from epoch 0", choice.alpha)
            return None, choice
        return TuningState.from_dict(data["state"]), choice
    except (TypeError, KeyError, ValueError):  # not a mapping of exactly TuningState's (or AlphaChoice's) fields
        raise RecordError(f"checkpoint {path} does not hold a tuning state", "delete it to start afresh") from None


def run(plan: DefensePlan, on_epoch_end: Optional[EpochHook] = None) -> DefenseResult:
    """Tune as planned and write the outputs (the first write happens here, after every check). Under torchrun
    every rank tunes its shard in one process group and only rank 0 writes. ``on_epoch_end(state)`` is called
    after each complete epoch, once the checkpoint is saved."""
    with session(plan.world, plan.device):
        if plan.world.enabled:
            plan.train_loader = shard_train(plan.train_loader, plan.world, plan.config.random_seed)
            plan.clean_loader = shard_eval_loader(plan.clean_loader, plan.world)
            plan.bd_loader = shard_eval_loader(plan.bd_loader, plan.world)
        return _tune_and_write(plan, on_epoch_end)


def _tune_and_write(plan: DefensePlan, on_epoch_end: Optional[EpochHook]) -> DefenseResult:
    config, writes = plan.config, plan.world.is_main
    if writes:
        atomic_write_text(index_file(plan.log_dir), "".join(f"{i}\n" for i in plan.indices.tolist()))
    log.info("world size %d (%s): global batch %d, %d per process", plan.world.size,
             "torchrun" if plan.world.enabled else "one process", config.batch_size,
             config.batch_size // plan.world.size)
    device, model = plan.device, plan.model
    model.to(device, memory_format=torch.channels_last) if plan.channels_last else model.to(device)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        with torch.autocast(torch.device(device).type, enabled=plan.eval_amp):
            return evaluate_backdoor(m, plan.clean_loader, plan.bd_loader, device).as_dict()

    choice = plan.alpha_choice

    def save_checkpoint(state: Optional[TuningState]) -> None:
        if writes:
            atomic_torch_save({"resume_key": plan.resume_key, "state": None if state is None else state.to_dict(),
                               "alpha_choice": None if choice is None else choice.to_dict()}, plan.checkpoint)

    def epoch_end(state: TuningState) -> None:
        save_checkpoint(state)
        if on_epoch_end is not None:
            on_epoch_end(state)

    started = time.time()
    before = evaluate(model)
    log.info("before %s: %s", plan.method, before)
    if choice is None and plan.alpha_data is not None:
        choice = select_alpha(plan)
        if plan.resume is None:
            save_checkpoint(None)  # an interruption in the first epoch keeps the choice
    # alpha auto's choice, else the config's number or strength (scaled by the backdoored head, not yet re-initialised)
    alpha = choice.alpha if choice is not None else fixed_alpha(config.alpha, plan.head)
    tuning_started = time.time()
    unlearning = reversed_samples(plan)
    history = tune(model, plan.head, get_mode(plan.method), plan.train_loader,
                   tuning_config(config, plan.method, device, plan.world, alpha), evaluate=evaluate,
                   on_epoch_end=epoch_end, resume=plan.resume, unlearning=unlearning)
    finished = time.time()
    after = {k: history[-1][k] for k in ("test_acc", "test_asr", "test_ra")}
    result = DefenseResult(method=plan.method, model=model, history=history, before=before, after=after,
                           save_path=plan.layout.folder, wall_time_s=finished - started,
                           tuning_time_s=finished - tuning_started, alpha=alpha, alpha_choice=choice)
    if not writes:
        return result
    write_defense_outputs(plan.layout, plan.record.model_name, plan.record.num_classes, model.state_dict(),
                          history, {"method": plan.method, "mode": get_mode(plan.method).__dict__,
                                    "record": str(plan.record.record_dir), "seed": config.random_seed,
                                    "device": device, "wall_time_s": result.wall_time_s,
                                    "world_size": plan.world.size, "before": before, "after": after,
                                    "config": config.to_dict(), "pam": uses_pam(config, plan.method),
                                    "pam_inversion": None if unlearning is None else unlearning.rounds,
                                    "alpha": alpha, "alpha_choice": None if choice is None else choice.to_dict()},
                          trigger_generator=None if unlearning is None else unlearning.generator_state())
    _remove_checkpoint(plan)
    log.info("%s done in %.1f s: C-Acc %.4f ASR %.4f RA %.4f -> %s", plan.method, result.wall_time_s,
             after["test_acc"], after["test_asr"], after["test_ra"], plan.layout.folder)
    return result


def _remove_checkpoint(plan: DefensePlan) -> None:
    """Only an unfinished run needs its checkpoint (``resume``): a finished one removes it, and the default
    ``checkpoint/`` folder with it when nothing else is in there (a ``checkpoint_save`` folder of the user's stays)."""
    plan.checkpoint.unlink(missing_ok=True)
    inversion_checkpoint_file(plan.checkpoint).unlink(missing_ok=True)
    folder = plan.checkpoint.parent
    if folder == plan.layout.checkpoint_dir and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
