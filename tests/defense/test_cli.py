"""``fst-plugin`` as a user runs it (subprocesses)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fst_plugin.defense.shipped import shipped_config
from tests.builders import TinyBB



def cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fst_plugin.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_list_shows_the_registered_defenses() -> None:
    proc = cli("list")
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == ["fe-tuning", "fst", "ft-init", "lp", "pam", "vanilla-ft"]
    assert "fst_plugin.adapter.defenses:FST" in proc.stdout


def test_help_texts() -> None:
    top = cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("list", "install", "uninstall", "run", "demo"))
    run = cli("run", "fst", "--help")
    assert run.returncode == 0 and "--alpha" in run.stdout and "--result_file" in run.stdout and "--trust-record" in run.stdout


def test_run_standalone_on_a_record_folder_takes_the_shipped_yaml_and_its_first_log_line_says_so(
        fresh_bb: TinyBB) -> None:
    ws = fresh_bb
    proc = cli("run", "ft-init", "--record", str(ws.record), "--dataset_path", str(ws.data),
               "--device", "cpu", "--num_workers", "0", "--epochs", "1", "--ratio", "0.25")
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = ws.record / "defense" / "ft-init"
    assert (folder / "defense_result.pt").is_file()
    shipped = shipped_config("ft-init", "cifar10")
    (log_file,) = (folder / "log").glob("*.log")
    first = log_file.read_text().splitlines()[0]
    assert first.endswith(f"settings: {shipped} (shipped for ft-init on cifar10, the record's dataset; no "
                          f"--yaml_path), command line on top"), first
    config = json.loads((folder / "run_info.json").read_text())["config"]
    assert config["yaml_path"] == str(shipped)
    # the shipped yaml's values where the command line is silent, the command line's where it is not
    assert (config["pin_memory"], config["epochs"], config["ratio"], config["num_workers"]) == (True, 1, 0.25, 0)


def test_unknown_defense_is_a_one_line_error() -> None:
    proc = cli("run", "nope", "--record", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no defense named 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr

