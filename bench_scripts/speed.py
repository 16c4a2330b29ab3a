"""How close a defense runs to the compute it needs, measured side by side on one record and one device.

Measures, interleaved in one process and repeated (``--repeats``), for one defense (``--method``):

* (a) ``limit``: the compute limit. The record's model, in the defense's precision, with every tensor already on
  the device: per epoch, fwd+bwd+SGD step over the (augmented, normalised) tuning batches, then a forward pass
  over the clean and poisoned test batches. No data loading at all.
* (b) ``tensor``: the defense on ``data_path: tensor``;
* (c) ``backdoorbench``: the defense on ``data_path: backdoorbench`` (the per-image DataLoader path);
* (d) ``bb_ft``: BackdoorBench's own ``defense/ft.py`` on the same record, run as a subprocess of
  ``--bb-python`` in ``--backdoorbench DIR`` (when given; (b) and (c) then run inside that checkout too, so all
  three use BackdoorBench's loaders and clean split);
* (e) ``attack`` against ``attack_limit``: ``fst_plugin.attacks.train_classifier`` for one epoch on
  ``--attack-images`` clean training images vs fwd+bwd+step over the same batches already on the device.

Per epoch means: from the end of the defense's "before" evaluation to the end of its last epoch (training and
the per-epoch evaluation), divided by the epochs; for BackdoorBench's ft, from its "All setting done" log line
to its last epoch's log line (its log has 1 s resolution). Setup (record loading, decoding) is reported apart.
Peak RSS is sampled every 20 ms during each measurement (a measurement's peak includes what the process holds
from earlier ones); Peak GPU memory on CUDA. BackdoorBench's ft: not measured (a forked child's RSS counts the parent's pages).

Defense outputs never land in the given record: the record is mirrored (symbolic links) into a temporary
folder, whose ``defense/speed_<path>/`` receives them; BackdoorBench's ft runs on a mirrored record
``<name>__speed`` inside the checkout, removed afterwards.

Writes ``<out>/<device>.csv`` (one row per measurement) and prints the ratio table for the README.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fst_plugin.adapter.defenses import DefensePlan, TuningDefense
from fst_plugin.attacks import TrainConfig, train_classifier
from fst_plugin.core import get_mode
from fst_plugin.data import load_clean_split
from fst_plugin.data.tensor_data import TensorBatches, TensorImages, decode
from fst_plugin.data.tensor_transforms import normalize_for
from fst_plugin.plugins import available_defenses, load_defense
from fst_plugin.record.layout import DEFENSE_FOLDER, DefenseLayout
from fst_plugin.runtime import resolve_device

log = logging.getLogger("speed")
COLUMNS = ["device", "record", "model", "method", "measure", "repeat", "epochs", "n_tune", "n_eval", "setup_s",
           "per_epoch_s", "total_s", "peak_rss_mb", "peak_gpu_mb", "load_avg", "note"]


@dataclass
class Row:
    device: str
    record: str
    model: str
    method: str
    measure: str
    repeat: int
    epochs: int
    n_tune: int
    n_eval: int
    setup_s: float = 0.0
    per_epoch_s: float = float("nan")
    total_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    peak_gpu_mb: float = float("nan")
    load_avg: str = ""
    note: str = ""


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU's model name (the CSV's file name)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak RSS (sampled every 20 ms) and peak GPU memory while the block runs."""
    out = {"rss": _rss_mb(), "gpu": float("nan")}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            out["rss"] = max(out["rss"], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["rss"] = max(out["rss"], _rss_mb())
        if cuda:
            out["gpu"] = torch.cuda.max_memory_allocated() / 2**20


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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


class EpochClock(logging.Handler):
    """Times of the defense's "before" line and of each "epoch k/E" line (log records carry float times)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.before: Optional[float] = None
        self.epochs: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.endswith("adapter.defenses") and message.startswith("before "):
            self.before = record.created
        elif record.name.endswith("core.tuning") and re.match(r"\S+ epoch \d+/\d+: ", message):
            self.epochs.append(record.created)


@dataclass
class Setup:
    record: Path                     # the private copy the defenses write into
    source: Path                     # the record given (never written to)
    method: str
    settings: dict[str, Any]
    device: str
    info: dict[str, Any] = field(default_factory=dict)


def build_defense(setup: Setup, data_path: str) -> TuningDefense:
    defense_cls = load_defense(setup.method)
    parser = argparse.ArgumentParser()
    defense_cls.add_arguments(parser)
    argv = ["--record", str(setup.record), "--data_path", data_path, "--save_name", f"speed_{data_path}"]
    for key, value in setup.settings.items():
        argv += [f"--{key}", str(value)]
    defense = defense_cls(parser.parse_args(argv))
    defense.set_logger()
    return defense


def measure_defense(setup: Setup, data_path: str, repeat: int) -> Row:
    """(b) or (c): prepare (setup_s) and run one defense; per epoch from the log's epoch lines."""
    clock = EpochClock()
    logging.getLogger().addHandler(clock)
    try:
        with peak_memory(setup.device) as peak:
            started = time.perf_counter()
            defense = build_defense(setup, data_path)
            plan = defense.prepare()
            setup_s = time.perf_counter() - started
            if plan.data_path != data_path:
                log.warning("the defense fell back to data_path %s", plan.data_path)
            try:
                defense.run(plan)
            finally:
                defense._close_logs()
            total = time.perf_counter() - started
    finally:
        logging.getLogger().removeHandler(clock)
    epochs = len(clock.epochs)
    per_epoch = (clock.epochs[-1] - clock.before) / epochs if epochs and clock.before else float("nan")
    n_eval = sum(len(loader.dataset) if hasattr(loader, "dataset") else len(loader.data)
                 for loader in (plan.clean_loader, plan.bd_loader))
    return Row(**setup.info, measure=data_path, repeat=repeat, epochs=epochs, n_tune=len(plan.indices), n_eval=n_eval,
               setup_s=setup_s, per_epoch_s=per_epoch, total_s=total, peak_rss_mb=peak["rss"],
               peak_gpu_mb=peak["gpu"], load_avg=load_average(), note=f"plan.data_path={plan.data_path}")


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
    defense = build_defense(setup, "tensor")
    plan: DefensePlan = defense.prepare()
    defense._close_logs()
    cfg, device = defense.config, plan.device
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
    defense = build_defense(setup, "tensor")
    plan = defense.prepare()
    defense._close_logs()
    model_name = defense.result.model_name
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
    mirror = bb_root / "record" / name
    if mirror.exists():
        shutil.rmtree(mirror)
    mirror_record(setup.source, bb_root / "record", name, copy=False)
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


def ratio_table(rows: list[Row]) -> str:
    """Medians per measure, and the ratios the issue asks for."""
    def median(measure: str, column: str = "per_epoch_s") -> float:
        values = [getattr(r, column) for r in rows if r.measure == measure]
        return float(np.median(values)) if values else float("nan")

    a, b, c, d = (median(m) for m in ("limit", "tensor", "backdoorbench", "bb_ft"))
    e, e_limit = median("attack"), median("attack_limit")
    lines = ["| measure | s/epoch (median) | setup s | peak RSS MB | peak GPU MB |", "|---|---|---|---|---|"]
    for measure in ("limit", "tensor", "backdoorbench", "bb_ft", "attack", "attack_limit"):
        if any(r.measure == measure for r in rows):
            lines.append(f"| {measure} | {median(measure):.2f} | {median(measure, 'setup_s'):.1f} | "
                         f"{median(measure, 'peak_rss_mb'):.0f} | {median(measure, 'peak_gpu_mb'):.0f} |")
    lines += ["", "| ratio | value |", "|---|---|", f"| (b) tensor / (a) limit | {b / a:.2f} |",
              f"| (c) backdoorbench / (a) limit | {c / a:.2f} |", f"| (c) backdoorbench / (b) tensor | {c / b:.2f} |"]
    if d == d:
        lines.append(f"| (d) BackdoorBench ft / (b) tensor | {d / b:.2f} |")
    if e == e:
        lines.append(f"| (e) attack / attack limit | {e / e_limit:.2f} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in asdict(row).items()})
    tmp.replace(path)


def read_csv(path: Path) -> list[Row]:
    """The rows of a CSV this script wrote (for ``--report``)."""
    numbers = {"repeat": int, "epochs": int, "n_tune": int, "n_eval": int}
    with open(path, newline="") as fh:
        return [Row(**{k: numbers.get(k, float)(v) if k in numbers or k.endswith(("_s", "_mb")) else v
                       for k, v in row.items()}) for row in csv.DictReader(fh)]


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--report"]:  # the ratio table of CSVs already written
        for path in argv[1:]:
            print(f"{path}\n\n{ratio_table(read_csv(Path(path)))}\n")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, required=True, help="attack record folder (never written to)")
    parser.add_argument("--dataset_path", type=Path, required=True, help="folder holding <dataset>/")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--method", default="fst", choices=sorted(available_defenses()))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.02)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--eval_subset", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["limit", "tensor", "backdoorbench", "attack"])
    parser.add_argument("--attack-images", type=int, default=2000, help="(e): clean training images, one epoch")
    parser.add_argument("--backdoorbench", type=Path, default=None,
                        help="a BackdoorBench checkout: (b), (c) run inside it and (d) runs its defense/ft.py")
    parser.add_argument("--bb-python", default=sys.executable, help="the python of the BackdoorBench checkout's venv")
    parser.add_argument("--out", type=Path, default=Path("bench_results/speed"))
    parser.add_argument("--csv-name", default=None, help="CSV file name (default: <device>.csv)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("fst_plugin", "fst_plugin.core.tuning"):
        logging.getLogger(noisy).setLevel(logging.INFO)

    command = "python " + " ".join(shlex.quote(a) for a in ["bench_scripts/speed.py", *argv])
    device = resolve_device(args.device)
    record = args.record.resolve()
    dataset_path = args.dataset_path.resolve()
    bb_root = args.backdoorbench.resolve() if args.backdoorbench else None
    settings = {"dataset_path": dataset_path, "dataset": args.dataset, "epochs": args.epochs, "ratio": args.ratio,
                "batch_size": args.batch_size, "device": device, "num_workers": 0, "random_seed": args.seed,
                "amp": args.amp}
    if args.eval_subset:
        settings["eval_subset"] = args.eval_subset
    rows: list[Row] = []
    name = device_name(device)
    csv_path = (args.out / (args.csv_name or f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')}.csv")).resolve()
    with tempfile.TemporaryDirectory(prefix="fst_speed_") as tmp:
        mirror = mirror_record(record, Path(tmp) / "record")
        setup = Setup(record=mirror, source=record, method=args.method, settings=settings, device=device)
        model_name = build_defense(setup, "tensor").result.model_name
        setup.info = {"device": name, "record": str(record), "model": model_name, "method": args.method}
        cwd = os.getcwd()
        if bb_root is not None:
            os.chdir(bb_root)  # the defenses then use BackdoorBench's loaders (make_backend looks at the cwd)
        try:
            for repeat in range(args.repeats):
                measures = []
                if "limit" not in args.skip:
                    measures.append(lambda: [measure_limit(setup, repeat)])
                for data_path in ("tensor", "backdoorbench"):
                    if data_path not in args.skip:
                        measures.append(lambda data_path=data_path: [measure_defense(setup, data_path, repeat)])
                if bb_root is not None:
                    measures.append(lambda: [measure_bb_ft(setup, bb_root, args.bb_python, repeat)])
                if "attack" not in args.skip:
                    measures.append(lambda: measure_attack(setup, dataset_path / args.dataset, args.dataset,
                                                           args.attack_images, repeat))
                for measure in measures:
                    for row in measure():
                        log.info("speed: %s", row)
                        rows.append(row)
                    write_csv(csv_path, rows)  # after every measurement: a cut-off run keeps its rows
        finally:
            os.chdir(cwd)
    write_csv(csv_path, rows)
    table = ratio_table(rows)
    print(f"\n{name}, torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_average()}")
    print(f"command: {command}\n")
    print(table)
    print(f"\nwrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
