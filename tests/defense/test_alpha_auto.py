"""``alpha: auto`` through the runner on the tiny record: it reads only the clean tuning set, its choice lands in
run_info.json and in the checkpoint (so a resumed run keeps it), and the word round-trips through yaml and flags."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import fst_plugin.defense.runner as runner
from fst_plugin.defense.config import add_arguments, build_config, load_config, overrides_from
from fst_plugin.defense.runner import prepare, run, select_alpha
from fst_plugin.errors import ConfigError
from fst_plugin.options import as_text
from fst_plugin.defense.config import SPECS
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import DefenseLayout
from tests.builders import TinyBB, run_cli


def _config(ws: TinyBB, **more: object):
    return build_config({"record": str(ws.record), "dataset_path": str(ws.data), "device": "cpu", "num_workers": 0,
                         "epochs": 2, "ratio": 0.25, "batch_size": 16, "alpha": "auto", **more})


def _plan(ws: TinyBB, method: str = "fst", **more: object):
    return prepare(_config(ws, **more), load_attack_record(ws.record), method)


class Untouchable:
    """A loader that fails the test when anything iterates over it."""

    def __iter__(self):
        raise AssertionError("alpha auto read a test or poisoned loader")


def test_alpha_auto_chooses_on_a_partition_of_the_tuning_set_and_reads_no_test_or_poisoned_data(
        bb: TinyBB) -> None:
    plan = _plan(bb)
    data = plan.alpha_data
    fit, held_out = set(data.fit.tolist()), set(data.held_out.tolist())
    assert fit | held_out == set(plan.indices.tolist()) and not fit & held_out
    assert len(held_out) == round(0.2 * len(plan.indices))
    plan.clean_loader, plan.bd_loader = Untouchable(), Untouchable()
    choice = select_alpha(plan)
    assert choice.held_out_images == len(held_out) and choice.alpha == choice.strength / choice.head_norm_sq


def test_a_run_with_alpha_auto_records_its_choice_and_ends_as_a_run_given_that_alpha(fresh_bb: TinyBB) -> None:
    auto = run(_plan(fresh_bb, save_name="auto"))
    info = json.loads(DefenseLayout.of(fresh_bb.record, "auto").run_info.read_text())
    choice = info["alpha_choice"]
    assert info["config"]["alpha"] == "auto" and info["alpha"] == choice["alpha"] == auto.alpha
    assert choice["seconds"] > 0 and choice["reference"]["alpha"] == 0.0 and choice["trials"]
    assert all({"strength", "alpha", "held_out_acc", "held_out_loss", "paired_se", "seconds"} <= set(t)
               for t in choice["trials"])
    assert auto.wall_time_s >= choice["seconds"] + auto.tuning_time_s - 1e-6
    given = run(_plan(fresh_bb, save_name="given", alpha=auto.alpha))
    assert given.alpha_choice is None and given.alpha == auto.alpha
    for (name, a), b in zip(auto.model.state_dict().items(), given.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_mode_without_the_penalty_ignores_alpha_auto(fresh_bb: TinyBB) -> None:
    plan = _plan(fresh_bb, "ft-init")
    assert plan.alpha_data is None
    result = run(plan)
    assert result.alpha_choice is None
    assert json.loads(DefenseLayout.of(fresh_bb.record, "ft-init").run_info.read_text())["alpha_choice"] is None


def test_a_resumed_alpha_auto_run_keeps_its_choice_and_ends_where_an_uninterrupted_one_does(
        fresh_bb: TinyBB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = run(_plan(fresh_bb, save_name="whole", epochs=3))

    class Stop(Exception):
        pass

    def stop_after_one(state):
        raise Stop

    checkpoint = tmp_path / "ck"
    with pytest.raises(Stop):
        run(_plan(fresh_bb, save_name="resumed", epochs=3, checkpoint_save=str(checkpoint)), on_epoch_end=stop_after_one)
    monkeypatch.setattr(runner, "choose_alpha", lambda *a, **k: pytest.fail("the resumed run chose alpha again"))
    plan = _plan(fresh_bb, save_name="resumed", epochs=3, checkpoint_save=str(checkpoint), resume=True)
    assert plan.alpha_data is None and plan.alpha_choice.alpha == whole.alpha and plan.resume.epochs_done == 1
    resumed = run(plan)
    assert resumed.alpha == whole.alpha and [row["epoch"] for row in resumed.history] == [0, 1, 2]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_run_stopped_after_choosing_alpha_resumes_with_that_choice_from_epoch_zero(
        fresh_bb: TinyBB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    checkpoint = tmp_path / "ck"
    with monkeypatch.context() as patch:
        patch.setattr(runner, "tune", stop)  # the choice is made, then the tuning dies before its first epoch ends
        with pytest.raises(Stop):
            run(_plan(fresh_bb, checkpoint_save=str(checkpoint)))
    first = torch.load(checkpoint / "last.pt", weights_only=False)
    assert first["state"] is None and first["alpha_choice"]["alpha"] > 0
    monkeypatch.setattr(runner, "choose_alpha", lambda *a, **k: pytest.fail("the resumed run chose alpha again"))
    plan = _plan(fresh_bb, checkpoint_save=str(checkpoint), resume=True)
    assert plan.resume is None and plan.alpha_choice.alpha == first["alpha_choice"]["alpha"]
    assert run(plan).alpha == first["alpha_choice"]["alpha"]


@pytest.mark.parametrize("in_yaml, flag, parsed",
                         [("auto", "AUTO", "auto"), ("strength=2", "strength=2.0", "strength=2")])
def test_alpha_auto_and_a_strength_round_trip_through_yaml_and_the_command_line(
        in_yaml: str, flag: str, parsed: str, tmp_path: Path) -> None:
    path = tmp_path / "fst.yaml"
    path.write_text(f"alpha: {in_yaml}\nalpha_budget: 0.02\n")
    assert load_config({"yaml_path": str(path)}).alpha == parsed
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    from_flags = build_config({"alpha": 0.2}, overrides_from(parser.parse_args(["--alpha", flag])))
    assert from_flags.alpha == parsed and as_text(SPECS["alpha"], from_flags.alpha) == parsed
    assert build_config({}, overrides_from(parser.parse_args(["--alpha", "0.05"]))).alpha == 0.05
    assert as_text(SPECS["alpha"], 0.2) == "0.2"


def test_a_run_with_a_strength_tunes_with_it_over_the_backdoored_heads_squared_norm(fresh_bb: TinyBB) -> None:
    """alpha: strength=S runs FST with alpha = S / ||W0||^2 of the record's head, without a search, and ends as a
    run given that number."""
    from fst_plugin.core.alpha import head_norm_sq

    plan = _plan(fresh_bb, save_name="s2", alpha="strength=2")
    assert plan.alpha_data is None   # nothing to choose
    expected = 2 / head_norm_sq(plan.head)
    scaled = run(plan)
    info = json.loads(DefenseLayout.of(fresh_bb.record, "s2").run_info.read_text())
    assert info["config"]["alpha"] == "strength=2" and info["alpha"] == pytest.approx(expected) == scaled.alpha
    assert scaled.alpha_choice is None
    given = run(_plan(fresh_bb, save_name="given", alpha=scaled.alpha))
    for (name, a), b in zip(scaled.model.state_dict().items(), given.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("value, words", [("autoo", "'autoo'"), (-1, "-1"), (True, "True"), ("nan", "'nan'"),
                                          ("strength=0", "'strength=0'"), ("strength=two", "'strength=two'")])
def test_a_bad_alpha_is_refused_in_one_line(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"alpha": value})
    message = str(caught.value)
    fix = "strength=2" if str(value).startswith("strength") else "auto"   # the fix names the form meant
    assert "'alpha'" in message and words in message and fix in message and "\n" not in message


def test_the_command_line_refuses_a_misspelt_auto_with_exit_2_and_one_line(bb: TinyBB, tmp_path: Path) -> None:
    result = run_cli(["run", "fst", "--record", str(bb.record), "--dataset_path", str(bb.data), "--device", "cpu",
                      "--alpha", "autoo"], cwd=tmp_path)
    assert result.returncode == 2 and len(result.error_lines) == 1 and "'alpha'" in result.error_lines[0]
    assert "Traceback" not in result.stderr and not (bb.record / "defense").exists()
