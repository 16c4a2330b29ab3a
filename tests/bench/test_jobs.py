"""The grid's job graph and its local executor (bench_scripts/jobs): jobs run after what they wait for, a failure
stops only the jobs that need it, a finished job is skipped, a job past its limit is stopped with its programs,
workers get their share of the cores, and SIGTERM to a run ends its workers and every program they started."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench_scripts.jobs.graph import Graph, run_graph
from bench_scripts.jobs.job import DONE, DONE_EARLIER, FAILED, NOT_RUN, TIMED_OUT, Job
from bench_scripts.jobs.local import LocalExecutor
from bench_scripts.jobs.process import Command, share_of_cores
from fst_plugin.errors import FSTError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Touch:
    """Writes its file (after a little while), or fails as a user's mistake would."""

    path: Path
    fail: bool = False

    def __call__(self) -> str:
        if self.fail:
            raise FSTError(f"{self.path.name} cannot be made", "make it another way")
        time.sleep(0.05)
        self.path.write_text(str(time.time()))
        return ""


@dataclass(frozen=True)
class Threads:
    """Says the torch threads and OMP_NUM_THREADS of the process that runs it."""

    def __call__(self) -> str:
        import torch

        return f"{torch.get_num_threads()} {os.environ['OMP_NUM_THREADS']}"


def _job(tmp_path: Path, name: str, **kwargs) -> Job:
    fail = kwargs.pop("fail", False)
    return Job(name, "touch", Touch(tmp_path / name, fail), outputs=(tmp_path / name,), **kwargs)


def test_jobs_run_after_what_they_wait_for_and_a_failure_stops_only_what_needs_it(tmp_path):
    graph = Graph([_job(tmp_path, "table", after=("fst", "lp")), _job(tmp_path, "fst", needs=("record",)),
                   _job(tmp_path, "record"), _job(tmp_path, "bad", fail=True), _job(tmp_path, "lp", needs=("bad",))])
    with LocalExecutor(1) as executor:
        report = run_graph(graph, executor, report=tmp_path / "report.md")
    status = {o.job: o for o in report.outcomes}
    assert [status[n].status for n in ("record", "fst", "bad", "lp", "table")] == [DONE, DONE, FAILED, NOT_RUN, DONE]
    assert status["bad"].note == "bad cannot be made. Fix: make it another way."
    assert status["lp"].note == "needs bad (failed)" and not (tmp_path / "lp").exists()
    times = {n: float((tmp_path / n).read_text()) for n in ("record", "fst", "table")}
    assert times["record"] < times["fst"] < times["table"]
    assert [o.job for o in report.failures] == ["bad"]
    assert "| bad | failed |" in (tmp_path / "report.md").read_text()


def test_a_finished_job_is_skipped_and_force_runs_it_again(tmp_path):
    graph = Graph([_job(tmp_path, "record")])
    with LocalExecutor(1) as executor:
        first = run_graph(graph, executor).outcomes[0].status
        made = (tmp_path / "record").read_text()
        again = run_graph(graph, executor).outcomes[0].status
        assert (tmp_path / "record").read_text() == made
        forced = run_graph(graph, executor, force=True).outcomes[0].status
    assert (first, again, forced) == (DONE, DONE_EARLIER, DONE)
    assert (tmp_path / "record").read_text() != made


def test_a_graph_refuses_a_circle_and_a_job_it_does_not_hold(tmp_path):
    with pytest.raises(ValueError, match="circle"):
        Graph([_job(tmp_path, "a", needs=("b",)), _job(tmp_path, "b", after=("a",))])
    with pytest.raises(ValueError, match="does not hold"):
        Graph([_job(tmp_path, "a", needs=("record",))])


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its parent's wait() has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_job_past_its_limit_is_stopped_with_the_programs_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"import subprocess, sys, time; open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(" \
             "[sys.executable, '-c', 'import time; time.sleep(600)']).pid)); time.sleep(600)"
    job = Job("sleeper", "command", Command((sys.executable, "-c", script), tmp_path / "sleeper.log"), timeout_s=3)
    started = time.time()
    with LocalExecutor(1) as executor:
        outcome, = run_graph(Graph([job]), executor).outcomes
    assert outcome.status == TIMED_OUT and outcome.note == "stopped after its 3-s limit"
    assert time.time() - started < 30 and _gone(int(pid_file.read_text()))


def test_workers_get_their_share_of_the_cores(monkeypatch, tmp_path):
    """Two torch processes of 2 threads each on 2 cores stall each other: 2 workers with 4 threads between them
    get 2 each, and the programs they start are told so (OMP_NUM_THREADS: the campaign's commands and every
    bench script's ``setup`` read it)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert share_of_cores(2) == 2 and share_of_cores(8) == 1 and share_of_cores(1) == 4
    program = (sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])")
    jobs = [Job(f"threads{i}", "probe", Threads()) for i in range(2)]
    jobs.append(Job("program", "command", Command(program, tmp_path / "program.log")))
    with LocalExecutor(2) as executor:
        report = run_graph(Graph(jobs), executor)
    assert [o.note for o in report.outcomes[:2]] == ["2 2", "2 2"]
    assert (tmp_path / "program.log").read_text().splitlines()[-1] == "threads 2"


def _children(pid: int) -> list[int]:
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir()
            for p in (task / "children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from Linux's /proc")
def test_a_terminated_run_takes_its_workers_and_their_programs_with_it(tmp_path):
    """SIGTERM to a run of two workers: it exits 128 + 15, and neither its workers nor the programs they started
    (each in its own process group, so no signal to the run's group reaches them) run on."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
              "from bench_scripts.jobs.graph import Graph, run_graph; from bench_scripts.jobs.job import Job; "
              "from bench_scripts.jobs.local import LocalExecutor; from bench_scripts.jobs.process import Command\n"
              "if __name__ == '__main__':\n"
              "    jobs = [Job(f's{i}', 'command', Command(('sleep', '600'), Path(sys.argv[2]) / f's{i}.log')) "
              "for i in range(2)]\n"
              "    run_graph(Graph(jobs), LocalExecutor(2))\n")
    (tmp_path / "run.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(REPO), str(tmp_path)])
    deadline = time.time() + 120
    workers: list[int] = []
    sleepers: list[int] = []
    try:
        while len(sleepers) < 2 and time.time() < deadline and parent.poll() is None:
            time.sleep(0.5)
            workers = [p for p in _children(parent.pid)
                       if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
            sleepers = [c for w in workers if not _gone(w) for c in _children(w)]
        assert len(workers) == 2 and len(sleepers) == 2, "the two workers and their programs never started"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while not all(map(_gone, workers + sleepers)) and time.time() < deadline:
            time.sleep(0.5)
        assert all(map(_gone, workers + sleepers))
    finally:  # a failing run must not leave its sleepers behind
        for pid in workers + sleepers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()

