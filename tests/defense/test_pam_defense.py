"""The ``pam`` defense end to end on the tiny record (small inversion settings, CI time), PAM as an option of any
mode (FST + PAM), the saved trigger generator, resume, and bad PAM settings refused in one line."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from fst_plugin.core.unlearning import generator_from_state
from fst_plugin.defense.config import build_config
from fst_plugin.defense.runner import prepare, run
from fst_plugin.errors import ConfigError
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import DefenseLayout
from tests.builders import TinyBB

SMALL_INVERSION = {"inversion_pretrain_steps": 1, "inversion_mask_steps": 1, "inversion_generator_steps": 1,
                   "generator_filters": 4}


def _config(ws: TinyBB, **more: object):
    return build_config({"record": str(ws.record), "dataset_path": str(ws.data), "device": "cpu", "num_workers": 0,
                         "epochs": 3, "ratio": 0.25, "unlearn_rounds": 2, **SMALL_INVERSION, **more})


def _run(ws: TinyBB, method: str, **more: object):
    return run(prepare(_config(ws, **more), load_attack_record(ws.record), method))


def test_pam_writes_the_outputs_and_the_trigger_generator(fresh_bb: TinyBB) -> None:
    result = _run(fresh_bb, "pam")
    layout = DefenseLayout.of(fresh_bb.record.resolve(), "pam")
    assert layout.finished and layout.csv.is_file() and layout.run_info.is_file()
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    info = json.loads(layout.run_info.read_text())
    assert info["pam"] is True and info["mode"]["path_aware"] is True
    rounds = info["pam_inversion"]  # the diagnostics of each inversion round; the target is the evaluator's to judge
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["feature_split"].startswith("layer3 (") and "avg pool" in r["feature_split"] for r in rounds)
    assert all(0 <= r["mask_saturation"] <= 1 and 0 <= r["share_to_detected"] <= 1 for r in rounds)
    assert all(r["detected_class"] == rounds[0]["detected_class"] for r in rounds)
    assert "target" not in json.dumps(rounds)  # the defense does not know the attack's target
    state = torch.load(layout.trigger_generator, weights_only=False)
    assert len(state["rounds"]) == 2 and 0 <= state["target"] < 10  # round 1 before tuning, round 2 at epoch 1
    gen = generator_from_state(state)  # usable alone: images in, images out
    images = torch.randn(2, 3, 32, 32)
    assert gen(images).shape == images.shape
    assert not layout.checkpoint_dir.exists()


def test_pam_is_an_option_of_any_mode_and_changes_the_tuning(fresh_bb: TinyBB) -> None:
    plain = _run(fresh_bb, "fst", save_name="fst-plain")
    with_pam = _run(fresh_bb, "fst", pam="on", save_name="fst-pam")
    assert not DefenseLayout.of(fresh_bb.record, "fst-plain").trigger_generator.exists()
    assert DefenseLayout.of(fresh_bb.record, "fst-pam").trigger_generator.is_file()
    moved = [not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), with_pam.model.state_dict().values())]
    assert any(moved)
    off = _run(fresh_bb, "pam", pam="off", save_name="pam-off")  # the pam mode without PAM: plain tuning
    assert not DefenseLayout.of(fresh_bb.record, "pam-off").trigger_generator.exists()
    assert json.loads(DefenseLayout.of(fresh_bb.record, "pam-off").run_info.read_text())["pam"] is False
    assert off.history


def test_a_resumed_pam_run_ends_where_an_uninterrupted_one_does(fresh_bb: TinyBB, tmp_path) -> None:
    whole = _run(fresh_bb, "pam", save_name="whole")
    states = []

    class Stop(Exception):
        pass

    def stop_after_two(state):
        states.append(state.epochs_done)
        if state.epochs_done == 2:
            raise Stop

    checkpoint = tmp_path / "ck"
    with pytest.raises(Stop):
        run(prepare(_config(fresh_bb, save_name="resumed", checkpoint_save=str(checkpoint)),
                    load_attack_record(fresh_bb.record), "pam"), on_epoch_end=stop_after_two)
    resumed = run(prepare(_config(fresh_bb, save_name="resumed", checkpoint_save=str(checkpoint), resume=True),
                          load_attack_record(fresh_bb.record), "pam"))
    assert states == [1, 2] and [row["epoch"] for row in resumed.history] == [0, 1, 2]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name  # exact on the CPU, the generator and its random draws included


def test_a_pam_run_stopped_inside_its_inversion_resumes_the_round_where_it_stopped(fresh_bb: TinyBB, tmp_path,
                                                                                    monkeypatch, caplog) -> None:
    """The inversion runs for hours on a CPU before the first epoch checkpoint: it is saved within the round (at the
    end of each phase and every few minutes) and --resume continues it instead of starting again."""
    import fst_plugin.core.trigger_inversion as inversion_module

    class Stop(Exception):
        pass

    real_train_generator = inversion_module.train_generator

    def die(*args, **kwargs):
        raise Stop  # the process dies when round 1's generator phase begins (pretraining and mask saved)

    checkpoint = tmp_path / "ck" / "last.pt"
    config = _config(fresh_bb, save_name="inv", checkpoint_save=str(checkpoint.parent),
                     inversion_pretrain_steps=2, inversion_mask_steps=2, inversion_generator_steps=2)
    monkeypatch.setattr(inversion_module, "train_generator", die)
    with pytest.raises(Stop):
        run(prepare(config, load_attack_record(fresh_bb.record), "pam"))
    saved = torch.load(layout_file := checkpoint.parent / "inversion.pt", weights_only=False)
    assert saved["state"]["round"] == 1 and saved["state"]["inversion"]["phase"] == "generator"
    assert not checkpoint.is_file()  # no epoch had ended: only the inversion's state existed to resume from
    monkeypatch.setattr(inversion_module, "train_generator", real_train_generator)
    calls = []
    monkeypatch.setattr(inversion_module, "pretrain", lambda *a, **k: calls.append("pretrain"))
    with caplog.at_level("INFO"):
        resumed = run(prepare(dataclasses.replace(config, resume=True), load_attack_record(fresh_bb.record), "pam"))
    assert calls == []  # the pretraining was not redone
    assert any("round 1 continues at its generator phase, step 0" in r.getMessage() for r in caplog.records)
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2] and not layout_file.exists()


@pytest.mark.parametrize("key, value, words", [
    ("pam_rho", -0.5, "pam_rho"), ("reversed_fraction", 1.5, "reversed_fraction"),
    ("unlearn_rounds", 0, "unlearn_rounds"), ("pam", "maybe", "pam"), ("lr_scheduler", "StepLR", "lr_scheduler"),
])
def test_bad_pam_settings_are_refused_in_one_line(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({key: value})
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_cli_refuses_a_bad_pam_setting_with_exit_2_and_writes_nothing(fresh_bb: TinyBB) -> None:
    done = subprocess.run([sys.executable, "-m", "fst_plugin", "run", "pam", "--record", str(fresh_bb.record),
                           "--dataset_path", str(fresh_bb.data), "--device", "cpu", "--reversed_fraction", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "reversed_fraction" in lines[0], done.stderr
    assert not (fresh_bb.record / "defense").exists()
