"""The flags every command that runs jobs shares, and running a graph from them: ``--jobs N`` (local workers),
``--executor local|ray`` and ``--address HOST:PORT`` (the Ray cluster's head). Each failed job is one line on
stderr and the command exits 2 after the others finished; the report and each job's log go under ``<cache>/grid/``
(shared storage on a cluster), where ``report.md`` says while the grid runs what is done and where it ran."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Union

from bench_scripts.jobs.cluster import RayExecutor
from bench_scripts.jobs.graph import Graph, Report, run_graph
from bench_scripts.jobs.local import LocalExecutor
from bench_scripts.jobs.process import WorkerContext, command_line
from fst_plugin.errors import FSTError


def add_executor_arguments(parser: argparse.ArgumentParser, jobs_help: str = "jobs side by side on this machine, "
                           "each in its own worker process with its share of the cores (one GPU each when several "
                           "are visible)") -> None:
    parser.add_argument("--jobs", type=int, default=1, help=jobs_help)
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: this machine (default); ray: the Ray cluster at --address (docs/cluster.md)")
    parser.add_argument("--address", help="the Ray cluster's head, HOST:PORT (default: $RAY_ADDRESS)")


def grid_folder(cache_root: Path) -> Path:
    """Where a run's report and job logs go: beside the records, on the storage every node sees."""
    return cache_root / "grid"


@contextlib.contextmanager
def open_executor(args: argparse.Namespace, cache_root: Path) -> Iterator[Union[LocalExecutor, RayExecutor]]:
    """The executor the flags name, closed on the way out."""
    if args.jobs < 1:
        raise FSTError(f"--jobs must be at least 1, got {args.jobs}", "pass --jobs 1 or more")
    context = WorkerContext(grid_folder(cache_root) / "logs", command_line())
    if args.executor == "ray":
        address = args.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise FSTError("--executor ray needs the cluster's address", "pass --address HOST:PORT of its head "
                           "(ray start --head prints it) or set RAY_ADDRESS")
        executor: Union[LocalExecutor, RayExecutor] = RayExecutor(address, cache_root, context)
    else:
        executor = LocalExecutor(args.jobs, context)
    with executor:
        yield executor


def run_jobs(graph: Graph, args: argparse.Namespace, cache_root: Path, force: bool = False) -> Report:
    """Run ``graph`` on the executor the flags name; one line per failed job on stderr, then exit 2 if any failed."""
    try:
        with open_executor(args, cache_root) as executor:
            report = run_graph(graph, executor, force, report=grid_folder(cache_root) / "report.md")
    except FSTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for outcome in report.failures:
        print(f"error: {outcome.job}: {outcome.note}", file=sys.stderr)
    if report.failures:
        raise SystemExit(2)
    return report
