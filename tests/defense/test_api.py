"""fst_plugin.api.run_defense: typed settings in, a DefenseResult out, the same validation as the command line."""
from __future__ import annotations

import pytest

from fst_plugin.defense.runner import DefenseResult
from fst_plugin.api import run_defense
from fst_plugin.errors import ConfigError
from fst_plugin.record.layout import DefenseLayout
from tests.builders import TinyBB


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
