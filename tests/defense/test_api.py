"""fst_plugin.api.run_defense: typed settings in, a DefenseResult out, the same validation as the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fst_plugin.adapter import defenses
from fst_plugin.defense.runner import DefenseResult
from fst_plugin.api import run_defense
from fst_plugin.errors import ConfigError
from fst_plugin.record.layout import DefenseLayout
from tests.builders import TinyBB, record_on


def test_run_defense_writes_a_named_variant_and_evaluates_on_the_seeded_subset(fresh_bb: TinyBB) -> None:
    ws = fresh_bb
    result = run_defense("lp", ws.record, dataset_path=str(ws.data), device="cpu", num_workers=0,
                         epochs=1, ratio=0.5, save_name="lp_variant", eval_subset=7)
    layout = DefenseLayout.of(ws.record.resolve(), "lp_variant", "lp")
    assert isinstance(result, DefenseResult) and result.method == "lp"
    assert result.save_path == layout.folder and layout.finished and layout.csv.is_file()
    assert not DefenseLayout.of(ws.record, "lp").folder.exists()
    # 7 of the clean and 7 of the poisoned test images: every rate is a multiple of 1/7
    assert all(round(7 * result.after[k], 6) == round(7 * result.after[k]) for k in ("test_acc", "test_asr"))


def test_run_defense_refuses_a_setting_that_is_no_config_key(fresh_bb: TinyBB) -> None:
    with pytest.raises(ConfigError, match="'epoch'"):
        run_defense("lp", fresh_bb.record, epoch=1)


def test_run_defense_validates_values_like_the_command_line(fresh_bb: TinyBB) -> None:
    with pytest.raises(ConfigError, match="'amp' is 'yes'"):
        run_defense("lp", fresh_bb.record, amp="yes")
    assert not (fresh_bb.record / "defense").exists()


def test_run_defense_takes_the_yaml_shipped_for_the_records_dataset_and_the_keywords_win(
        bb: TinyBB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = record_on(bb, "gtsrb", tmp_path)
    seen: dict[str, Any] = {}

    def stop_before_the_run(config: Any, *_: Any) -> None:  # the settings are all this test reads
        seen["config"] = config
        raise ConfigError("stopped before the run", "nothing to fix")

    monkeypatch.setattr(defenses, "prepare", stop_before_the_run)
    with pytest.raises(ConfigError, match="stopped before the run"):
        run_defense("fst", record, epochs=2)
    config = seen["config"]
    assert (config.alpha, config.epochs, config.dataset, config.record) == (0.1, 2, "gtsrb", str(record))
    assert config.yaml_path.endswith("fst/gtsrb.yaml")


def test_run_defense_refuses_a_record_whose_dataset_has_no_shipped_yaml(bb: TinyBB, tmp_path: Path) -> None:
    record = record_on(bb, "mnist", tmp_path)
    with pytest.raises(ConfigError, match="the record's dataset 'mnist'.*Fix: pass --yaml_path"):
        run_defense("pam", record, epochs=1)
    assert not (record / "defense").exists()
