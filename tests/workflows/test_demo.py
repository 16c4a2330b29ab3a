"""``fst-plugin demo`` as a user runs it: the table, the log file and ``-v``, ``--download`` offline, and the same
result from two separate processes (torch's default generator is seeded randomly in every process, so a
one-process test cannot see a missing seed)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fst_plugin import cli

TINY = ("--train-per-class", "10", "--test-per-class", "4", "--attack-epochs", "1", "--epochs", "1", "--device", "cpu")
MODES = ["lp", "vanilla-ft", "fe-tuning", "ft-init", "fst"]


def _demo(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fst_plugin.cli", "demo", "--out", str(out), *TINY, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights_digest(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]  # files this test made
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _table_without_times(stdout: str) -> list[list[str]]:
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.split("|")[1:-2]] for row in rows]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """The same demo in two fresh processes (side by side), the first with -v."""
    outs = [tmp_path_factory.mktemp("demo") / "out" for _ in range(2)]
    procs = [_demo(outs[0], "-v"), _demo(outs[1])]
    done = []
    for out, proc in zip(outs, procs):
        stdout, stderr = proc.communicate(timeout=900)
        done.append((out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)))
    for _, proc in done:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return done


def test_the_demo_prints_its_table_on_synthetic_images(two_runs) -> None:
    _, proc = two_runs[1]
    assert "synthetic 10-class images" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [cell.strip() for cell in rows[0].split("|")[1:-1]] == ["defense", "C-Acc", "ASR", "RA", "time_s"]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["no defense", *MODES]
    for row in rows[1:]:
        acc, asr, ra = (float(v) for v in row.split("|")[2:5])
        assert 0 <= acc <= 100 and 0 <= asr <= 100 and 0 <= ra <= 100


def test_two_processes_with_the_same_seed_give_the_same_weights_and_table(two_runs) -> None:
    (out_a, run_a), (out_b, run_b) = two_runs
    assert _table_without_times(run_a.stdout) == _table_without_times(run_b.stdout)
    record = Path("record") / "demo_badnet"
    files = [record / "attack_result.pt"] + [record / "defense" / m / "defense_result.pt" for m in MODES]
    for name in files:
        assert _weights_digest(out_a / name) == _weights_digest(out_b / name), name


def test_logs_go_to_a_file_and_to_the_terminal_only_with_verbose(two_runs) -> None:
    (out_v, verbose), (out_q, quiet) = two_runs
    for out in (out_v, out_q):
        log = (out / "demo.log").read_text()
        assert "training a BadNets-backdoored" in log and "fst done in" in log
    assert "training a BadNets-backdoored" in verbose.stderr and "'alpha': 0.2" in verbose.stderr
    assert "INFO" not in quiet.stderr and "'alpha'" not in quiet.stderr
    assert len(quiet.stdout.splitlines()) == 9  # the title (two lines), the table's header and rule, six rows


def test_download_without_internet_fails_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from torchvision import datasets

    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens
    code = cli.main(["demo", "--download", "--out", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "could not download CIFAR-10" in err and "--data-dir" in err
    assert not (tmp_path / "out" / "record").exists()
