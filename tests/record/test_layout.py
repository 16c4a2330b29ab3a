"""The layout's rule for a finished record: ``attack_result.pt`` is written last, so a folder without it is a record
still training (or one that failed) and is never listed as finished."""
from __future__ import annotations

from pathlib import Path

from fst_plugin.record.layout import DefenseLayout, finished_records, is_finished, record_dir


def test_finished_records_lists_only_records_with_their_attack_result(tmp_path: Path) -> None:
    for name in ("sig_0.01_s0", "badnets_0.01_s0", "training_0.01_s0"):
        record_dir(tmp_path, name).mkdir(parents=True)
    for name in ("sig_0.01_s0", "badnets_0.01_s0"):
        (record_dir(tmp_path, name) / "attack_result.pt").write_bytes(b"x")
    assert [p.name for p in finished_records(tmp_path)] == ["badnets_0.01_s0", "sig_0.01_s0"]
    assert not is_finished(record_dir(tmp_path, "training_0.01_s0"))
    assert finished_records(tmp_path / "no_such_root") == []


def test_retune_info_sits_beside_the_retuned_model(tmp_path: Path) -> None:
    fst = DefenseLayout.of(record_dir(tmp_path, "r"), "fst")
    assert fst.retune_info == tmp_path / "record/r/defense/fst/retune/run_info.json"
    assert fst.retune_info.parent == fst.retune_result.parent
