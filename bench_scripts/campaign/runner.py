"""Running the plan inside a time budget, so that a second call continues where the first stopped.

* A stage starts only when the budget, less the time reserved for evaluate, table and collect, leaves it at
  least its ``min_s``; its commands run as jobs of the grid (bench_scripts/jobs: ``parallel`` worker processes, each
  with its share of the cores) until what is left is spent (their process groups are killed then).
* Records get ``--stop-after-s`` = what is left less the time to write a record, so they pause at an epoch's end
  with a checkpoint; a later call resumes them (``make_records --checkpoint-every``).
* ``<work>/state.json`` keeps each stage's status; a done stage is not run again, a partial one is (the scripts
  skip what they finished: records, defenses and evaluations are cached).
* A failed smoke stops the campaign (exit 1): the error comes back in the log, before any GPU time is spent on it.
"""
from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench_scripts.campaign.plan import ANY_RECORD, FINISH, STOP_AFTER, Plan, Stage, Step
from bench_scripts.jobs.graph import Graph, run_graph
from bench_scripts.jobs.job import FAILED, NOT_RUN, TIMED_OUT, Job
from bench_scripts.jobs.local import LocalExecutor
from bench_scripts.jobs.process import CommandFailed, JobTimeout, run_command, stopping_on_signals
from bench_scripts.records.make import checkpoint_path
from fst_plugin.attacks.checkpoint import Checkpointing, read_progress
from fst_plugin.record.layout import finished_records, is_finished

log = logging.getLogger("bench.campaign")
RECORD_WRITE_S = {"cuda": 30.0, "cpu": 8.0}  # evaluation + writing a record's PNGs after its last epoch


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


@dataclass(frozen=True)
class StageCommand:
    """A stage's step as a job's work: its argv is filled in when it starts (``--stop-after-s`` = what the budget
    leaves then, less the time to write a record; no ``--compile`` where the smoke found it broken), and it runs
    until the stage's ``deadline`` (``jobs.process.run_command`` kills its process group then, or on a signal)."""

    argv: tuple[str, ...]
    log: Path
    deadline: float                  # Unix time: killed then
    pause_at: float                  # Unix time: a record pauses (checkpoint saved) before then
    compile_ok: bool = True

    def __call__(self) -> str:
        now = time.time()
        argv = [str(max(1, int(self.pause_at - now))) if a == STOP_AFTER else a for a in self.argv]
        if not self.compile_ok and "--compile" in argv:
            argv.remove("--compile")
        code = run_command(argv, self.log, timeout_s=max(self.deadline - now, 1), append=True)
        if code is None:
            raise JobTimeout("killed at the time limit")
        if code:
            raise CommandFailed(f"exit {code}: {shlex.join(argv)}")
        return ""


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
        folder = self.plan.profile.records_folder
        if name == ANY_RECORD:
            return bool(finished_records(self.plan.paths.root(folder)))
        return is_finished(self.plan.paths.record(folder, name))

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

    def compile_ok(self) -> bool:
        """Whether torch.compile may be used: no smoke found it broken."""
        check = self.plan.paths.work / "smoke" / self.plan.profile.smoke_folder / "compile_check.json"
        return not check.is_file() or json.loads(check.read_text())["ok"]

    def jobs(self, stage: Stage, steps: list[Step], deadline: float) -> list[Job]:
        """The steps as jobs of the grid; a must-pass stage's in a chain, so the first failure leaves the rest."""
        pause_at = time.time() + self.left() - RECORD_WRITE_S.get(self.plan.profile.device, 8.0)
        log_path = self.plan.paths.logs / f"{stage.name}.log"
        jobs: list[Job] = []
        for i, step in enumerate(steps):
            work = StageCommand(step.argv, log_path, deadline, pause_at, self.compile_ok())
            needs = (jobs[-1].name,) if stage.must_pass and jobs else ()
            jobs.append(Job(f"{stage.name} {i + 1}: {step.shell()}", "command", work, needs=needs))
        return jobs

    def run_stage(self, stage: Stage) -> Outcome:
        started = self.clock()
        ready = [step for step in stage.steps if step.needs is None or self.record_done(step.needs)]
        waiting = len(stage.steps) - len(ready)
        deadline = time.time() + max(self.left(reserve=stage.name not in FINISH), 1)
        with LocalExecutor(stage.parallel) as executor:
            report = run_graph(Graph(self.jobs(stage, ready, deadline)), executor)
        wall = self.clock() - started
        ran = [(step, o) for step, o in zip(ready, report.outcomes) if o.status != NOT_RUN]
        failed = [step.shell() for step, o in ran if o.status == FAILED]
        killed = sum(o.status == TIMED_OUT for _, o in ran)
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
        for name in (step.makes for step in stage.steps if step.makes and not self.record_done(step.makes)):
            checkpoint = checkpoint_path(self.plan.paths.root(self.plan.profile.records_folder), name)
            progress = read_progress(Checkpointing(checkpoint))
            out.append(f"{name} {progress['epochs_done']}/{progress['epochs']} epochs" if progress else
                       f"{name} not started")
        return out

    def run(self, collect: Callable[[Plan, State], list[Path]]) -> int:
        """Every stage in order, then the finishing ones; the exit status (1 when the smoke failed). SIGTERM /
        SIGINT stop the running commands (jobs.process) and exit 128 + signal; checkpoints stay."""
        with stopping_on_signals(lambda: None):
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
