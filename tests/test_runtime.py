"""fst_plugin.runtime.phase: a bar on a terminal; in a log, one line per phase with the steps done and the seconds
taken, and a line at most every ``every_s`` while it runs, so a watcher tells a working run from a hung one."""
from __future__ import annotations

import logging
import re

import pytest

from fst_plugin import runtime
from fst_plugin.runtime import phase


@pytest.fixture()
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "on_terminal", lambda: False)


def _phase_lines(caplog: pytest.LogCaptureFixture, desc: str) -> list[str]:
    return [m for m in caplog.messages if m.startswith(f"{desc}: ")]


def test_off_a_terminal_an_iterated_phase_logs_one_line_with_its_steps_and_seconds(
        no_terminal: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        seen = [step for step in phase("mask", range(4))]
    assert seen == [0, 1, 2, 3]
    (line,) = _phase_lines(caplog, "mask")
    assert re.fullmatch(r"mask: done, 4/4 steps in \d+\.\d s", line), line


def test_off_a_terminal_a_counted_phase_logs_while_it_runs_and_when_it_ends(
        no_terminal: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        with phase("generator", 6, every_s=0) as progress:  # every_s=0: a running line at every update
            progress.update(2)
            progress.update(4)
    assert progress.done == 6 and progress.elapsed_s >= 0
    running_1, running_2, end = _phase_lines(caplog, "generator")
    assert re.fullmatch(r"generator: 2/6 steps so far, \d+ s", running_1), running_1
    assert running_2.startswith("generator: 6/6 steps so far, ")
    assert re.fullmatch(r"generator: done, 6/6 steps in \d+\.\d s", end), end


def test_the_running_lines_come_at_most_once_every_every_s(no_terminal: None, caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO):
        with phase("pretraining", 100) as progress:
            for _ in range(100):
                now[0] += 1.5  # 150 s in all: lines at 60 s and 120 s, not one per step
                progress.update()
    lines = _phase_lines(caplog, "pretraining")
    assert lines == ["pretraining: 40/100 steps so far, 60 s", "pretraining: 80/100 steps so far, 120 s",
                     "pretraining: done, 100/100 steps in 150.0 s"]


def test_a_phase_that_ends_early_or_raises_says_how_far_it_got(no_terminal: None,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        for step in phase("unlearning", range(10)):
            if step == 3:
                break
        with pytest.raises(RuntimeError):
            with phase("qra generator epochs", 5) as progress:
                progress.update()
                raise RuntimeError("diverged")
    assert _phase_lines(caplog, "unlearning")[0].startswith("unlearning: stopped after 3/10 steps in ")
    assert _phase_lines(caplog, "qra generator epochs")[0].startswith("qra generator epochs: stopped after 1/5 steps")


def test_with_a_bar_it_logs_nothing_and_an_unknown_total_counts_steps(no_terminal: None,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert list(phase("shown", iter("ab"), show=True)) == ["a", "b"]
        for _ in phase("unsized", iter("abc")):
            pass
    assert _phase_lines(caplog, "shown") == []
    assert _phase_lines(caplog, "unsized")[0].startswith("unsized: done, 3 steps in ")


def test_the_lines_go_to_the_callers_logger(no_terminal: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        with phase("mine", 1, logger=logging.getLogger("fst_plugin.core.trigger_inversion")) as progress:
            progress.update()
    assert [r.name for r in caplog.records if r.getMessage().startswith("mine: ")] == [
        "fst_plugin.core.trigger_inversion"]
