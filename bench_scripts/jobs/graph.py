"""The grid as a graph of jobs, run on any executor, and the report of what became of each job.

``run_graph`` walks the graph in dependency order: a finished job (its outputs exist) is "done earlier", a job whose
``needs`` failed is "not run" with the reason, every other job is submitted to the executor as soon as what it
waits for has ended. A failed job is one line of the report and the others go on; the caller exits 2. The executor
decides where a job runs; the graph only decides when.
"""
from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol

from bench_scripts.jobs.job import DONE_EARLIER, FAILED, NOT_RUN, Job, Outcome
from bench_scripts.jobs.process import stopping_on_signals
from fst_plugin.errors import FSTError

log = logging.getLogger("bench.jobs")


class Executor(Protocol):
    """Where jobs run (``concurrent.futures.Executor``'s shape): ``submit`` returns a future of the job's
    ``Outcome``; ``stop`` ends every job it started, now (Ctrl-C); ``retries``: how often the graph resubmits a job
    whose worker died (an executor that retries by itself, like Ray, says 0)."""

    retries: int

    def submit(self, job: Job) -> concurrent.futures.Future: ...

    def stop(self) -> None: ...


class Graph:
    """Jobs by name, each after the jobs it names (``needs``, ``after``), in a valid order."""

    def __init__(self, jobs: Iterable[Job]) -> None:
        self.jobs: dict[str, Job] = {}
        for job in jobs:
            if job.name in self.jobs:
                raise ValueError(f"two jobs are named {job.name!r}")
            self.jobs[job.name] = job
        unknown = {n for job in self for n in (*job.needs, *job.after) if n not in self.jobs}
        if unknown:
            raise ValueError(f"jobs wait for jobs the graph does not hold: {sorted(unknown)}")
        self.order = self._ordered()

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs.values())

    def __len__(self) -> int:
        return len(self.jobs)

    def _ordered(self) -> list[Job]:
        order: list[Job] = []
        state: dict[str, str] = {}

        def visit(name: str) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise ValueError(f"the jobs wait for each other in a circle through {name!r}")
            state[name] = "visiting"
            job = self.jobs[name]
            for other in (*job.needs, *job.after):
                visit(other)
            state[name] = "done"
            order.append(job)

        for name in self.jobs:
            visit(name)
        return order


@dataclass(frozen=True)
class Report:
    """What became of every job of a run, in the graph's order."""

    outcomes: tuple[Outcome, ...]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for outcome in self.outcomes:
            out[outcome.status] = out.get(outcome.status, 0) + 1
        return out

    def summary(self) -> str:
        return f"{len(self.outcomes)} jobs: " + ", ".join(f"{n} {s}" for s, n in self.counts().items())

    def table(self) -> str:
        """The report as Markdown: one row a job (status, where it ran, wall time, note)."""
        rows = ["| job | status | node | wall s | note |", "|---|---|---|---|---|"]
        rows += [f"| {o.job} | {o.status} | {o.node} | {o.wall_s:g} | {o.note.replace('|', '/')} |"
                 for o in self.outcomes]
        return "\n".join(rows)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Grid report\n\n{self.summary()}\n\n{self.table()}\n")


def run_graph(graph: Graph, executor: Executor, force: bool = False, report: Optional[Path] = None) -> Report:
    """Run every unfinished job of ``graph`` on ``executor`` (``force``: the finished ones too), each as soon as
    what it waits for has ended; Ctrl-C / SIGTERM stop every job started (a re-run continues). The report is
    written to ``report`` after every job that ends, so it says what is done while the grid runs."""
    outcomes: dict[str, Outcome] = {}
    pending = list(graph.order)
    running: dict[concurrent.futures.Future, tuple[Job, int]] = {}

    def ended(outcome: Outcome) -> None:
        outcomes[outcome.job] = outcome
        if not outcome.node:   # decided here, not by the worker that ran it (which logged its own outcome)
            log.info("%s: %s%s", outcome.job, outcome.status, f" ({outcome.note})" if outcome.note else "")
        if report is not None:
            Report(tuple(outcomes[j.name] for j in graph.order if j.name in outcomes)).write(report)

    def submit(job: Job, attempt: int) -> None:
        try:
            running[executor.submit(job)] = (job, attempt)
        except FSTError as exc:   # the executor cannot run it (no node has its resources, say)
            ended(Outcome(job.name, FAILED, str(exc)))

    with stopping_on_signals(executor.stop):
        while pending or running:
            for job in list(pending):
                failed = [n for n in job.needs if n in outcomes and not outcomes[n].ended_well]
                if failed:
                    pending.remove(job)
                    ended(Outcome(job.name, NOT_RUN, f"needs {failed[0]} ({outcomes[failed[0]].status})"))
                elif all(n in outcomes for n in (*job.needs, *job.after)):
                    pending.remove(job)
                    missing = [p for p in job.inputs if not p.exists()]
                    if job.finished and not force:
                        ended(Outcome(job.name, DONE_EARLIER))
                    elif missing:
                        ended(Outcome(job.name, FAILED, f"its input {missing[0]} does not exist"))
                    else:
                        submit(job, 1)
            if not running:
                continue
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job, attempt = running.pop(future)
                try:
                    ended(future.result())
                except Exception as exc:  # noqa: BLE001 - the worker running it died (or Ray gave up on it)
                    reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                    if attempt <= executor.retries:
                        log.warning("%s: its worker died (%s); running it again", job.name, reason)
                        submit(job, attempt + 1)
                    else:
                        ended(Outcome(job.name, FAILED, f"its worker died: {reason}"))
    result = Report(tuple(outcomes[j.name] for j in graph.order))
    log.info("%s", result.summary())
    return result

