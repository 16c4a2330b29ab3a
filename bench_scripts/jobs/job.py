"""A job of the benchmark grid: what it runs, what it reads and writes, and what it needs of a machine.

A job is finished when every one of its outputs exists. The grid's caches already mark their work that way
(``attack_result.pt`` for a record, ``defense_result.pt`` for a defense, ``builtin_run.json`` for a built-in,
``retune_result.pt`` for a retune, QRA's ``run_info.json``), and each of those is written last, so a finished job
is skipped on a re-run and a job cut short runs again. Its work is a picklable object, so the same job runs inline,
in a local worker process or as a Ray task on another machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

# what became of a job (Outcome.status)
DONE, DONE_EARLIER, FAILED, TIMED_OUT, NOT_RUN = "done", "done earlier", "failed", "timed out", "not run"


class Work(Protocol):
    """What a job runs: called once, in whichever process runs the job; returns a one-line note ("" when there is
    nothing to say) and raises on failure (an ``FSTError`` is the user's problem and becomes one line)."""

    def __call__(self) -> str: ...


@dataclass(frozen=True)
class Resources:
    """What one run of a job holds: CPU cores (its torch threads) and GPUs (Ray's num_cpus / num_gpus)."""

    cpus: int = 1
    gpus: float = 0.0


@dataclass(frozen=True)
class Job:
    """One step of the grid. ``needs``: jobs that must have succeeded first (a failed one leaves this one not run);
    ``after``: jobs that must have ended first, whatever became of them (the results table reads what exists).
    ``always``: run even when the outputs exist (a job that only puts together what others made, cheaply)."""

    name: str
    kind: str
    work: Work
    inputs: tuple[Path, ...] = ()
    outputs: tuple[Path, ...] = ()
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    resources: Resources = Resources()
    timeout_s: Optional[float] = None
    always: bool = False

    @property
    def finished(self) -> bool:
        return not self.always and bool(self.outputs) and all(p.exists() for p in self.outputs)


@dataclass(frozen=True)
class Outcome:
    """What became of one job: ``note`` is one line (the reason of a failure), ``node`` where it ran."""

    job: str
    status: str
    note: str = ""
    wall_s: float = 0.0
    node: str = ""

    @property
    def failed(self) -> bool:
        return self.status in (FAILED, TIMED_OUT)

    @property
    def ended_well(self) -> bool:
        return self.status in (DONE, DONE_EARLIER)
