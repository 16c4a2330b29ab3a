"""The default executor: this machine, no dependency beyond the standard library.

One worker runs each job here, in this process, one after another (what the scripts always did alone). Several
are a ``concurrent.futures.ProcessPoolExecutor`` of spawned processes (CUDA cannot be used in forked ones), each
given its share of the cores as torch threads and, when several GPUs are visible, one GPU of its own (with one GPU
they share it: records side by side on one card are separate processes, so their kernels interleave).
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

from bench_scripts.jobs.job import Job
from bench_scripts.jobs.process import KILL_GRACE_S, WorkerContext, exit_on_signals, execute, share_of_cores

log = logging.getLogger("bench.jobs")


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees (CUDA_VISIBLE_DEVICES' names where it is set), without starting CUDA."""
    import torch

    count = torch.cuda.device_count()
    named = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def _start_worker(context: WorkerContext, gpus: Optional[multiprocessing.SimpleQueue]) -> None:
    """A worker's set-up: its GPU (taken from the queue before CUDA starts), its threads, and its signals."""
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get()
    exit_on_signals()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")


class LocalExecutor:
    """``workers`` jobs at a time on this machine (see the module's docstring)."""

    retries = 1   # a worker that died (a crash, the OOM killer) takes the pool with it: its job runs once more

    def __init__(self, workers: int = 1, context: WorkerContext = WorkerContext()) -> None:
        self.workers = max(1, workers)
        self.context = WorkerContext(context.log_dir, context.command,
                                     context.threads or share_of_cores(self.workers))
        self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        spawn = multiprocessing.get_context("spawn")
        gpus = visible_gpus()
        queue = None
        if len(gpus) > 1:
            queue = spawn.SimpleQueue()
            for i in range(self.workers):
                queue.put(gpus[i % len(gpus)])
        log.info("%d workers, %d torch threads each%s", self.workers, self.context.threads,
                 f", GPUs {', '.join(gpus)} one each" if queue else "")
        return concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=spawn, initializer=_start_worker,
                                                      initargs=(self.context, queue))

    def submit(self, job: Job) -> concurrent.futures.Future:
        if self.workers == 1:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(execute(job, self.context))
            return future
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            return self._pool.submit(execute, job, self.context)
        except BrokenProcessPool:
            self._pool = self._new_pool()
            return self._pool.submit(execute, job, self.context)

    def stop(self) -> None:
        """Cancel what has not started and end the workers (each kills its job's programs on the way out)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        workers = multiprocessing.active_children()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(KILL_GRACE_S + 5)
            if worker.is_alive():
                worker.kill()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
