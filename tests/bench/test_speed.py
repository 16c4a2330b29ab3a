"""bench_scripts/speed/ end to end on the tiny bb record (what it writes, not how fast it is)."""
from __future__ import annotations

import csv
from pathlib import Path

from bench_scripts.speed import run as speed
from tests.builders import TinyBB


def test_speed_writes_one_csv_row_per_measurement_and_leaves_the_record_untouched(
        bb: TinyBB, tmp_path: Path) -> None:
    before = sorted(p.relative_to(bb.record) for p in bb.record.rglob("*"))
    code = speed.main(["--record", str(bb.record), "--dataset_path", str(bb.data),
                       "--device", "cpu", "--epochs", "1", "--ratio", "0.2", "--repeats", "1",
                       "--attack-images", "64", "--out", str(tmp_path), "--csv-name", "tiny.csv"])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "tiny.csv")))
    assert [r["measure"] for r in rows] == ["limit", "tensor", "backdoorbench", "attack", "attack_limit"]
    by_measure = {r["measure"]: r for r in rows}
    assert by_measure["tensor"]["note"] == "plan.input_pipeline=tensor"
    assert by_measure["backdoorbench"]["note"] == "plan.input_pipeline=backdoorbench"
    for row in rows:
        assert float(row["per_epoch_s"]) > 0 and float(row["peak_rss_mb"]) > 0
    assert int(by_measure["tensor"]["n_tune"]) == int(by_measure["limit"]["n_tune"]) == 40
    assert by_measure["tensor"]["n_eval"] == by_measure["backdoorbench"]["n_eval"] == by_measure["limit"]["n_eval"]
    assert sorted(p.relative_to(bb.record) for p in bb.record.rglob("*")) == before
