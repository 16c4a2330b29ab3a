"""BackdoorBench's built-in defenses on the bench's records, run by BackdoorBench's own scripts from its checkout.

For each record and built-in (protocols.BUILTINS): the record is linked as ``<BB>/record/<name>`` (its PNG
paths are relative to BackdoorBench's root) and ``<BB>/data/cifar10`` to the data, then ``python
./defense/<d>.py --result_file <name> --yaml_path ./config/defense/<d>/cifar10.yaml --model <record's model>
--ratio <protocol's> [--epochs N ...]`` runs in its own process group from BackdoorBench's root, killed past
its wall-clock cap (``jobs.process.run_command``, which kills every job's programs the same way). ``bb_hook/sitecustomize.py`` is first on that process's PYTHONPATH (then this repository,
so it imports fst_plugin): it lets BackdoorBench build the package's CPU models (``resnet9_cpu``). A built-in
tied to other architectures, or to CUDA on a CPU run, is not started. Every outcome lands in
``defense/<d>/builtin_run.json`` (status, one-line reason, wall time, cap, command), which evaluate.py turns
into the results' rows; the script's output goes to ``defense/<d>/builtin_log.txt``. BackdoorBench's files are
never copied or edited.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml

from bench_scripts.common import DATASET, REPO
from bench_scripts.compat.matrix import failure_reason
from bench_scripts.jobs.process import run_command
from bench_scripts.protocols import BuiltIn, Protocol
from fst_plugin.models.factory import OWN_CPU_MODELS
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import DefenseLayout, records_dir

log = logging.getLogger("bench.builtins")
HOOK = Path(__file__).resolve().parent / "bb_hook"
RUN_FILE, LOG_FILE = "builtin_run.json", "builtin_log.txt"
OK, FAILED, EXCEEDED, CANNOT = "ok", "failed", "exceeded the cap", "cannot run"


@dataclass(frozen=True)
class BuiltinRun:
    """What became of one built-in on one record; ``reason`` is one line (empty when it ran)."""

    defense: str
    status: str
    reason: str = ""
    wall_s: float = 0.0
    cap_s: float = 0.0
    command: str = ""

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Optional["BuiltinRun"]:
        path = folder / RUN_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def cap_seconds(builtin: BuiltIn, protocol: Protocol) -> float:
    """The protocol's one cap for every built-in (the campaign's), else the built-in's own CPU cap."""
    return float(protocol.bb_cap_s) if protocol.bb_cap_s is not None else 60.0 * builtin.cpu_cap_min


def link_into(bb_root: Path, record_dir: Path, data_dir: Path) -> None:
    """``<BB>/record/<name>`` → the record and ``<BB>/data/cifar10`` → the data (each left alone when it already
    points there; another target is refused rather than replaced)."""
    for link, target in ((records_dir(bb_root) / record_dir.name, record_dir), (bb_root / "data" / DATASET, data_dir)):
        link.parent.mkdir(exist_ok=True)
        if not link.exists() and not link.is_symlink():
            try:
                link.symlink_to(target.resolve(), target_is_directory=True)
            except FileExistsError:   # another job of the grid linked it first
                pass
        if link.resolve() != target.resolve():
            raise SystemExit(f"{link} exists and is not {target}; move it away or use another BackdoorBench checkout")


def yaml_path(builtin: BuiltIn) -> str:
    """BackdoorBench's CIFAR-10 settings of ``builtin``, relative to its root."""
    return f"config/defense/{builtin.name}/{DATASET}.yaml"


def command(builtin: BuiltIn, record: str, model: str, protocol: Protocol, bb_root: Path, python: str,
            device: str, extra: Sequence[str] = ()) -> list[str]:
    """BackdoorBench's command line for ``builtin``: its yaml, the record's model, the protocol's clean ratio, and
    the yaml's length settings capped at the protocol's ``bb_epochs`` (never raised)."""
    settings = yaml.safe_load((bb_root / yaml_path(builtin)).read_text()) or {}
    argv = [python, f"./defense/{builtin.name}.py", "--result_file", record, "--dataset", DATASET,
            "--yaml_path", f"./{yaml_path(builtin)}", "--model", model, "--device", device,
            "--num_workers", str(protocol.num_workers)]
    if builtin.ratio:
        argv += ["--ratio", f"{protocol.defense_ratio:g}"]
    for key in builtin.lengths if protocol.bb_epochs is not None else ():
        if key in settings and int(settings[key]) > protocol.bb_epochs:
            argv += [f"--{key}", str(protocol.bb_epochs)]
    return [*argv, *extra]


def hook_environment() -> dict[str, str]:
    """The environment of a BackdoorBench process: the hook first on PYTHONPATH, then this repository."""
    path = os.pathsep.join(filter(None, (str(HOOK), str(REPO), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path, "FST_BB_MODELS": ",".join(OWN_CPU_MODELS),
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # its torch.load predates torch 2.6's weights_only default


def run_builtin(builtin: BuiltIn, record_dir: Path, protocol: Protocol, bb_root: Path, python: str,
                device: str, extra: Sequence[str] = ()) -> BuiltinRun:
    """One built-in on one record; its outcome is written to ``defense/<d>/builtin_run.json`` and returned."""
    folder = DefenseLayout.of(record_dir, builtin.name).folder
    (folder / LOG_FILE).unlink(missing_ok=True)   # an earlier run's output must not pass for this one's
    model = load_attack_record(record_dir, check_files=False).model_name
    cap = cap_seconds(builtin, protocol)
    why_not = (f"{model}: {builtin.bound_by}" if builtin.models is not None and model not in builtin.models else
               f"on {device}: {builtin.cuda_only}" if builtin.cuda_only and not device.startswith("cuda") else "")
    missing = [p for p in (f"defense/{builtin.name}.py", yaml_path(builtin)) if not (bb_root / p).is_file()]
    if why_not or missing:
        status, reason = (CANNOT, why_not) if why_not else (FAILED, f"this checkout has no {' or '.join(missing)}")
        log.info("BackdoorBench %s on %s not started: %s", builtin.name, record_dir.name, reason)
        outcome = BuiltinRun(builtin.name, status, reason, cap_s=cap)
        outcome.write(folder)
        return outcome
    argv = command(builtin, record_dir.name, model, protocol, bb_root, python, device, extra)
    shown = " ".join(["python", *argv[1:]])
    folder.mkdir(parents=True, exist_ok=True)
    log.info("BackdoorBench %s on %s (cap %.0f s): %s", builtin.name, record_dir.name, cap, shown)
    started = time.time()
    code = run_command(argv, folder / LOG_FILE, bb_root, hook_environment(), timeout_s=cap)
    wall = round(time.time() - started, 1)
    produced = DefenseLayout.of(record_dir, builtin.name).finished
    if code is None:
        status, reason = EXCEEDED, f"exceeded the {f'{cap / 60:g}-min' if cap % 60 == 0 else f'{cap:g}-s'} cap"
    elif code == 0 and produced:
        status, reason = OK, ""
    else:
        output = (folder / LOG_FILE).read_text(errors="replace")
        status = FAILED
        reason = failure_reason(output, bb_root, code) if code else "exit 0 without writing defense_result.pt"
    outcome = BuiltinRun(builtin.name, status, reason, wall, cap, shown)
    outcome.write(folder)
    log.info("BackdoorBench %s on %s after %.0f s: %s", builtin.name, record_dir.name, wall, reason or status)
    return outcome
