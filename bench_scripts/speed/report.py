"""What ``bench_scripts/speed/run.py`` records and prints: one :class:`Row` per measurement, the CSV, the ratio table,
and the peak-memory and device helpers its measurements share."""
from __future__ import annotations

import csv
import os
import platform
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

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
