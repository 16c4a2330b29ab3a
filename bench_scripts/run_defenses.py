"""Run the defense grid on cached attack records: our five tuning modes and, optionally, BackdoorBench's built-ins.

    python -m bench_scripts.run_defenses --protocol cpu --data data/cifar10 [--records badnets_0.01_s0 ...]
        [--methods lp vanilla-ft fe-tuning ft-init fst] [--backdoorbench ~/BackdoorBench
         --bb-defenses ft ft-sam i-bau ... --bb-python BB_VENV/bin/python]

Each defense runs through its BackdoorBench life cycle (the registered class from fst_plugin.plugins) with the
protocol's settings (paper defaults: 2% clean data, 10 epochs, lr 0.01, alpha 0.2, seed 0) and writes
``record/<name>/defense/<method>/`` (defense_result.pt, per-epoch CSV, run_info.json with the wall time). A
finished defense (defense_result.pt present) is skipped unless --force. Numbers for the tables come from
evaluate.py, which re-evaluates every defense_result.pt on the full test sets.

BackdoorBench built-ins (--backdoorbench BB, the list and caps in protocols.BUILTINS) are run by its own scripts
from its root, each in its own process group under a wall-clock cap, with an import hook that lets BackdoorBench
build the cpu protocol's resnet9_cpu (bench_scripts/builtins.py); each writes
``record/<name>/defense/<d>/builtin_run.json`` (ok / failed / exceeded the cap / cannot run, with a one-line
reason), which evaluate.py reads. A built-in with that file is skipped unless --force.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from bench_scripts.builtins import BuiltinRun, link_into, run_builtin
from bench_scripts.common import add_protocol_args, link_data, log_timing, run_defense, start
from bench_scripts.protocols import ALPHA_VARIANTS, BB_METHODS, BUILTIN, METHODS, PAM_VARIANTS, pam_run
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
            elif method in ALPHA_VARIANTS:
                mode, settings = ALPHA_VARIANTS[method]
                result = run_defense(record_dir, mode, protocol, data_root, save_name=method, extra=settings,
                                     seed=seed)
            else:
                result = run_defense(record_dir, method, protocol, data_root, seed=seed)
            log_timing(results, f"defense {method} {record_dir.name}", time.time() - started,
                       defense_wall_s=round(result.wall_time_s, 1))


def run_backdoorbench(records: list[Path], defenses: list[str], bb_root: Path, protocol, data_dir: Path,
                      results: Path, force: bool, python: str, extra_args: Sequence[str] = ()) -> None:
    """BackdoorBench's own defense scripts on our records (bench_scripts/builtins.py), each under its cap."""
    bb_root = bb_root.resolve()
    if not (bb_root / "defense").is_dir():
        raise SystemExit(f"{bb_root} is not a BackdoorBench checkout (no defense/ folder); pass its root")
    unknown = sorted(set(defenses) - set(BUILTIN))
    if unknown:
        raise SystemExit(f"unknown built-ins {unknown}; use some of {', '.join(BUILTIN)} (protocols.BUILTINS)")
    device = "cuda" if protocol.device in ("auto", "cuda") else protocol.device
    for record_dir in records:
        link_into(bb_root, record_dir, data_dir)
        for defense in defenses:
            layout = DefenseLayout.of(record_dir, defense)
            if (layout.finished or BuiltinRun.read(layout.folder)) and not force:
                log.info("done already: %s", layout.folder)
                continue
            layout.result.unlink(missing_ok=True)   # a forced re-run must not count an earlier run's result
            outcome = run_builtin(BUILTIN[defense], record_dir, protocol, bb_root, python, device, extra_args)
            log_timing(results, f"backdoorbench {defense} {record_dir.name}", outcome.wall_s, status=outcome.status,
                       reason=outcome.reason)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--records", nargs="*", help="record names (default: every record of the protocol)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS),
                        help=f"ours: {' '.join(METHODS)}, PAM's {' '.join(PAM_VARIANTS)} and FST with alpha auto "
                             f"({' '.join(ALPHA_VARIANTS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backdoorbench", type=Path, help="a BackdoorBench checkout: also run its built-ins")
    parser.add_argument("--bb-defenses", nargs="*", default=list(BB_METHODS))
    parser.add_argument("--bb-args", default="", help="extra arguments for BackdoorBench's defense scripts, "
                        "e.g. --bb-args='--amp False'")
    parser.add_argument("--bb-python", default=sys.executable,
                        help="the interpreter BackdoorBench runs with (default: this one); it needs BackdoorBench's "
                             "requirements, and imports fst_plugin from this repository")
    parser.add_argument("--force", action="store_true")
    run = start(parser, argv)
    args, protocol, results = run.args, run.protocol, run.results
    data_root = link_data(run.root, args.data)
    records = list_records(run.root, args.records)
    run_ours(records, args.methods, protocol, data_root, results, args.seed, args.force)
    if args.backdoorbench:
        run_backdoorbench(records, args.bb_defenses, args.backdoorbench, protocol, args.data, results, args.force,
                          args.bb_python, shlex.split(args.bb_args))


if __name__ == "__main__":
    main()
