"""The one place that runs a job and owns its time limit, its threads, its child processes, its log and what a
signal does to it, whichever executor called it.

* ``execute(job, context)`` runs a job's work in the calling process (inline, a local worker or a Ray task) and
  turns whatever happened into an ``Outcome``: an ``FSTError`` is its one line, any other exception a one-line
  summary with the traceback in the log, a job past its ``timeout_s`` is stopped (SIGALRM) and says so.
* ``run_command(argv, ...)`` runs a program in its own process group and kills the whole group when it is past its
  time, and when the job around it is stopped (a time limit, Ctrl-C, a cancelled Ray task): BackdoorBench's
  scripts and the campaign's commands run through it, so no child outlives its job.
* ``use_threads`` / ``share_of_cores``: a worker gets its share of the cores. Two torch processes of 2 threads
  each on 2 cores stall each other's parallel regions (about 10x slower), so N workers get cores // N threads.
* ``stopping_on(signals, stop)``: SIGINT / SIGTERM in the driver stop every job it started, then exit 128 + signal.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from bench_scripts.jobs.job import DONE, FAILED, TIMED_OUT, Job, Outcome
from fst_plugin.errors import FSTError

log = logging.getLogger("bench.jobs")
COMMAND_ENV = "BENCH_COMMAND"   # the command line that started the grid, for the timings a job appends
KILL_GRACE_S = 10.0


class JobTimeout(Exception):
    """A job ran past its ``timeout_s``."""


class CommandFailed(Exception):
    """A command of a job exited with a non-zero status."""


@dataclass(frozen=True)
class WorkerContext:
    """What a process running jobs is told by the driver: where each job's log goes, the command that started the
    grid (the timings name it), and how many torch threads a job gets (None: the job's own cpus)."""

    log_dir: Optional[Path] = None
    command: str = ""
    threads: Optional[int] = None


def cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_of_cores(workers: int = 1) -> int:
    """The torch threads of one of ``workers`` processes side by side: its share of the cores (of OMP_NUM_THREADS
    where the user set it), at least 1."""
    budget = int(os.environ.get("OMP_NUM_THREADS") or 0) or cores()
    return max(1, budget // max(1, workers))


def use_threads(threads: int) -> None:
    """torch's threads for this process, and OMP_NUM_THREADS for the programs it starts."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def node_name() -> str:
    """Where this process runs: the Ray node (its IP and the start of its id) inside a Ray task, else the host."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        context = ray.get_runtime_context()
        return f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:8]}"
    return socket.gethostname()


def command_line() -> str:
    """This process's command as one types it: ``python -m <module> <arguments>`` (the script's name when it was
    not started with -m)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["python", "-m", spec.name.removesuffix(".__main__")] if spec is not None else [Path(sys.argv[0]).name]
    return shlex.join([*program, *sys.argv[1:]])


def job_log(log_dir: Path, job_name: str) -> Path:
    """The log file of a job: its name with the path separators flattened."""
    return log_dir / (job_name.replace("/", "__").replace(" ", "_") + ".log")


@contextlib.contextmanager
def time_limit(seconds: Optional[float]) -> Iterator[None]:
    """Raise ``JobTimeout`` in this (main) thread after ``seconds``; nothing when None or off the main thread."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise JobTimeout(f"stopped after its {seconds:g}-s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _logging_to(path: Optional[Path]) -> Iterator[None]:
    """While a job runs: its log records (INFO and up, whatever the process's own logging says: a fresh Ray worker
    keeps Python's WARNING) go to ``path`` too."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(level or logging.WARNING, logging.INFO))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def execute(job: Job, context: WorkerContext = WorkerContext()) -> Outcome:
    """Run ``job`` here and say what became of it. Ctrl-C and SIGTERM (KeyboardInterrupt / SystemExit) are not
    outcomes: they go on up, through every ``finally`` that kills a child process group."""
    threads = context.threads or job.resources.cpus
    use_threads(threads)
    node, started = node_name(), time.time()
    with _logging_to(job_log(context.log_dir, job.name) if context.log_dir else None), _command_named(context.command):
        log.info("%s: started on %s (pid %d, %d threads)", job.name, node, os.getpid(), threads)
        try:
            with time_limit(job.timeout_s):
                note, status = job.work() or "", DONE
        except JobTimeout as exc:
            note, status = str(exc), TIMED_OUT
        except (FSTError, CommandFailed) as exc:
            note, status = str(exc), FAILED
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the others
            log.error("%s failed:\n%s", job.name, traceback.format_exc())
            note, status = " ".join(f"{type(exc).__name__}: {exc}".split()), FAILED
        outcome = Outcome(job.name, status, note, round(time.time() - started, 1), node)
        log.info("%s: %s after %.1f s%s", job.name, status, outcome.wall_s, f" ({note})" if note else "")
    return outcome


@contextlib.contextmanager
def _command_named(command: str) -> Iterator[None]:
    """COMMAND_ENV = ``command`` while a job runs (a job run inline leaves the driver's environment as it was)."""
    previous = os.environ.get(COMMAND_ENV)
    if command:
        os.environ[COMMAND_ENV] = command
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(COMMAND_ENV, None)
        else:
            os.environ[COMMAND_ENV] = previous


_CHILDREN: set[subprocess.Popen] = set()   # the process groups run_command has started and not yet reaped


def _kill_groups(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to each process group, SIGKILL to those still there after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.time() + KILL_GRACE_S
        while sig == signal.SIGTERM and time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        if all(p.poll() is not None for p in procs):
            return


def kill_children() -> None:
    """Kill every process group this process started through ``run_command`` (a stopped job's programs)."""
    _kill_groups(list(_CHILDREN))


def exit_on_signals() -> None:
    """In a worker process: SIGTERM / SIGINT kill the programs its job started, then end the worker at once (a
    worker that unwound instead could take the next job off the queue)."""
    def handler(signum: int, frame: object) -> None:
        kill_children()
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def run_command(argv: Sequence[str], log_path: Path, cwd: Optional[Path] = None,
                env: Optional[dict[str, str]] = None, timeout_s: Optional[float] = None,
                append: bool = False, shown: Optional[str] = None) -> Optional[int]:
    """Run ``argv`` in its own process group, its output to ``log_path`` under a ``$ command`` line (``shown``, or
    ``argv`` itself); its exit status, or None when it ran past ``timeout_s`` (the whole group is killed then, and
    whenever this call is left early: a job's time limit, Ctrl-C, SIGTERM)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a" if append else "w") as out:
        out.write(f"$ {shown or shlex.join(str(a) for a in argv)}\n")
        out.flush()
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _CHILDREN.add(proc)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            out.write(f"[jobs] killed after its {timeout_s:g}-s limit\n")
            return None
        finally:
            if proc.poll() is None:
                _kill_groups([proc])
            _CHILDREN.discard(proc)


@dataclass(frozen=True)
class Command:
    """A job's work that is a program: run in its own process group (``run_command``), output appended to
    ``log``; a non-zero exit fails the job."""

    argv: tuple[str, ...]
    log: Path
    cwd: Optional[Path] = None

    def __call__(self) -> str:
        code = run_command(self.argv, self.log, self.cwd, append=True)
        if code:
            raise CommandFailed(f"exit {code}: {shlex.join(self.argv)}")
        return ""


@contextlib.contextmanager
def stopping_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """While inside: SIGINT / SIGTERM call ``stop`` (stop every job this run started) and exit 128 + signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        log.warning("%s: stopping every job this run started", signal.Signals(signum).name)
        stop()
        kill_children()   # the programs of a job that ran inline
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
