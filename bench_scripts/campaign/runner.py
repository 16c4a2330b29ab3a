"""Running the plan inside a time budget, so that a second call continues where the first stopped.

* A stage starts only when the budget, less the time reserved for evaluate, table and collect, leaves it at
  least its ``min_s``; its commands run with a timeout of what is left (their process groups are killed then).
* Records get ``--stop-after-s`` = what is left less the time to write a record, so they pause at an epoch's end
  with a checkpoint; a later call resumes them (``make_records --checkpoint-every``).
* ``<work>/state.json`` keeps each stage's status; a done stage is not run again, a partial one is (the scripts
  skip what they finished: records, defenses and evaluations are cached).
* A failed smoke stops the campaign (exit 1): the error comes back in the log, before any GPU time is spent on it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench_scripts.campaign.plan import ANY_RECORD, FINISH, STOP_AFTER, Job, Plan, Stage

log = logging.getLogger("bench.campaign")
RECORD_WRITE_S = {"cuda": 30.0, "cpu": 8.0}  # evaluation + writing a record's PNGs after its last epoch
_RUNNING: set[subprocess.Popen] = set()


@dataclass
class Outcome:
    status: str      # done, partial, failed, skipped, not started
    note: str = ""
    wall_s: float = 0.0


class State:
    """``<work>/state.json``: per stage, its last outcome; and whether torch.compile passed the smoke."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def outcome(self, stage: str) -> Optional[str]:
        return self.data["stages"].get(stage, {}).get("status")

    def record(self, stage: str, outcome: Outcome) -> None:
        self.data["stages"][stage] = {"status": outcome.status, "note": outcome.note, "wall_s": round(outcome.wall_s, 1),
                                      "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _stop_children(signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT: kill the running commands' process groups, then exit (checkpoints stay)."""
    for proc in list(_RUNNING):
        _kill(proc)
    raise SystemExit(128 + signum)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_jobs(jobs: list[Job], parallel: int, timeout_s: float, log_path: Path,
             fill: Callable[[Job], list[str]]) -> list[Optional[int]]:
    """Run ``jobs``, ``parallel`` at once, each in its own process group, output appended to ``log_path``;
    their exit codes (None: killed at the timeout)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + timeout_s
    codes: list[Optional[int]] = [None] * len(jobs)
    pending = list(enumerate(jobs))
    running: dict[int, subprocess.Popen] = {}
    with open(log_path, "a") as out:
        while pending or running:
            while pending and len(running) < parallel:
                index, job = pending.pop(0)
                argv = fill(job)
                out.write(f"\n$ {' '.join(argv)}\n")
                out.flush()
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                running[index] = proc
                _RUNNING.add(proc)
            for index, proc in list(running.items()):
                if proc.poll() is not None:
                    codes[index] = proc.returncode
                elif time.time() > deadline:
                    _kill(proc)
                    proc.wait()
                    out.write(f"[campaign] killed at the time limit: {' '.join(proc.args)}\n")
                else:
                    continue
                _RUNNING.discard(proc)
                del running[index]
            time.sleep(0.2)
    return codes


class Runner:
    def __init__(self, plan: Plan, only: Optional[set[str]] = None, clock: Callable[[], float] = time.time) -> None:
        self.plan, self.only, self.clock = plan, only, clock
        self.started = clock()
        self.state = State(plan.paths.work / "state.json")
        self.reserve = sum(plan.stage(name).seconds for name in FINISH)

    def left(self, reserve: bool = True) -> float:
        return self.started + self.plan.budget_s - self.clock() - (self.reserve if reserve else 0.0)

    def record_done(self, name: str) -> bool:
        """Whether the record ``name`` (``ANY_RECORD``: any record of the protocol) is finished."""
        if name == ANY_RECORD:
            return any(self.plan.paths.record(self.plan.profile.protocol, "*").parent.glob("*/attack_result.pt"))
        return (self.plan.paths.record(self.plan.profile.protocol, name) / "attack_result.pt").is_file()

    def decide(self, stage: Stage) -> Optional[Outcome]:
        """Why ``stage`` does not run now (an outcome), or None when it runs."""
        if self.only is not None and stage.name not in self.only and stage.name != "collect":
            return Outcome("not selected", "not in --stage")
        if stage.skip:
            return Outcome("skipped", stage.skip)
        if self.state.outcome(stage.name) == "done" and stage.name not in FINISH:
            return Outcome("done", "done in an earlier call")
        left = self.left(reserve=stage.name not in FINISH)
        if left < stage.min_s and stage.name != "collect":
            return Outcome("not started", f"{max(left, 0):.0f} s left of the budget, it needs {stage.min_s:.0f} s")
        return None

    def fill(self, job: Job) -> list[str]:
        """The job's argv at run time: the records' pause time, and no --compile if the smoke found it broken."""
        left = self.left() - RECORD_WRITE_S.get(self.plan.profile.device, 8.0)
        argv = [str(max(1, int(left))) if a == STOP_AFTER else a for a in job.argv]
        compile_check = self.plan.paths.work / "smoke" / self.plan.profile.protocol / "compile_check.json"
        if "--compile" in argv and compile_check.is_file() and not json.loads(compile_check.read_text())["ok"]:
            argv.remove("--compile")
        return argv

    def run_stage(self, stage: Stage) -> Outcome:
        started = self.clock()
        ready = [job for job in stage.jobs if job.needs is None or self.record_done(job.needs)]
        waiting = len(stage.jobs) - len(ready)
        left = self.left(reserve=stage.name not in FINISH)
        log_path = self.plan.paths.logs / f"{stage.name}.log"
        if stage.must_pass:  # one at a time, stopping at the first failure
            codes: list[Optional[int]] = []
            for job in ready:
                codes += run_jobs([job], 1, max(self.left(), 1), log_path, self.fill)
                if codes[-1] != 0:
                    break
            ready = ready[:len(codes)]
        else:
            codes = run_jobs(ready, stage.parallel, max(left, 1), log_path, self.fill) if ready else []
        wall = self.clock() - started
        failed = [job.shell() for job, code in zip(ready, codes) if code not in (0, None)]
        killed = sum(code is None for code in codes)
        unfinished = self.unfinished_records(stage)
        if stage.must_pass and (failed or killed):
            return Outcome("failed", f"{'killed at the time limit' if killed else 'exit != 0'}: "
                                     f"{(failed or [''])[0][:300]}", wall)
        if unfinished:
            return Outcome("partial", "; ".join(unfinished), wall)
        if failed or killed or waiting:
            return Outcome("partial", f"{len(failed)} failed, {killed} cut at the time limit, {waiting} waiting for "
                                      "records", wall)
        return Outcome("done", f"{len(ready)} commands", wall)

    def unfinished_records(self, stage: Stage) -> list[str]:
        """For the record stages: each record not finished, with its checkpoint's progress."""
        if stage.name not in ("records", "reference"):
            return []
        out = []
        for name in (job.makes for job in stage.jobs if job.makes and not self.record_done(job.makes)):
            sidecar = self.plan.paths.cache / self.plan.profile.protocol / "attack_checkpoint" / f"{name}.pt.json"
            progress = json.loads(sidecar.read_text()) if sidecar.is_file() else None
            out.append(f"{name} {progress['epochs_done']}/{progress['epochs']} epochs" if progress else
                       f"{name} not started")
        return out

    def run(self, collect: Callable[[Plan, State], list[Path]]) -> int:
        """Every stage in order, then the finishing ones; the exit status (1 when the smoke failed)."""
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _stop_children),
                    signal.SIGINT: signal.signal(signal.SIGINT, _stop_children)}
        try:
            for stage in self.plan.stages:
                outcome = self.decide(stage)
                if outcome is None:
                    log.info("stage %s: starting (%.0f s left of the budget)", stage.name, self.left(reserve=False))
                    if stage.name == "collect":
                        self.state.record(stage.name, Outcome("done", "collecting"))
                        outcome = Outcome("done", f"{len(collect(self.plan, self.state))} files in {self.plan.paths.out}")
                    else:
                        outcome = self.run_stage(stage)
                    self.state.record(stage.name, outcome)
                log.info("stage %s: %s%s", stage.name, outcome.status, f" ({outcome.note})" if outcome.note else "")
                if stage.must_pass and outcome.status == "failed":
                    collect(self.plan, self.state)
                    log.error("the smoke failed, so the campaign stops: %s", outcome.note)
                    return 1
            return 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
