"""bench_scripts/compat/'s pure parts on fake trees: no real BackdoorBench, no training.

The subset writer, the one-line cell reasons (ours vs BackdoorBench's own), the WaNet pool check, the
CSV round trip and the README; and the runner on a fake BackdoorBench whose attack scripts are stand-ins.
"""
from __future__ import annotations

import pickle
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bench_scripts.compat import run as compat
from bench_scripts.compat.matrix import (
    BB_OWN, CELLS, OK, Cell, Row, check_pool, failure_reason, read_csv, render_readme, write_cifar10_subset,
    write_csv,
)


def _fake_cifar(root: Path, per_batch: int = 30, classes: int = 3) -> None:
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        labels = rng.integers(0, classes, per_batch).tolist()
        data = np.full((per_batch, 3072), b, dtype=np.uint8)
        data[:, 1] = np.arange(per_batch)            # (batch, position) identifies each image
        with open(out / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    with open(out / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(c) for c in range(classes)]}, fh)


def _read(path: Path) -> tuple[np.ndarray, list[int]]:
    with open(path, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    return entry["data"], entry["labels"]


def test_subset_is_class_balanced_and_keeps_the_first_images_of_each_class(tmp_path):
    _fake_cifar(tmp_path / "full")
    sizes = write_cifar10_subset(tmp_path / "full", tmp_path / "sub", train_per_class=4, test_per_class=2)
    assert sizes == (12, 6)
    out = tmp_path / "sub" / "cifar-10-batches-py"
    parts = [_read(out / f"data_batch_{i}") for i in range(1, 6)]
    labels = sum((y for _, y in parts), [])
    data = np.concatenate([d for d, _ in parts])
    assert np.bincount(labels).tolist() == [4, 4, 4]
    full = [_read(tmp_path / "full" / "cifar-10-batches-py" / f"data_batch_{i}") for i in range(1, 6)]
    full_labels = np.concatenate([y for _, y in full])
    full_data = np.concatenate([d for d, _ in full])
    expected = np.sort(np.concatenate([np.flatnonzero(full_labels == c)[:4] for c in range(3)]))
    assert (data == full_data[expected]).all()
    assert np.bincount(_read(out / "test_batch")[1]).tolist() == [2, 2, 2]
    assert (out / "batches.meta").read_bytes() == (tmp_path / "full/cifar-10-batches-py/batches.meta").read_bytes()


def test_subset_refuses_a_source_too_small(tmp_path):
    _fake_cifar(tmp_path / "full", per_batch=3)
    with pytest.raises(ValueError, match="fewer than 50"):
        write_cifar10_subset(tmp_path / "full", tmp_path / "sub", train_per_class=50, test_per_class=1)


def _traceback(*frames: str, message: str) -> str:
    body = "".join(f'  File "{f.split(":")[0]}", line {f.split(":")[1]}, in fn\n    code\n' for f in frames)
    return f"INFO something\nTraceback (most recent call last):\n{body}{message}\n"


def test_reason_names_backdoorbench_when_its_code_raised(tmp_path):
    bb = tmp_path / "BackdoorBench"
    out = _traceback(f"{bb}/attack/lira.py:211", "/venv/torch/cuda/__init__.py:300",
                     message="RuntimeError: Found no NVIDIA driver on your system.")
    assert failure_reason(out, bb, 1) == f"{BB_OWN}: RuntimeError: Found no NVIDIA driver on your system. (attack/lira.py:211)"
    relative = _traceback("./attack/trojannn.py:180", message="AssertionError: pretrained path is not exist")
    assert failure_reason(relative, bb, 1).startswith(f"{BB_OWN}: AssertionError")


def test_reason_is_ours_for_the_plugin_and_its_launchers(tmp_path):
    bb = tmp_path / "BackdoorBench"
    launcher = _traceback(f"{bb}/defense/fst.py:5", "/venv/torch/nn/module.py:1", message="KeyError: 'x'")
    assert failure_reason(launcher, bb, 1) == "KeyError: 'x' (defense/fst.py:5)"
    plugin = _traceback(f"{bb}/defense/fst.py:5", "/repo/fst_plugin/core/tuning.py:42", message="KeyError: 'y'")
    assert failure_reason(plugin, bb, 1) == "KeyError: 'y' (fst_plugin/core/tuning.py:42)"
    refusal = "INFO loading\nerror: attack record x has no bd_train. Fix: use a record written with bd_train\n"
    assert failure_reason(refusal, bb, 2) == "error: attack record x has no bd_train. Fix: use a record written with bd_train"
    assert failure_reason("", bb, -9).startswith("killed")
    assert "|" not in failure_reason("error: a | b", bb, 2)
    local = f"error: attack record {bb}/record/compat_blind has no bd_train. Fix: use a record written with bd_train"
    assert failure_reason(local, bb, 2).startswith("error: attack record BB/record/compat_blind has no bd_train")


def test_innermost_backdoorbench_frame_wins_over_an_outer_plugin_frame(tmp_path):
    bb = tmp_path / "BackdoorBench"
    out = _traceback("/repo/fst_plugin/adapter/backend.py:10", f"{bb}/utils/bd_dataset_v2.py:77",
                     message="IndexError: list index out of range")
    assert failure_reason(out, bb, 1) == f"{BB_OWN}: IndexError: list index out of range (utils/bd_dataset_v2.py:77)"


def test_pool_check_catches_cross_samples_and_wrong_targets():
    labels = {1: (0, 3), 2: (0, 5), 3: (4, 4), 4: (2, 7)}   # 3 is a WaNet cross sample, 4 an all2all-style image
    assert check_pool([1, 2], labels, 0, "dirty-label") == f"{OK} (2/2 have bd_label 0 != original label)"
    assert check_pool([1, 3], labels, 0, "dirty-label").startswith("1 of 2 picked keep their label")
    assert "not relabelled to 0" in check_pool([4], labels, 0, "dirty-label")
    assert check_pool([9], labels, 0, "dirty-label").startswith("picked 1 index(es) not in bd_train")
    sig = {5: (0, 0), 6: (0, 0), 7: (3, 3)}                  # clean-label: flagged images keep their label
    assert check_pool([5, 6], sig, 0, "clean-label") == f"{OK} (2/2 flagged images of class 0)"
    assert check_pool([5, 7], sig, 0, "clean-label").startswith("1 of 2 picked are not flagged images of class 0")


def _rows() -> list[Row]:
    good = Row("wanet", "compat_wanet", {c: Cell(OK, f"python {c}") for c in CELLS},
               {"pool_rule": "dirty-label", "pool_size": "100", "pool_flagged": "300", "pool_excluded": "200",
                "pool_check": "ok (5/5 have bd_label 0 != original label)"})
    bad = Row("lira", "compat_lira", {"attack_run": Cell(OK, "python attack/lira.py"),
                                      "retune": Cell("error: no bd_train", "fst-plugin retune --record record/compat_lira")})
    dead = Row("poison_ink", "compat_poison_ink", {"attack_run": Cell(f"{BB_OWN}: FileNotFoundError (x.py:1)", "python p")})
    return [good, bad, dead]


def test_csv_round_trip_and_readme(tmp_path):
    rows = _rows()
    write_csv(rows, tmp_path / "results.csv")
    back = read_csv(tmp_path / "results.csv")
    assert [(r.attack, {k: c.status for k, c in r.cells.items()}, r.pool) for r in back] == \
        [(r.attack, {k: c.status for k, c in r.cells.items()}, r.pool) for r in rows]
    assert back[1].cells["retune"].command == "fst-plugin retune --record record/compat_lira"
    text = render_readme(back, {"clean": Cell(OK, "python attack/badnet.py --pratio 0")},
                         {"commit": "f02e353", "date": "2026-12-04", "train_per_class": "100", "test_per_class": "20",
                          "export_methods": "fst"},
                         "A note.")
    assert "`f02e353`" in text and "A note." in text
    assert "| lira | ok | — | — | — | — | — | — | error: no bd_train | — |" in text
    assert "| wanet | dirty-label | 100 | 300 | 200 | ok (5/5" in text
    assert "**poison_ink / attack_run**" in text and "`fst-plugin retune --record record/compat_lira`" in text
    assert "/work/" not in text


FAKE_ATTACK = textwrap.dedent("""\
    import sys
    from pathlib import Path
    name = sys.argv[sys.argv.index("--save_folder_name") + 1]
    assert "--epochs" in sys.argv and "--device" in sys.argv
    Path("record", name).mkdir(parents=True)
    if "{fail}" == "1":
        raise RuntimeError("Found no NVIDIA driver on your system.")
    Path("record", name, "attack_result.pt").write_bytes(b"x")
""")


def test_runner_on_a_fake_backdoorbench(tmp_path):
    bb = tmp_path / "BackdoorBench"
    (bb / "attack").mkdir(parents=True)
    (bb / "attack/badnet.py").write_text(FAKE_ATTACK.format(fail="0"))
    (bb / "attack/lira.py").write_text(FAKE_ATTACK.format(fail="1"))
    run = compat.Runner(bb, timeout=60)
    spec = {s.name: s for s in compat.ATTACKS}
    assert compat.run_attack(run, spec["badnet"], force=False).status == OK
    assert (bb / "record/compat_badnet/attack_result.pt").exists()
    cell = compat.run_attack(run, spec["lira"], force=False)
    assert cell.status == f"{BB_OWN}: RuntimeError: Found no NVIDIA driver on your system. (attack/lira.py:7)"
    assert cell.command.startswith("python attack/lira.py ") and "--save_folder_name compat_lira" in cell.command
    assert (bb / "compat_logs/lira__attack.log").read_text().startswith("$ python attack/lira.py")
    (bb / "attack/badnet.py").write_text("raise SystemExit(3)")
    assert compat.run_attack(run, spec["badnet"], force=False).status == OK            # reused
    assert compat.run_attack(run, spec["badnet"], force=True).status.startswith("exit 3")


def test_a_command_past_its_time_limit_is_killed_with_what_it_started(tmp_path):
    """The runner's commands run in their own process group: at the limit the script and the child it started are
    both killed, and the cell says so."""
    bb = tmp_path / "BackdoorBench"
    (bb / "attack").mkdir(parents=True)
    pid_file = tmp_path / "child.pid"
    (bb / "attack/badnet.py").write_text(textwrap.dedent(f"""\
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """))
    cell = compat.run_attack(compat.Runner(bb, timeout=3), {s.name: s for s in compat.ATTACKS}["badnet"], force=False)
    assert cell.status == "killed (exit 124: time limit or memory)"
    child = int(pid_file.read_text())
    status = Path(f"/proc/{child}/status")
    for _ in range(50):   # the group gets SIGTERM, then SIGKILL: give it a moment (a zombie counts as gone)
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the attack's child {child} outlived the time limit")
    assert (bb / "compat_logs/badnet__attack.log").read_text().rstrip().endswith("[exit 124]")


def test_every_attack_runs_one_epoch_on_the_subset_and_lira_two_stages():
    for spec in compat.ATTACKS:
        argv = spec.command()
        value = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}
        assert value["--dataset_path"] == compat.DATA and value["--device"] == "cpu"
        last_epochs = [argv[i + 1] for i, a in enumerate(argv) if a == "--epochs"][-1]   # argparse keeps the last
        assert last_epochs == ("2" if spec.name == "lira" else "1"), spec.name
        assert argv[-2:] == ["--save_folder_name", compat.PREFIX + spec.name]


def test_report_mode_reads_cells_back_without_running_anything(tmp_path):
    bb = tmp_path / "BackdoorBench"
    (bb / "attack").mkdir(parents=True)
    (bb / "attack/lira.py").write_text(FAKE_ATTACK.format(fail="1"))
    spec = {s.name: s for s in compat.ATTACKS}
    ran = compat.run_attack(compat.Runner(bb, timeout=60), spec["lira"], force=False)
    (bb / "attack/lira.py").write_text("raise SystemExit('must not run')")
    report = compat.Runner(bb, timeout=60, report_only=True)
    assert compat.run_attack(report, spec["lira"], force=False) == ran
    assert (bb / "record/compat_lira").is_dir()                     # report mode deletes nothing
    assert compat.run_attack(report, spec["wanet"], force=False).status == compat.NOT_RUN
    old_log = bb / "compat_logs/old.log"                            # a log without its exit line
    old_log.write_text("$ fst-plugin install\nwrote x\n")
    assert report("old", ["install"], plugin=True).status == OK
    old_log.write_text("$ fst-plugin retune\nerror: no bd_train. Fix: use another record\n")
    assert report("old", ["retune"], plugin=True).status == "error: no bd_train. Fix: use another record"


def test_export_copy_links_the_records_and_keeps_the_launchers(tmp_path):
    bb = tmp_path / "BackdoorBench"
    for folder in ("defense", "record/r", "data/compat", "compat_logs", "utils/data"):
        (bb / folder).mkdir(parents=True)
    (bb / "defense/fst.py").write_text("launcher")
    copy = compat.export_checkout(bb)
    (copy / "defense/fst.py").write_text("exported")
    assert (bb / "defense/fst.py").read_text() == "launcher"
    assert (copy / "record").resolve() == (bb / "record").resolve() and (copy / "record/r").is_dir()
    assert (copy / "utils/data").is_dir() and not (copy / "utils/data").is_symlink()   # only top-level links
