"""The grid on a real Ray cluster on this machine (issue 28): a head and a second node on loopback
(``ray.cluster_utils.Cluster``, one CPU each, a small object store). The tiny grid gives the same results.csv as the
local executor (wall times aside), also when the second node is killed while it runs a job; a bad record fails
alone; the cache is checked to be shared; and Ctrl-C to the driver stops every task it started, with its programs."""
from __future__ import annotations

import os

# before ray is imported: a cluster on loopback is reached on loopback (Ray would turn 127.0.0.1 into this machine's
# outward address; the nodes below listen on loopback only). bench_scripts.jobs.cluster sets the same for a
# loopback --address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from bench_scripts import grid  # noqa: E402
from bench_scripts.jobs.cli import grid_folder  # noqa: E402
from tests.bench.conftest import write_tiny_data  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024 ** 2, "node_ip_address": "127.0.0.1"}
# a dead node is noticed in about 3 s (Ray's default: 5 missed checks of 3 s)
HEAD = {**NODE, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}}
WALL_TIME = ("defense_wall_s", "attack_train_s")
BAD = "blended-broken_0.1_s0"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic images in CIFAR-10's folder layout, and a Blended key "image" that is not an image."""
    root = tmp_path_factory.mktemp("cluster_data")
    write_tiny_data(root / "data")
    (root / "broken.png").write_text("not an image")
    return root


def _grid(data: Path, out: Path, capsys, *executor: str) -> tuple[int, list[str], pd.DataFrame]:
    """The tiny grid (BadNets, SIG and a Blended record whose key image is broken; FST and LP) -> its exit
    status, its error lines and its results.csv."""
    with pytest.raises(SystemExit) as ended:
        grid.main(["--protocol", "tiny", "--data", str(data / "data"), "--cache", str(out / "cache"), "--results",
                   str(out / "results"), "--attacks", "badnets:0.1", "sig:0.05", "blended:0.1", "--blend-pattern",
                   str(data / "broken.png"), "--methods", "fst", "lp", *executor])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return ended.value.code, errors, pd.read_csv(out / "results" / "results.csv")


@pytest.fixture(scope="module")
def local(data, tmp_path_factory) -> pd.DataFrame:
    """The tiny grid on the local executor, two workers."""
    out = tmp_path_factory.mktemp("local")
    with pytest.raises(SystemExit) as ended:
        grid.main(["--protocol", "tiny", "--data", str(data / "data"), "--cache", str(out / "cache"), "--results",
                   str(out / "results"), "--attacks", "badnets:0.1", "sig:0.05", "blended:0.1", "--blend-pattern",
                   str(data / "broken.png"), "--methods", "fst", "lp", "--jobs", "2"])
    assert ended.value.code == 2
    return pd.read_csv(out / "results" / "results.csv")


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each, on loopback; torn down after the module's tests."""
    made = Cluster(initialize_head=True, head_node_args=HEAD)
    made.add_node(**NODE)
    yield made
    made.shutdown()


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    key = ["record", "variant"]
    a, b = (df.drop(columns=list(WALL_TIME)).sort_values(key).reset_index(drop=True) for df in (a, b))
    pd.testing.assert_frame_equal(a, b)


def _ray(cluster: Cluster) -> list[str]:
    return ["--executor", "ray", "--address", cluster.address]


def test_the_tiny_grid_gives_the_same_results_on_ray_and_a_bad_record_fails_alone(data, local, cluster, tmp_path,
                                                                                      capsys):
    code, errors, results = _grid(data, tmp_path, capsys, *_ray(cluster))
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {BAD}: UnidentifiedImageError")
    assert set(results.record) == {"badnets_0.1_s0", "sig_0.05_s0"}
    assert set(results.variant) == {"none", "fst", "lp"}
    _same(results, local)
    report = (grid_folder(tmp_path / "cache" / "tiny") / "report.md").read_text()
    assert f"| {BAD}/fst | not run |" in report and "| badnets_0.1_s0/fst | done | 127.0.0.1/" in report
    nodes = {line.split(" | ")[2] for line in report.splitlines() if " | done | 127.0.0.1/" in line}
    assert len(nodes) == 2, "both nodes ran jobs"
    logs = list((grid_folder(tmp_path / "cache" / "tiny") / "logs").glob("*.log"))
    assert len(logs) == 9 and all(f"started on {node}" in "".join(log.read_text() for log in logs) for node in nodes)


def _kill_second_node_when_busy(cluster: Cluster, logs: Path, killed: list[str], ended: threading.Event) -> None:
    """Waits for a job to start on the second node (its log's first line says where), then kills that node (no
    graceful shutdown); gives up when the grid has ended."""
    second = next(iter(cluster.worker_nodes))
    mark = f"started on 127.0.0.1/{second.node_id[:8]}"
    while not ended.is_set():
        for path in logs.glob("*.log") if logs.is_dir() else ():
            text = path.read_text()
            if mark in text and " after " not in text.split(mark, 1)[1]:
                cluster.remove_node(second, allow_graceful=False)
                killed.append(path.name)
                return
        time.sleep(0.2)


def test_killing_the_second_node_mid_grid_loses_no_work_and_ends_with_the_same_results(data, local, cluster,
                                                                                         tmp_path, capsys):
    if not cluster.worker_nodes:
        cluster.add_node(**NODE)
    killed: list[str] = []
    ended = threading.Event()
    killer = threading.Thread(target=_kill_second_node_when_busy,
                              args=(cluster, grid_folder(tmp_path / "cache" / "tiny") / "logs", killed, ended))
    killer.start()
    try:
        code, errors, results = _grid(data, tmp_path, capsys, *_ray(cluster))
    finally:
        ended.set()
        killer.join()
    assert killed, "the second node never ran a job"
    assert code == 2 and [e.split(":")[1].strip() for e in errors] == [BAD]   # only the bad record failed
    _same(results, local)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


DRIVER = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bench_scripts.jobs.cluster import RayExecutor
from bench_scripts.jobs.graph import Graph, run_graph
from bench_scripts.jobs.job import Job
from bench_scripts.jobs.process import Command
folder = Path(sys.argv[3])
sleeper = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
jobs = [Job(f"s{i}", "command", Command((sys.executable, "-c", sleeper, str(folder / f"s{i}.pid")), folder / f"s{i}.log"))
        for i in range(2)]
with RayExecutor(sys.argv[2], folder) as executor:
    run_graph(Graph(jobs), executor)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from Linux's /proc")
def test_ctrl_c_stops_every_task_on_every_node_and_the_programs_they_started(cluster, tmp_path):
    if not cluster.worker_nodes:
        cluster.add_node(**NODE)
    (tmp_path / "driver.py").write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(REPO), cluster.address, str(tmp_path)],
                              cwd=REPO)
    pid_files = [tmp_path / f"s{i}.pid" for i in range(2)]
    pids: list[int] = []
    try:
        deadline = time.time() + 180
        while not all(p.is_file() and p.read_text() for p in pid_files) and time.time() < deadline:
            assert driver.poll() is None, "the driver ended before its tasks started"
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in pid_files]
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=60) == 128 + signal.SIGINT
        deadline = time.time() + 30
        while not all(map(_gone, pids)) and time.time() < deadline:
            time.sleep(0.2)
        assert all(map(_gone, pids)), "a task's program outlived Ctrl-C"
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()


class _Elsewhere:
    """Stands in for ``ray`` on a cluster whose one node mounts another disk at the cache's path: its tasks run here,
    but see ``disk`` where the driver wrote into the cache."""

    def __init__(self, disk: Path) -> None:
        self.disk = disk

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "NodeID": "ab" * 28}]

    def remote(self, function):
        disk = self.disk

        class Task:
            def options(self, **_):
                return self

            def remote(self, folder: str, token: str):
                return function(str(disk), token)

        return Task()

    def get(self, refs, timeout=None):
        return refs


def test_a_cache_that_a_node_cannot_see_is_refused_with_the_fix(tmp_path):
    from bench_scripts.jobs.cluster import check_shared
    from fst_plugin.errors import FSTError

    (tmp_path / "other").mkdir()
    with pytest.raises(FSTError, match="is not the same folder on every node .* Fix: put --cache") as refused:
        check_shared(_Elsewhere(tmp_path / "other"), tmp_path / "cache")
    assert "cannot read it" in str(refused.value)
    assert not list((tmp_path / "cache" / ".shared_check").iterdir())   # the check leaves nothing behind
