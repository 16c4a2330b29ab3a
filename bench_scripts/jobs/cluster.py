"""The Ray executor (``--executor ray --address HOST:PORT``): each job a Ray task holding the CPUs and GPUs its
protocol asks for, run again on another node when its worker or node dies (``max_retries``).

Every job reads and writes the cache and the results by path, so both must be on storage that every node mounts at
the same path (NFS, Lustre, ...), and every node runs the same checkout and environment. ``check_shared`` proves it
at the start: the driver writes a token into the cache folder, a task pinned to each node reads it and writes one
back, and a node that cannot is named with the fix. Ctrl-C cancels every task: first as a KeyboardInterrupt inside
it (so a job's programs are killed by ``run_command``), then by force for those still running.
"""
from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from bench_scripts.jobs.job import Job
from bench_scripts.jobs.process import KILL_GRACE_S, WorkerContext, execute, node_name
from fst_plugin.errors import FSTError

log = logging.getLogger("bench.jobs")
MAX_RETRIES = 3


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _import_ray(address: str) -> Any:
    """``ray``, imported so that a cluster on loopback is reached on loopback: Ray turns 127.0.0.1 into this
    machine's outward address unless its single-machine switch is set, and a cluster started with
    ``ray start --node-ip-address 127.0.0.1`` listens on loopback only."""
    if _is_loopback(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise FSTError("--executor ray needs Ray, which is not installed",
                       'pip install -e ".[cluster]" (or pip install "ray[default]")') from None
    return ray


def _marker(folder: str, token: str) -> tuple[str, str]:
    """On one node: read the driver's token from ``folder`` and write this node's answer beside it."""
    path = Path(folder) / f"{token}.driver"
    seen = path.read_text() if path.is_file() else ""
    node = node_name()
    (Path(folder) / f"{token}.{node.replace('/', '_')}").write_text(node)
    return node, seen


class RayExecutor:
    """Jobs as Ray tasks on the cluster at ``address`` (see the module's docstring)."""

    retries = 0   # Ray runs a task again by itself when its worker or node dies

    def __init__(self, address: str, shared: Path, context: WorkerContext = WorkerContext()) -> None:
        self.ray = ray = _import_ray(address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        self.context = context
        self._task = ray.remote(execute)
        self._running: dict[Any, str] = {}
        try:
            self.nodes = check_shared(ray, shared)
        except BaseException:
            ray.shutdown()
            raise
        log.info("Ray cluster at %s: %d nodes (%s); the cache %s is shared", address, len(self.nodes),
                 ", ".join(self.nodes), shared)

    def _largest(self) -> tuple[float, float]:
        alive = [n["Resources"] for n in self.ray.nodes() if n["Alive"]]
        return (max((r.get("CPU", 0) for r in alive), default=0), max((r.get("GPU", 0) for r in alive), default=0))

    def submit(self, job: Job) -> concurrent.futures.Future:
        cpus, gpus = self._largest()
        if job.resources.cpus > cpus or job.resources.gpus > gpus:
            raise FSTError(f"no node of the cluster has {job.resources.cpus} CPUs and {job.resources.gpus:g} GPUs for "
                           f"{job.name} (the largest: {cpus:g} CPUs, {gpus:g} GPUs)",
                           "start the nodes with more (ray start --num-cpus N --num-gpus G), or ask less of each "
                           "job (--set job_cpus=N job_gpus=G)")
        ref = self._task.options(num_cpus=job.resources.cpus, num_gpus=job.resources.gpus, max_retries=MAX_RETRIES,
                                 retry_exceptions=False, name=job.name).remote(job, self.context)
        self._running[ref] = job.name
        future = ref.future()
        future.add_done_callback(lambda _: self._running.pop(ref, None))
        return future

    def stop(self) -> None:
        """Cancel every task: a KeyboardInterrupt inside each first, then by force after a grace period."""
        refs = list(self._running)
        for ref in refs:
            self.ray.cancel(ref, force=False)
        if refs:
            _, left = self.ray.wait(refs, num_returns=len(refs), timeout=KILL_GRACE_S)
            for ref in left:
                self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.ray.shutdown()

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_shared(ray: Any, folder: Path) -> list[str]:
    """Prove that every alive node reads and writes ``folder`` (where the driver wrote a token); the nodes' names."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marks = folder / ".shared_check"
    marks.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    (marks / f"{token}.driver").write_text(token)
    probe = ray.remote(_marker)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(marks.resolve()), token) for n in nodes]
    answers = ray.get(refs, timeout=120)
    try:
        blind = [node for node, seen in answers if seen != token]
        unseen = [node for node, _ in answers if not (marks / f"{token}.{node.replace('/', '_')}").is_file()]
        if blind or unseen:
            raise FSTError(f"the cache folder {folder} is not the same folder on every node of the cluster "
                           f"({', '.join(blind or unseen)} {'cannot read' if blind else 'wrote where this machine cannot read'}"
                           " it)", "put --cache (and --results, --data) on storage that every node mounts at the same "
                           "path (see docs/cluster.md)")
    finally:
        for path in marks.glob(f"{token}.*"):
            path.unlink(missing_ok=True)
    return [node for node, _ in answers]
