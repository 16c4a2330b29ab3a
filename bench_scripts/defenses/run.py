"""Run the defense grid on cached attack records: our five tuning modes and, optionally, BackdoorBench's built-ins.

    python -m bench_scripts.defenses --protocol cpu --data data/cifar10 [--records badnets_0.01_s0 ...]
        [--methods lp vanilla-ft fe-tuning ft-init fst] [--backdoorbench ~/BackdoorBench
         --bb-defenses ft ft-sam i-bau ... --bb-python BB_VENV/bin/python]

Each defense runs through its BackdoorBench life cycle (the registered class from fst_plugin.plugins) with the
protocol's settings (paper defaults: 2% clean data, 10 epochs, lr 0.01, alpha 0.2, seed 0) and writes
``record/<name>/defense/<method>/`` (defense_result.pt, per-epoch CSV, run_info.json with the wall time). A
finished defense (defense_result.pt present) is skipped unless --force. Numbers for the tables come from
evaluate.py, which re-evaluates every defense_result.pt on the full test sets.

BackdoorBench built-ins (--backdoorbench BB, the list and caps in protocols.BUILTINS) are run by its own scripts
from its root, each in its own process group under a wall-clock cap, with an import hook that lets BackdoorBench
build the cpu protocol's resnet9_cpu (bench_scripts/defenses/builtins.py); each writes
``record/<name>/defense/<d>/builtin_run.json`` (ok / failed / exceeded the cap / cannot run, with a one-line
reason), which evaluate.py reads. A built-in with that file is skipped unless --force.

Each defense and built-in is a job of the grid (bench_scripts/jobs): ``--jobs N`` runs N side by side, ``--executor
ray --address HOST:PORT`` on a Ray cluster (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench_scripts.common import add_protocol_args, link_data, log_timing, run_defense, start
from bench_scripts.defenses.builtins import OK, RUN_FILE, link_into, run_builtin
from bench_scripts.jobs.cli import add_executor_arguments, run_jobs
from bench_scripts.jobs.graph import Graph
from bench_scripts.jobs.job import Job
from bench_scripts.protocols import (
    ALPHA_VARIANTS,
    BB_METHODS,
    BUILTIN,
    METHODS,
    PAM_VARIANTS,
    BuiltIn,
    Protocol,
    pam_run,
)
from fst_plugin.record.layout import DefenseLayout, attack_result, is_finished, records_dir

log = logging.getLogger("bench.run_defenses")


def list_records(root: Path, names: list[str] | None) -> list[Path]:
    folder = records_dir(root)
    records = [folder / n for n in names] if names else sorted(p for p in folder.glob("*") if p.is_dir())
    missing = [r for r in records if not is_finished(r)]
    if missing:
        raise SystemExit(f"no finished attack record at {', '.join(map(str, missing))}; run make_records first")
    return records


@dataclass(frozen=True)
class RunDefense:
    """One of our defenses on one record, as a job's work: a mode, a PAM variant (``protocols.pam_run``), FST with
    alpha auto (``protocols.ALPHA_VARIANTS``) or an ablation's variant (``method`` runs, saved as ``variant``, with ``extra`` settings); its wall time goes to
    ``results/timings.jsonl`` as ``<step> <variant> <record>``."""

    record_dir: Path
    variant: str
    protocol: Protocol
    data_root: Path
    results: Path
    seed: int = 0
    method: Optional[str] = None
    extra: dict = field(default_factory=dict)
    eval_subset: Optional[int] = None
    step: str = "defense"

    def __call__(self) -> str:
        started = time.time()
        if self.method is None and self.variant in PAM_VARIANTS:
            mode, settings = pam_run(self.variant, self.protocol)
        elif self.method is None and self.variant in ALPHA_VARIANTS:
            mode, settings = ALPHA_VARIANTS[self.variant]
        else:
            mode, settings = self.method or self.variant, self.extra
        result = run_defense(self.record_dir, mode, self.protocol, self.data_root,
                             save_name=None if mode == self.variant else self.variant, extra=settings, seed=self.seed,
                             eval_subset=self.eval_subset)
        log_timing(self.results, f"{self.step} {self.variant} {self.record_dir.name}", time.time() - started,
                   defense_wall_s=round(result.wall_time_s, 1))
        return ""

    def job(self, needs: tuple[str, ...] = ()) -> Job:
        """Finished when its ``defense_result.pt`` exists (written last)."""
        layout = DefenseLayout.of(self.record_dir, self.variant, self.method)
        return Job(f"{self.record_dir.name}/{self.variant}", "defense", self,
                   inputs=(attack_result(self.record_dir),), outputs=(layout.result,), needs=needs,
                   resources=self.protocol.resources)


@dataclass(frozen=True)
class RunBuiltin:
    """One of BackdoorBench's built-ins on one record, as a job's work (bench_scripts/defenses/builtins.py): its outcome
    (ok, failed, exceeded the cap, cannot run) is written to ``builtin_run.json`` and is the job's note; only a
    problem of this runner fails the job."""

    builtin: BuiltIn
    record_dir: Path
    protocol: Protocol
    bb_root: Path
    data_dir: Path
    python: str
    results: Path
    extra_args: tuple[str, ...] = ()

    def __call__(self) -> str:
        link_into(self.bb_root, self.record_dir, self.data_dir)
        DefenseLayout.of(self.record_dir, self.builtin.name).result.unlink(missing_ok=True)  # not an earlier run's
        device = "cuda" if self.protocol.device in ("auto", "cuda") else self.protocol.device
        outcome = run_builtin(self.builtin, self.record_dir, self.protocol, self.bb_root, self.python, device,
                              self.extra_args)
        log_timing(self.results, f"backdoorbench {self.builtin.name} {self.record_dir.name}", outcome.wall_s,
                   status=outcome.status, reason=outcome.reason)
        return "" if outcome.status == OK else f"{outcome.status}: {outcome.reason}"

    def job(self, needs: tuple[str, ...] = ()) -> Job:
        """Finished when its ``builtin_run.json`` exists (whatever the built-in's outcome)."""
        folder = DefenseLayout.of(self.record_dir, self.builtin.name).folder
        return Job(f"{self.record_dir.name}/{self.builtin.name}", "builtin", self,
                   inputs=(attack_result(self.record_dir), self.bb_root / "defense"),
                   outputs=(folder / RUN_FILE,), needs=needs, resources=self.protocol.resources)


def defense_jobs(records: list[Path], methods: list[str], protocol: Protocol, data_root: Path, results: Path,
                 seed: int, needs: Callable[[Path], tuple[str, ...]] = lambda record: ()) -> list[Job]:
    """Our defenses (``methods``: modes and PAM variants) on every record; ``needs``: a record's own job."""
    return [RunDefense(record, method, protocol, data_root, results, seed).job(needs(record))
            for record in records for method in methods]


def builtin_jobs(records: list[Path], defenses: list[str], bb_root: Path, protocol: Protocol, data_dir: Path,
                 results: Path, python: str, extra_args: Sequence[str] = (),
                 needs: Callable[[Path], tuple[str, ...]] = lambda record: ()) -> list[Job]:
    """BackdoorBench's built-ins on every record, from the checkout ``bb_root`` (checked here, before any job)."""
    bb_root = bb_root.resolve()
    if not (bb_root / "defense").is_dir():
        raise SystemExit(f"{bb_root} is not a BackdoorBench checkout (no defense/ folder); pass its root")
    unknown = sorted(set(defenses) - set(BUILTIN))
    if unknown:
        raise SystemExit(f"unknown built-ins {unknown}; use some of {', '.join(BUILTIN)} (protocols.BUILTINS)")
    return [RunBuiltin(BUILTIN[d], record, protocol, bb_root, data_dir, python, results, tuple(extra_args))
            .job(needs(record)) for record in records for d in defenses]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--records", nargs="*", help="record names (default: every record of the protocol)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS),
                        help=f"ours: {' '.join(METHODS)}, PAM's {' '.join(PAM_VARIANTS)} and FST with its alpha "
                             f"chosen per model ({' '.join(ALPHA_VARIANTS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backdoorbench", type=Path, help="a BackdoorBench checkout: also run its built-ins")
    parser.add_argument("--bb-defenses", nargs="*", default=list(BB_METHODS))
    parser.add_argument("--bb-args", default="", help="extra arguments for BackdoorBench's defense scripts, "
                        "e.g. --bb-args='--amp False'")
    parser.add_argument("--bb-python", default=sys.executable,
                        help="the interpreter BackdoorBench runs with (default: this one); it needs BackdoorBench's "
                             "requirements, and imports fst_plugin from this repository")
    parser.add_argument("--force", action="store_true")
    add_executor_arguments(parser, "defenses side by side, each in its own process with its share of the cores")
    run = start(parser, argv)
    args, protocol, results = run.args, run.protocol, run.results
    data_root = link_data(run.root, args.data)
    records = list_records(run.root, args.records)
    jobs = defense_jobs(records, args.methods, protocol, data_root, results, args.seed)
    if args.backdoorbench:
        jobs += builtin_jobs(records, args.bb_defenses, args.backdoorbench, protocol, args.data, results,
                             args.bb_python, shlex.split(args.bb_args))
    run_jobs(Graph(jobs), args, run.root, force=args.force)


if __name__ == "__main__":
    main()
