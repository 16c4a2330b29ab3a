"""The measurements of ``bench_scripts/speed/run.py`` (see its docstring): the compute limit, the defense on each input
pipeline (through the public runner), the attack trainer against its limit, and BackdoorBench's own ``ft``."""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from bench_scripts.speed.report import Row, load_average, peak_memory, synchronize
from fst_plugin.attacks import TrainConfig, train_classifier
from fst_plugin.core import get_mode
from fst_plugin.data import load_clean_split
from fst_plugin.data.tensor_data import TensorBatches, TensorImages, decode
from fst_plugin.data.tensor_transforms import normalize_for
from fst_plugin.defense.config import build_config
from fst_plugin.defense.runner import DefensePlan, prepare, run
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import DEFENSE_FOLDER, DefenseLayout, record_dir, records_dir

log = logging.getLogger("speed")


def mirror_record(record: Path, parent: Path, name: Optional[str] = None, copy: bool = True) -> Path:
    """``parent/<name>``: a copy of ``record`` (or, ``copy=False``, symbolic links to its entries) without its
    ``defense/`` outputs and poisoned training set. A copy for this package (it refuses image paths that
    resolve outside the record folder), links for BackdoorBench (its records name their original folder)."""
    mirror = parent / (name or record.name)
    mirror.mkdir(parents=True)
    for entry in record.iterdir():
        if entry.name in (DEFENSE_FOLDER, "bd_train_dataset"):
            continue
        if not copy:
            (mirror / entry.name).symlink_to(entry.resolve())
        elif entry.is_dir():
            shutil.copytree(entry, mirror / entry.name)
        else:
            shutil.copy2(entry, mirror / entry.name)
    return mirror


@dataclass
class Setup:
    record: Path                     # the private copy the defenses write into
    source: Path                     # the record given (never written to)
    method: str
    settings: dict[str, Any]        # DefenseConfig keys (the defense's settings, without a yaml)
    device: str
    info: dict[str, Any] = field(default_factory=dict)


def defense_plan(setup: Setup, pipeline: str) -> DefensePlan:
    """The defense's plan on ``pipeline`` (validated, nothing written), its outputs under defense/speed_<pipeline>/."""
    config = build_config(setup.settings, {"record": str(setup.record), "input_pipeline": pipeline,
                                           "save_name": f"speed_{pipeline}"})
    return prepare(config, load_attack_record(setup.record), setup.method)


def measure_defense(setup: Setup, pipeline: str, repeat: int) -> Row:
    """(b) or (c): prepare (setup_s) and run one defense; per epoch from the runner's tuning time."""
    with peak_memory(setup.device) as peak:
        started = time.perf_counter()
        plan = defense_plan(setup, pipeline)
        setup_s = time.perf_counter() - started
        if plan.input_pipeline != pipeline:
            log.warning("the defense fell back to input_pipeline %s", plan.input_pipeline)
        epochs_run: list[int] = []  # the epochs this process ran (a resumed run's history holds earlier ones too)
        result = run(plan, on_epoch_end=lambda state: epochs_run.append(state.epochs_done))
        total = time.perf_counter() - started
    epochs = len(epochs_run)
    n_eval = sum(len(loader.dataset) if hasattr(loader, "dataset") else len(loader.data)
                 for loader in (plan.clean_loader, plan.bd_loader))
    return Row(**setup.info, measure=pipeline, repeat=repeat, epochs=epochs, n_tune=len(plan.indices), n_eval=n_eval,
               setup_s=setup_s, per_epoch_s=result.tuning_time_s / epochs, total_s=total, peak_rss_mb=peak["rss"],
               peak_gpu_mb=peak["gpu"], load_avg=load_average(), note=f"plan.input_pipeline={plan.input_pipeline}")


def warm_up(model: torch.nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], amp: bool) -> None:
    """One untimed fwd+bwd (and a forward) so a measurement does not pay for first-call kernel setup."""
    model.train()
    with torch.autocast(x.device.type, enabled=amp):
        out = model(x)
    (F.cross_entropy(out, y) if y is not None else out.float().mean()).backward()
    model.zero_grad(set_to_none=True)
    model.train()


def data_sample(images: np.ndarray, device: str, count: int = 128) -> torch.Tensor:
    return torch.from_numpy(images[:count].transpose(0, 3, 1, 2).copy()).to(device)


def measure_limit(setup: Setup, repeat: int) -> Row:
    """(a): the same model, mode and precision over device-resident, already transformed tensors."""
    plan = defense_plan(setup, "tensor")
    cfg, device = plan.config, plan.device
    model = plan.model.to(device, memory_format=torch.channels_last) if plan.channels_last else plan.model.to(device)
    train = list(plan.train_loader)  # one epoch's augmented, normalised batches, resident on the device
    tests = [b[:2] for loader in (plan.clean_loader, plan.bd_loader) for b in loader]
    mode = get_mode(setup.method)
    head_params = {id(p) for layer in plan.head.modules for p in layer.parameters()}
    params = [p for p in model.parameters() if mode.train_backbone or id(p) in head_params]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
    use_amp = cfg.amp and torch.device(device).type == "cuda"
    warm_up(model, train[0][0], train[0][1], use_amp)
    with peak_memory(device) as peak:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(cfg.epochs):
            model.train()
            for x, y, *_ in train:
                with torch.autocast(torch.device(device).type, enabled=use_amp):
                    loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=use_amp):
                for x, y in tests:
                    model(x).argmax(1)
        synchronize(device)
        total = time.perf_counter() - started
    return Row(**setup.info, measure="limit", repeat=repeat, epochs=cfg.epochs, n_tune=len(plan.indices),
               n_eval=sum(len(y) for _, y in tests), per_epoch_s=total / cfg.epochs, total_s=total,
               peak_rss_mb=peak["rss"], peak_gpu_mb=peak["gpu"], load_avg=load_average(),
               note="fwd+bwd+step over resident tuning batches, forward over resident test batches")


def measure_attack(setup: Setup, data_root: Path, dataset: str, n_images: int, repeat: int) -> list[Row]:
    """(e): one epoch of ``train_classifier`` vs fwd+bwd+step over the same batches already on the device."""
    plan = defense_plan(setup, "tensor")
    model_name = plan.record.model_name
    split = load_clean_split(dataset, data_root, train=True)
    decoded = decode(split, dataset, list(range(min(n_images, len(split)))), show_progress=False)
    images = decoded.images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C), as train_classifier takes
    labels = decoded.labels.numpy()
    n_images = len(labels)
    device = plan.device
    config = TrainConfig(epochs=1, batch_size=128, device=device, seed=repeat, show_progress=False)
    rows = []
    warm_up(plan.model.to(device), normalize_for(data_sample(images, device), dataset), None, False)
    with peak_memory(device) as peak:
        synchronize(device)
        started = time.perf_counter()
        train_classifier(plan.model, images, labels, dataset, config)
        synchronize(device)
        total = time.perf_counter() - started
    rows.append(Row(**{**setup.info, "model": model_name}, measure="attack", repeat=repeat, epochs=1,
                    n_tune=n_images, n_eval=0, per_epoch_s=total, total_s=total, peak_rss_mb=peak["rss"],
                    peak_gpu_mb=peak["gpu"], load_avg=load_average(), note="fst_plugin.attacks.train_classifier"))
    channels_last = torch.device(device).type == "cuda"
    data = TensorImages(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), (torch.from_numpy(labels),))
    batches = list(TensorBatches(data, dataset, config.batch_size, shuffle=True, augment=True, device=device,
                                 channels_last=channels_last))
    model = plan.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    warm_up(model, *batches[0], False)
    with peak_memory(device) as peak:
        synchronize(device)
        started = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        total = time.perf_counter() - started
    rows.append(Row(**{**setup.info, "model": model_name}, measure="attack_limit", repeat=repeat, epochs=1,
                    n_tune=n_images, n_eval=0, per_epoch_s=total, total_s=total, peak_rss_mb=peak["rss"],
                    peak_gpu_mb=peak["gpu"], load_avg=load_average(), note="fwd+bwd+step over resident batches"))
    return rows


BB_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}:\d{2}:\d{2}:\d{2})")


def _stamp(line: str) -> Optional[float]:
    match = BB_STAMP.match(line)
    return datetime.strptime(match.group(1), "%Y-%m-%d:%H:%M:%S").timestamp() if match else None


def bb_epoch_times(lines: list[str]) -> tuple[Optional[float], list[float]]:
    """From BackdoorBench's ft log: when training starts (its trainer's "epoch_now:0" line) and when each epoch's
    test metrics are logged (the "{'batch': ..." dict its trainer logs once per epoch, after the evaluation)."""
    start = next((_stamp(line) for line in lines if "epoch_now:0" in line), None)
    ends = [_stamp(line) for line in lines if "{'batch':" in line]
    return start, [t for t in ends if t is not None]


def measure_bb_ft(setup: Setup, bb_root: Path, bb_python: str, repeat: int) -> Row:
    """(d): BackdoorBench's own defense/ft.py on a mirror of the record inside the checkout."""
    name = f"{setup.record.name}__speed"
    mirror = record_dir(bb_root, name)
    if mirror.exists():
        shutil.rmtree(mirror)
    mirror_record(setup.source, records_dir(bb_root), name, copy=False)
    keys = ("epochs", "ratio", "random_seed", "device", "num_workers", "batch_size", "lr", "dataset")
    argv = [bb_python, "defense/ft.py", "--result_file", name, "--yaml_path", "./config/defense/ft/cifar10.yaml",
            "--pin_memory", "False"]
    for key in keys:
        if key in setup.settings:
            argv += [f"--{key}", str(setup.settings[key])]
    try:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=bb_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = proc.communicate()
        total = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"BackdoorBench's ft failed ({proc.returncode}):\n{output[-3000:]}")
        log_files = sorted(DefenseLayout.of(mirror, "ft").log_dir.glob("*.log"))
        lines = log_files[-1].read_text().splitlines() if log_files else output.splitlines()
        start, ends = bb_epoch_times(lines)
        epochs = len(ends)
        per_epoch = (ends[-1] - start) / epochs if epochs and start is not None else float("nan")
    finally:
        shutil.rmtree(mirror, ignore_errors=True)
    peak_rss = float("nan")  # not measured: RUSAGE_CHILDREN counts the forked child's copy of this process
    return Row(**setup.info, measure="bb_ft", repeat=repeat, epochs=epochs, n_tune=0, n_eval=0, per_epoch_s=per_epoch,
               total_s=total, peak_rss_mb=peak_rss, load_avg=load_average(),
               note="BackdoorBench defense/ft.py (subprocess)")
