"""What every benchmark script shares: its command line (protocol, cache, results), triggers by name, the cache
layout, timings, running one of the package's defenses (with the optional per-epoch test subset) and loading a
result as a model. Measuring models is bench_scripts/evaluation/measures.py.

Cache layout (outside git): ``<cache>/<protocol>/record/<attack>[-<key>]_<rate>_s<seed>/`` are BackdoorBench records
(``attack_result.pt`` + PNGs, ``defense/<name>/defense_result.pt`` after the defenses), and
``<cache>/<protocol>/data/cifar10`` is a link to the user's data folder, so the records' relative
``./data/cifar10`` and ``./record/...`` paths resolve from ``<cache>/<protocol>`` as from a BackdoorBench root.
``<protocol>`` is the protocol's ``cache_folder``: its name, with the record-defining fields that ``--set`` or
``--epochs`` changed (``cpu+model=resnet18``), so another model's records never mix with the protocol's own.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from fst_plugin.attacks import (
    Trigger,
    badnets_trigger,
    blend_pattern,
    blended_trigger,
    sig_trigger,
    wanet_trigger,
)
from fst_plugin import api
from fst_plugin.defense.runner import DefenseResult
from fst_plugin.errors import FSTError
from fst_plugin.record import AttackRecord
from fst_plugin.record.result_model import load_result_model, model_from_state

from bench_scripts.jobs.process import COMMAND_ENV, command_line, share_of_cores, use_threads
from bench_scripts.protocols import Protocol, get_protocol, parse_overrides
from fst_plugin.record.layout import record_dir

log = logging.getLogger("bench")
DATASET = "cifar10"
TARGET = 0
ATTACKS = ("badnets", "blended", "sig", "wanet")
CLEAN_LABEL = {"sig"}                       # poison target-class images and keep their labels
KEYED_ATTACKS = {"blended"}                 # a key image (--blend-pattern) or, without one, seeded noise
REPO = Path(__file__).resolve().parent.parent


def setup(threads: Optional[int] = None) -> None:
    """Logging, and torch threads: ``threads``, else this process's share of the cores (jobs.process owns the
    rule: OMP_NUM_THREADS where set, else every core this process may use)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    use_threads(threads or share_of_cores())


def add_protocol_args(parser: argparse.ArgumentParser, data: bool = True, results: bool = True) -> None:
    """The arguments every bench script shares: ``--protocol NAME``, ``--set KEY=VALUE ...`` (overrides of
    protocol fields, e.g. to try the gpu protocol on a tiny subset on a CPU: ``--set device=cpu epochs=1
    train_per_class=20 test_per_class=5``), ``--data`` (when the script reads images), ``--cache`` and
    ``--results`` (when the script writes results)."""
    parser.add_argument("--protocol", default="cpu", help="cpu, gpu or tiny (bench_scripts/protocols.py)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override protocol fields (values parsed as YAML)")
    if data:
        parser.add_argument("--data", type=Path, required=True,
                            help="CIFAR-10 folder (cifar-10-batches-py or train/ test/)")
    parser.add_argument("--cache", type=Path, default=REPO / "bench_cache", help="where records are kept (not in git)")
    if results:
        parser.add_argument("--results", type=Path, help="where results go (default bench_results/<protocol>)")


def protocol_from_args(args: argparse.Namespace, **more: Any) -> Protocol:
    """The protocol named by ``--protocol``, with ``--set`` overrides, then ``more`` (non-None values)."""
    overrides = parse_overrides(args.overrides)
    overrides.update({k: v for k, v in more.items() if v is not None})
    return get_protocol(args.protocol, **overrides)


@dataclass(frozen=True)
class BenchRun:
    """A script's command line, resolved: the parsed flags, the protocol, its cache folder and its results."""

    args: argparse.Namespace
    protocol: Protocol
    root: Path      # <cache>/<protocol.cache_folder>: record/ and data/ as below a BackdoorBench root
    results: Path   # --results, else bench_results/<protocol>

    def record_dir(self, name: str) -> Path:
        return record_dir(self.root, name)


def start(parser: argparse.ArgumentParser, argv: Optional[list[str]], protocol_flags: tuple[str, ...] = ()) -> BenchRun:
    """Parse ``argv``, set up logging and threads, and resolve the protocol; ``protocol_flags`` name parsed flags
    that, when given, override the protocol field of the same name (``--epochs``)."""
    args = parser.parse_args(argv)
    setup()
    protocol = protocol_from_args(args, **{flag: getattr(args, flag) for flag in protocol_flags})
    results = getattr(args, "results", None) or REPO / "bench_results" / protocol.name
    return BenchRun(args, protocol, Path(args.cache) / protocol.cache_folder, results)


def record_name(attack: str, rate: float, seed: int, key: Optional[str] = None) -> str:
    """``<attack>_<rate>_s<seed>``; a Blended record keyed by an image file is ``blended-<file stem>_...`` so it
    never collides with (or is served from the cache of) the seeded-noise record."""
    return f"{attack}{'-' + key if key else ''}_{rate:g}_s{seed}"


def trigger_key(attack: str, pattern_image: Optional[str]) -> Optional[str]:
    """The name of Blended's key image when one is given (its file stem), else None (seeded noise / no key)."""
    return Path(pattern_image).stem if attack in KEYED_ATTACKS and pattern_image else None


def link_data(root: Path, data_dir: Path) -> Path:
    """``root/data/cifar10`` → the user's data folder (whatever it is called); returns ``root/data``."""
    link = root / "data" / DATASET
    link.parent.mkdir(parents=True, exist_ok=True)
    target = Path(data_dir).resolve()
    if link.is_symlink() and link.resolve() != target:
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    return link.parent


def make_trigger(attack: str, seed: int, pattern_image: Optional[str] = None, blend_alpha: float = 0.2) -> Trigger:
    """The attack's trigger; Blended's key image and WaNet's warp are drawn from ``seed``."""
    if attack == "badnets":
        return badnets_trigger(3)
    if attack == "blended":
        return blended_trigger(blend_pattern(32, 32, 3, seed=seed, image_path=pattern_image), blend_alpha)
    if attack == "sig":
        return sig_trigger(40.0, 6.0)
    if attack == "wanet":
        return wanet_trigger(32, 32, k=4, strength=0.5, seed=seed)
    raise FSTError(f"unknown attack {attack!r}", f"use one of {', '.join(ATTACKS)}")


def bench_info(record: AttackRecord) -> dict[str, Any]:
    """The benchmark's own metadata stored in the record (attack, rate, seed, test indices, timings)."""
    return json.loads(record.extra.get("bench_json", "{}"))


def log_timing(results_dir: Path, step: str, wall_s: float, **details: Any) -> None:
    """Append one line to ``results_dir/timings.jsonl``: the step, its wall time and the exact command (the
    grid's, where a job of it runs in a worker)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    row = {"step": step, "wall_s": round(wall_s, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": os.environ.get(COMMAND_ENV) or command_line(), **details}
    with open(results_dir / "timings.jsonl", "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


# ----- running the package's defenses -----------------------------------------------------------------
def run_defense(record_dir: Path, method: str, protocol: Any, data_root: Path, save_name: Optional[str] = None,
                extra: Optional[dict[str, Any]] = None, seed: int = 0,
                eval_subset: Optional[int] = None) -> DefenseResult:
    """Run one defense on one record with the protocol's settings (``extra``: more config overrides).

    ``save_name`` writes to ``defense/<save_name>/`` (ablation variants must not overwrite the grid's results);
    ``eval_subset`` (default: the protocol's) computes the per-epoch curve on a seeded subset of the clean and
    poisoned test sets (that evaluation otherwise dominates CPU time; final numbers come from evaluate.py on the
    full sets)."""
    overrides: dict[str, Any] = dict(
        dataset_path=str(data_root), dataset=DATASET, device=protocol.device, num_workers=protocol.num_workers,
        epochs=protocol.defense_epochs, ratio=protocol.defense_ratio, lr=protocol.defense_lr,
        batch_size=protocol.defense_batch_size, random_seed=seed, amp=protocol.amp, save_name=save_name,
        eval_subset=eval_subset or protocol.eval_subset)
    if method == "fst":
        overrides["alpha"] = protocol.alpha
    return api.run_defense(method, record_dir, **{**overrides, **(extra or {})})


# ----- evaluation helpers ----------------------------------------------------------------------------
def load_model(model_name: str, num_classes: int, state_dict: dict) -> nn.Module:
    """A record's weights as an eval-mode model (the package's one reader: record.result_model)."""
    return model_from_state(state_dict, model_name, num_classes).model.eval()


def load_defended(path: Path) -> nn.Module:
    """A ``defense_result.pt`` (anyone's: ours or BackdoorBench's built-ins) as an eval-mode model."""
    return load_result_model(path, "defense result").model.eval()
