"""Run the defense grid on cached attack records: our five tuning modes and, optionally, BackdoorBench's built-ins.

    python -m bench_scripts.run_defenses --protocol cpu --data data/cifar10 [--records badnets_0.01_s0 ...]
        [--methods lp vanilla-ft fe-tuning ft-init fst] [--backdoorbench ~/BackdoorBench --bb-defenses ft ft-sam anp i-bau nad]

Each defense runs through its BackdoorBench life cycle (the registered class from fst_plugin.plugins) with the
protocol's settings (paper defaults: 2% clean data, 10 epochs, lr 0.01, alpha 0.2, seed 0) and writes
``record/<name>/defense/<method>/`` (defense_result.pt, per-epoch CSV, run_info.json with the wall time). A
finished defense (defense_result.pt present) is skipped unless --force. Numbers for the tables come from
evaluate.py, which re-evaluates every defense_result.pt on the full test sets.

BackdoorBench built-ins are run with its own scripts from its root: the record is linked as
``<BB>/record/<name>`` and ``python ./defense/<d>.py --result_file ... --yaml_path
./config/defense/<d>/cifar10.yaml`` is called (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, since its torch.load predates
torch 2.6). They need a model BackdoorBench can build, i.e. the gpu protocol's preactresnet18 (not resnet9_cpu),
and CIFAR-10 under <BB>/data/cifar10.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from bench_scripts.common import DATASET, add_protocol_args, link_data, log_timing, run_defense, start
from bench_scripts.protocols import BB_METHODS, METHODS, PAM_VARIANTS, pam_run
from fst_plugin.record.layout import DefenseLayout

log = logging.getLogger("bench.run_defenses")


def list_records(root: Path, names: list[str] | None) -> list[Path]:
    folder = root / "record"
    records = [folder / n for n in names] if names else sorted(p for p in folder.glob("*") if p.is_dir())
    missing = [r for r in records if not (r / "attack_result.pt").is_file()]
    if missing:
        raise SystemExit(f"no finished attack record at {', '.join(map(str, missing))}; run make_records first")
    return records


def run_ours(records: list[Path], methods: list[str], protocol, data_root: Path, results: Path, seed: int,
             force: bool) -> None:
    for record_dir in records:
        for method in methods:
            layout = DefenseLayout.of(record_dir, method)
            if layout.finished and not force:
                log.info("done already: %s", layout.result)
                continue
            started = time.time()
            if method in PAM_VARIANTS:
                mode, settings = pam_run(method, protocol)
                result = run_defense(record_dir, mode, protocol, data_root, save_name=method, extra=settings,
                                     seed=seed)
            else:
                result = run_defense(record_dir, method, protocol, data_root, seed=seed)
            log_timing(results, f"defense {method} {record_dir.name}", time.time() - started,
                       defense_wall_s=round(result.wall_time_s, 1))


def run_backdoorbench(records: list[Path], defenses: list[str], bb_root: Path, protocol, results: Path,
                      force: bool, extra_args: Sequence[str] = ()) -> None:
    """BackdoorBench's own defense scripts on our records (see the module docstring for the requirements)."""
    bb_root = bb_root.resolve()
    if not (bb_root / "defense").is_dir():
        raise SystemExit(f"{bb_root} is not a BackdoorBench checkout (no defense/ folder)")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    device = "cuda" if protocol.device in ("auto", "cuda") else protocol.device
    for record_dir in records:
        # the record's bd_train/bd_test PNG folders are stored as ./record/<name>/..., relative to BackdoorBench's
        # root, so the link must carry the record's own name
        name = record_dir.name
        link = bb_root / "record" / name
        link.parent.mkdir(exist_ok=True)
        if not link.exists():
            link.symlink_to(record_dir.resolve(), target_is_directory=True)
        elif link.resolve() != record_dir.resolve():
            raise SystemExit(f"{link} exists and is not this record ({record_dir}); move it away or run the other "
                             "protocol's records from another BackdoorBench checkout")
        for defense in defenses:
            if DefenseLayout.of(record_dir, defense).finished and not force:
                continue
            cmd = [sys.executable, f"./defense/{defense}.py", "--result_file", name, "--dataset", DATASET,
                   "--yaml_path", f"./config/defense/{defense}/{DATASET}.yaml", "--device", device,
                   "--num_workers", str(protocol.num_workers), *extra_args]
            log.info("BackdoorBench: %s", " ".join(cmd))
            started = time.time()
            subprocess.run(cmd, cwd=bb_root, env=env, check=True)
            log_timing(results, f"backdoorbench {defense} {record_dir.name}", time.time() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--records", nargs="*", help="record names (default: every record of the protocol)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS),
                        help=f"ours: {' '.join(METHODS)}, and PAM's {' '.join(PAM_VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backdoorbench", type=Path, help="a BackdoorBench checkout: also run its built-ins")
    parser.add_argument("--bb-defenses", nargs="*", default=list(BB_METHODS))
    parser.add_argument("--bb-args", default="", help="extra arguments for BackdoorBench's defense scripts, "
                        "e.g. --bb-args='--epochs 1 --amp True'")
    parser.add_argument("--force", action="store_true")
    run = start(parser, argv)
    args, protocol, results = run.args, run.protocol, run.results
    data_root = link_data(run.root, args.data)
    records = list_records(run.root, args.records)
    run_ours(records, args.methods, protocol, data_root, results, args.seed, args.force)
    if args.backdoorbench:
        run_backdoorbench(records, args.bb_defenses, args.backdoorbench, protocol, results, args.force,
                          shlex.split(args.bb_args))


if __name__ == "__main__":
    main()
