"""BackdoorBench's face (fst_plugin.adapter.defenses): a run without --yaml_path takes its method's shipped yaml
for the record's dataset with the command line on top, reads the record once, and says so in its first log line
(issue 29). These build the defense and read its settings; none of them tunes."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fst_plugin.adapter import defenses
from fst_plugin.adapter.defenses import FST, PAM
from fst_plugin.defense.config import DefenseConfig
from fst_plugin.defense.shipped import shipped_config
from tests.builders import RECORD_NAME, TinyBB, defense_args, record_on


def test_pam_on_a_cifar10_record_takes_its_shipped_yaml_and_the_command_line_wins(bb: TinyBB) -> None:
    shipped = PAM(defense_args(PAM, "--record", str(bb.record))).config
    assert (shipped.epochs, shipped.ratio, shipped.lr, shipped.lr_scheduler) == (90, 0.05, 0.01, "ConstantLR")
    assert shipped.yaml_path == str(shipped_config("pam", "cifar10"))
    tuned = PAM(defense_args(PAM, "--record", str(bb.record), "--epochs", "3", "--ratio", "0.25")).config
    assert (tuned.epochs, tuned.ratio, tuned.lr) == (3, 0.25, 0.01)


def test_fst_on_a_gtsrb_record_takes_the_gtsrb_yaml_and_the_command_line_wins(bb: TinyBB, tmp_path: Path) -> None:
    record = record_on(bb, "gtsrb", tmp_path)
    shipped = FST(defense_args(FST, "--record", str(record))).config
    assert (shipped.alpha, shipped.epochs, shipped.dataset) == (0.1, 15, "gtsrb")
    assert shipped.yaml_path == str(shipped_config("fst", "gtsrb"))
    assert FST(defense_args(FST, "--record", str(record), "--alpha", "0.3")).config.alpha == 0.3


def test_backdoorbenchs_result_file_finds_the_record_and_its_dataset_from_the_working_folder(
        bb: TinyBB, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bb.root)  # BackdoorBench's launchers run from its root: record/<result_file>
    config = PAM(defense_args(PAM, "--result_file", RECORD_NAME)).config
    assert (config.epochs, config.yaml_path) == (90, str(shipped_config("pam", "cifar10")))


def test_a_mapping_of_overrides_resolves_like_the_command_line_and_a_ready_config_is_taken_as_it_is(
        bb: TinyBB) -> None:
    assert PAM({"record": str(bb.record), "epochs": 2}).config.epochs == 2
    built = PAM(DefenseConfig(record=str(bb.record), epochs=7))
    assert built.config.epochs == 7 and built.config.yaml_path is None
    assert built.settings_origin == "settings: the DefenseConfig defaults (a DefenseConfig built by the caller)"


def test_the_record_is_read_once_to_choose_the_settings_and_to_run(bb: TinyBB,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    real = defenses.load_attack_record
    monkeypatch.setattr(defenses, "load_attack_record", lambda *a, **k: reads.append(a) or real(*a, **k))
    defense = PAM(defense_args(PAM, "--record", str(bb.record)))
    defense.set_result(defense.config.result_file)  # what defense() and the launcher do next
    assert len(reads) == 1 and defense.result is not None and defense.result.clean_data == "cifar10"


def test_the_first_log_line_names_the_yaml_taken_and_why(bb: TinyBB, caplog: pytest.LogCaptureFixture) -> None:
    defense = PAM(defense_args(PAM, "--record", str(bb.record)))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        try:
            defense.set_logger()
        finally:
            defense.logs.close()
    assert caplog.messages[0] == (f"settings: {shipped_config('pam', 'cifar10')} (shipped for pam on cifar10, the "
                                  f"record's dataset; no --yaml_path), command line on top")
    assert "'epochs': 90" in caplog.messages[1]  # then the config itself
