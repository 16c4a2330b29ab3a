"""The whole benchmark grid as one graph of jobs, on this machine or on a Ray cluster (issue 28).

    python -m bench_scripts.grid --protocol cpu --data data/cifar10 [--attacks badnets:0.01 ...]
        [--methods lp vanilla-ft fe-tuning ft-init fst] [--backdoorbench BB [--bb-defenses ...]]
        [--retune] [--qra [--qra-max-asr 0.1]] [--jobs N | --executor ray --address HOST:PORT] [--force]

Make each record (attack x rate) -> run each defense on it (ours, and BackdoorBench's built-ins with
--backdoorbench) -> with --retune, the retuning attack on every model (and a clean reference record, rate 0, made
for it); with --qra, QRA on every retuned model (purified to --qra-max-asr, when given) -> results.csv (the one
evaluator) -> table.md. Each job is what the step-by-step scripts run (make_records, run_defenses, evaluate,
make_table), writes only its own outputs, and is skipped when they exist, so a re-run continues. A failed job is
one line on stderr, the jobs that need it are not run, the others finish, and the command exits 2. While it runs,
``<cache>/<protocol>/grid/report.md`` says what is done and where each job ran; each job's log is beside it in
``logs/``. On a cluster, the cache, the results and the data must be on storage every node mounts at the same
path (checked at the start): docs/cluster.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench_scripts.common import BenchRun, add_protocol_args, link_data, start
from bench_scripts.defenses.run import builtin_jobs, defense_jobs
from bench_scripts.evaluation.evaluate import WriteResults, probing_of
from bench_scripts.evaluation.per_model import QraModel, RetuneModel
from bench_scripts.jobs.cli import add_executor_arguments, run_jobs
from bench_scripts.jobs.graph import Graph, Report
from bench_scripts.jobs.job import Job, Resources
from bench_scripts.protocols import ALPHA_VARIANTS, BB_METHODS, METHODS, PAM_VARIANTS, QRA_MAX_ASR
from bench_scripts.records.make import MakeRecord, Resumable, parse_grid
from bench_scripts.report.make_table import WriteTable
from fst_plugin.probes.config import CLEAN_REFERENCE, NO_DEFENSE

REFERENCE = ("badnets", 0.0)   # the clean reference record (rate 0) that retune and QRA compare against


def _probe_jobs(args: argparse.Namespace, run: BenchRun, records: list[MakeRecord], reference: MakeRecord,
                variants: list[str], jobs: list[Job]) -> list[Job]:
    """The retuning attack on every model of every record (then QRA with --qra), each after its model's job."""
    protocol = run.protocol
    made = {job.name for job in jobs}
    probing = probing_of(protocol, run.root / "data", run.results)
    out: list[Job] = []
    for record in records:
        for variant in [NO_DEFENSE, *variants, CLEAN_REFERENCE]:
            model = f"{record.name}/{variant}"
            needs = {NO_DEFENSE: (record.name,), CLEAN_REFERENCE: (record.name, reference.name)}.get(
                variant, (model,) if model in made else (record.name,))
            ref = reference.record_dir if variant == CLEAN_REFERENCE else None
            out.append(RetuneModel(record.record_dir, variant, probing, ref).job(protocol.resources, needs))
            if args.qra and variant != CLEAN_REFERENCE:
                qra = QraModel(record.record_dir, variant, probing, reference.record_dir, args.data, args.qra_max_asr)
                out.append(qra.job(protocol.resources, (out[-1].name, reference.name)))
    return out


def build_grid(args: argparse.Namespace, run: BenchRun) -> Graph:
    """The grid's graph from the command line (see the module's docstring)."""
    protocol, root, results = run.protocol, run.root, run.results
    data_root = link_data(root, args.data)
    resumable = Resumable(args.checkpoint_every)
    records = [MakeRecord(protocol, args.data, root, attack, rate, args.seed, args.blend_pattern, args.force,
                          results, resumable)
               for attack, rate in dict.fromkeys(parse_grid(args.attacks, protocol.grid))]
    probes = args.retune or args.qra
    reference = MakeRecord(protocol, args.data, root, *REFERENCE, args.seed, None, args.force, results, resumable)
    jobs = [r.job() for r in records] + ([reference.job()] if probes else [])

    def own(record_dir: Path) -> tuple[str, ...]:
        return (record_dir.name,)

    dirs = [r.record_dir for r in records]
    jobs += defense_jobs(dirs, args.methods, protocol, data_root, results, args.seed, needs=own)
    variants = list(args.methods)
    if args.backdoorbench:
        jobs += builtin_jobs(dirs, args.bb_defenses, args.backdoorbench, protocol, args.data, results, args.bb_python,
                             shlex.split(args.bb_args), needs=own)
        variants += args.bb_defenses
    if probes:
        jobs += _probe_jobs(args, run, records, reference, variants, jobs)
    write = WriteResults(protocol, root, args.data, results / "results.csv", tuple(r.name for r in records))
    jobs.append(Job("results.csv", "results", write, outputs=(write.out,), after=tuple(j.name for j in jobs),
                    resources=protocol.resources, always=True))
    jobs.append(Job("table.md", "table", WriteTable(protocol, root, results, args.results),
                    outputs=(results / "table.md",), needs=("results.csv",), resources=Resources(1), always=True))
    return Graph(jobs)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--attacks", nargs="*", help="attack:rate items (default: the protocol's grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blend-pattern", help="image file used as Blended's key (default: seeded noise)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="EPOCHS",
                        help="save each record's training state every EPOCHS epochs; a re-run (or a retry on another "
                             "node) resumes from it (0: never)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS),
                        help=f"ours: {' '.join(METHODS)}, PAM's {' '.join(PAM_VARIANTS)} and FST with its alpha "
                             f"chosen per model ({' '.join(ALPHA_VARIANTS)})")
    parser.add_argument("--backdoorbench", type=Path, help="a BackdoorBench checkout: also run its built-ins")
    parser.add_argument("--bb-defenses", nargs="*", default=list(BB_METHODS))
    parser.add_argument("--bb-args", default="", help="extra arguments for BackdoorBench's defense scripts")
    parser.add_argument("--bb-python", default=sys.executable, help="the interpreter BackdoorBench runs with")
    parser.add_argument("--retune", action="store_true", help="the retuning attack on every model")
    parser.add_argument("--qra", action="store_true", help="QRA on every retuned model (implies --retune)")
    parser.add_argument("--qra-max-asr", type=float, metavar="FRACTION",
                        help=f"QRA only on models purified to this ASR (the grids use {QRA_MAX_ASR:g})")
    parser.add_argument("--force", action="store_true", help="redo every job, finished or not")
    add_executor_arguments(parser)
    run = start(parser, argv)
    if run.args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every must be at least 0, got {run.args.checkpoint_every}")
    return run_jobs(build_grid(run.args, run), run.args, run.root, force=run.args.force)


if __name__ == "__main__":
    main()
