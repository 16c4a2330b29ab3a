"""Issue 4.3 — faults lose nothing.

* Every output file is written atomically (temporary sibling + rename): a writer that fails half-way leaves
  the previous file (or none), and nothing but ``io_utils`` writes result files.
* A run killed with SIGKILL at random moments (several times, mid-epoch, while saving the checkpoint,
  while writing the results) never leaves a truncated ``defense_result.pt``, CSV, json or checkpoint, and
  ``--resume`` continues from the last complete epoch to exactly the final weights and metrics of an
  uninterrupted run.
* A NaN/inf loss stops the run with an error naming lr / alpha, exit code 2, and no model is kept.
"""
from __future__ import annotations

import argparse
import random
import re
import stat
import time
from pathlib import Path

import pytest
import torch

from tests import builders as h
from fst_plugin.io_utils import atomic_torch_save, atomic_write, atomic_write_text
from fst_plugin.record import load_untrusted

KILLS_SURVIVED: list[dict] = []  # one entry per SIGKILL survived, for the closing note


# ----- atomic writes -----------------------------------------------------------------------------------------
def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "fst_df.csv"
    atomic_write_text(target, "epoch\n0\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write("epoch\n0\n1\n")
            raise RuntimeError("killed half-way")
    assert target.read_text() == "epoch\n0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fst_df.csv"]


def test_failed_torch_save_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(Exception):
        atomic_torch_save({"x": lambda: 0}, tmp_path / "defense_result.pt")  # a lambda cannot be pickled
    assert list(tmp_path.iterdir()) == []


def test_temporary_file_is_a_hidden_sibling(tmp_path: Path) -> None:
    seen = []
    with atomic_write(tmp_path / "run_info.json", "w") as fh:
        seen = [p for p in tmp_path.iterdir()]
        fh.write("{}")
    assert len(seen) == 1 and seen[0].parent == tmp_path and seen[0].name.startswith(".run_info.json.")
    assert [p.name for p in tmp_path.iterdir()] == ["run_info.json"]


def test_atomic_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """Found by this suite: mkstemp's 0600 survived the rename, so results were private to their writer."""
    atomic_write_text(tmp_path / "a.csv", "x")
    atomic_torch_save({"x": 1}, tmp_path / "b.pt")
    plain = tmp_path / "plain.csv"
    plain.write_text("x")
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == expected


def test_only_io_utils_writes_result_files() -> None:
    """Every output of a defense or the installer goes through io_utils (audit of the package source)."""
    package = Path(h.REPO) / "fst_plugin"
    writers = re.compile(r"torch\.save\(|\.write_text\(|\.write_bytes\(|open\([^)]*[\"'][wax]b?[\"']"
                         r"|\.to_csv\(\s*[^)\s]")
    allowed = {  # file -> why a plain write is fine there
        "demo.py": "the demo's synthetic input images, not results",
        "record/attack_record.py": "the attack side's poisoned PNGs (the record's attack_result.pt is atomic)",
    }
    offenders = []
    for path in package.rglob("*.py"):
        rel = str(path.relative_to(package))
        if rel == "io_utils.py" or rel in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if writers.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []


# ----- SIGKILL at random moments, then --resume ---------------------------------------------------------------
def _epochs_done(checkpoint: Path) -> int:
    if not checkpoint.is_file():
        return 0
    return int(load_untrusted(checkpoint, "checkpoint")["state"]["epochs_done"])


# What each kill aims at. Mid-training kills land a random fraction of an epoch after 1-2 epochs of the
# attempt (the epoch's length is timed from the log), so the run cannot finish before the last kill.
KILL_PLAN = ["mid-epoch", "checkpoint-save", "mid-epoch", "results"]
KILL_POINTS = len(KILL_PLAN)


def _attempt(proc, log: Path, kind: str, rng: random.Random, epochs: int) -> tuple[bool, float, str]:
    """Wait for this attempt's kill point, SIGKILL it there; return (killed, delay, description)."""
    more, fraction = rng.randint(1, 2), rng.random()
    text = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731
    seen: list[float] = []  # when "before fst:" and each epoch line appeared
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        log_text = text()
        lines = ("before fst:" in log_text) + log_text.count("fst epoch ")
        seen += [time.monotonic()] * (lines - len(seen))
        if kind == "results" and (f"fst epoch {epochs}/{epochs}" in log_text
                                  or f"resuming fst from epoch {epochs} of {epochs}" in log_text):
            break
        if kind != "results" and len(seen) > more:
            break
        time.sleep(0.02)
    assert time.monotonic() < deadline, text()[-2000:]
    if kind == "results":
        delay, where = 0.3 * fraction, "while writing the results"
    elif kind == "checkpoint-save":  # the checkpoint is saved right after the epoch's log line
        delay, where = 0.05 * fraction, f"while saving the checkpoint of epoch {more} of the attempt"
    else:                            # the first epoch (warm-up) is timed longer: at most half of it
        epoch_time = seen[-1] - seen[-2]
        delay = (0.5 if more == 1 else 0.9) * fraction * epoch_time
        where = f"mid-epoch {more + 1} of the attempt"
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.kill()
    proc.wait(timeout=120)
    return killed, delay, where


def test_sigkill_at_random_moments_then_resume_reaches_the_uninterrupted_result(bb: h.TinyBB, tmp_path: Path,
                                                                             reference: dict) -> None:
    epochs = h.RUN_EPOCHS
    rng = random.Random(2023)
    record = h.copy_record(bb, "killed", root=tmp_path)
    save_dir = record / "defense" / "fst"
    checkpoint = save_dir / "checkpoint" / "last.pt"
    argv = h.defense_argv(bb, record, h.write_yaml(tmp_path / "killed.yaml"), "--resume")
    kills = []
    for attempt, kind in enumerate(KILL_PLAN, 1):
        start_epoch = _epochs_done(checkpoint)
        log = tmp_path / f"attempt_{attempt}.log"
        # the first attempt is a real `python -m fst_plugin.cli`; later ones are forked (no 5 s start-up)
        proc = (h.start_cli if attempt == 1 else h.start_cli_forked)(argv, cwd=tmp_path, log_to=log)
        try:
            killed, delay, where = _attempt(proc, log, kind, rng, epochs)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log_text = log.read_text(errors="replace")
        if start_epoch:  # it continued from the last complete epoch
            assert f"resuming fst from epoch {start_epoch} of {epochs}" in log_text, log_text[-2000:]
        if not killed:   # only the kill aimed at the result writing can miss (the run was quicker)
            assert kind == "results" and proc.returncode == 0, log_text[-3000:]
            break
        checked = h.assert_outputs_complete(save_dir) if save_dir.exists() else []
        assert _epochs_done(checkpoint) >= start_epoch or (save_dir / "defense_result.pt").exists()
        kills.append({"where": where, "delay_s": round(delay, 3), "before": start_epoch,
                      "after": _epochs_done(checkpoint), "files_checked": checked})
    KILLS_SURVIVED.extend(kills)
    # run to the end (resuming from the last complete epoch)
    start_epoch = _epochs_done(checkpoint)
    log = tmp_path / "final.log"
    proc = h.start_cli_forked(argv, cwd=tmp_path, log_to=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    if start_epoch:
        assert f"resuming fst from epoch {start_epoch} of {epochs}" in log.read_text()
    h.assert_outputs_complete(save_dir)
    resumed = h.result_summary(save_dir)
    assert resumed["hash"] == reference["hash"], "the resumed run ended with other weights"
    assert resumed["metrics"] == reference["metrics"], "the resumed run ended with other metrics"
    assert len(resumed["metrics"]["epoch"]) == epochs
    assert len(kills) >= 3 and any(k["before"] > 0 for k in kills)
    print(f"\nkill points survived: {len(kills)}")
    for kill in kills:
        print(f"  {kill['where']} (+{kill['delay_s']} s): checkpoint {kill['before']} -> {kill['after']} epochs, "
              f"{len(kill['files_checked'])} files complete: {', '.join(kill['files_checked'])}")


def test_malformed_checkpoint_with_the_right_key_is_a_clear_error(bb: h.TinyBB, tmp_path: Path,
                                                                  reference: dict) -> None:
    """A checkpoint that passes the settings check but holds no tuning state: exit 2, no traceback."""
    from fst_plugin.adapter.defenses import FST
    from fst_plugin.defense.runner import prepare

    # the settings key of the reference run's arguments, computed by the runner itself (prepare writes nothing)
    parser = argparse.ArgumentParser()
    FST.add_arguments(parser)
    args = parser.parse_args(h.defense_argv(bb, reference["record"], reference["yaml"])[2:])
    defense = FST(args)
    key = prepare(defense.config, defense.result, FST.method).resume_key
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"resume_key": key, "state": {"epochs_done": "three"}}, folder / "last.pt")
    record = h.copy_record(bb, "malformed_ckpt", root=tmp_path)
    result = h.run_cli(h.defense_argv(bb, record, reference["yaml"], "--resume", "--checkpoint_save", str(folder)),
                       cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.error_lines) == 1 and "does not hold a tuning state" in result.error_lines[0]
    assert "Traceback" not in result.stderr and not (record / "defense").exists()


# ----- NaN / inf ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--alpha", "1e39"], ["--lr", "1e30"]], ids=["alpha-overflows", "lr-explodes"])
def test_non_finite_loss_stops_the_run_and_keeps_no_model(bb: h.TinyBB, tmp_path: Path, extra: list[str]) -> None:
    record = h.copy_record(bb, "diverging", root=tmp_path)
    result = h.run_cli(h.defense_argv(bb, record, h.write_yaml(tmp_path / "y.yaml"), *extra, epochs=3), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.error_lines) == 1 and "Traceback" not in result.stderr
    line = result.error_lines[0]
    assert "the loss became" in line and "lr=" in line and "alpha=" in line and "no model was kept" in line
    save_dir = record / "defense" / "fst"
    assert not (save_dir / "defense_result.pt").exists()
    assert not any(save_dir.glob("*.csv"))
    checkpoint = save_dir / "checkpoint" / "last.pt"
    if checkpoint.exists():  # only complete epochs are checkpointed: their weights are finite
        state = load_untrusted(checkpoint, "checkpoint")["state"]["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
