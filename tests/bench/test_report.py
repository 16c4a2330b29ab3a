"""The report's edge cases (bench_scripts/report): a run shorter than a target's epoch is "not measured" rather than
a crash, and the leaders table tells noise-key Blended from image-keyed Blended."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench_scripts.report.side_by_side import leaders
from bench_scripts.report.targets import targets


def _record_with_fst_curve(root: Path, epochs: int) -> None:
    """``record/badnets_0.01_s0/defense/fst/``: the per-epoch CSV of an FST run of ``epochs`` epochs."""
    folder = root / "record" / "badnets_0.01_s0" / "defense" / "fst"
    folder.mkdir(parents=True)
    pd.DataFrame({"epoch": range(epochs), "test_acc": [0.8] * epochs,
                  "test_asr": np.linspace(0.5, 0.01, epochs)}).to_csv(folder / "fst_df.csv", index=False)
    (folder / "run_info.json").write_text(json.dumps({"before": {"test_acc": 0.85, "test_asr": 0.95}}))


def _results() -> pd.DataFrame:
    base = {"record": "badnets_0.01_s0", "attack": "badnets", "trigger_key": np.nan, "rate": 0.01}
    return pd.DataFrame([{**base, "variant": "none", "test_acc": 0.85, "test_asr": 0.95},
                         {**base, "variant": "fst", "test_acc": 0.8, "test_asr": 0.01}])


def test_a_run_shorter_than_the_epoch_3_target_is_not_measured_rather_than_a_crash(tmp_path):
    _record_with_fst_curve(tmp_path, epochs=2)
    text = targets(_results(), tmp_path)
    assert "- FST ASR ≤ 2% by epoch 3 on BadNets 1%: not measured (FST ran 2 epochs)" in text
    _record_with_fst_curve(tmp_path / "long", epochs=4)
    assert "epoch-3 ASR" in targets(_results(), tmp_path / "long")   # a long enough run is checked


def test_the_leaders_table_labels_noise_key_blended_as_such():
    rows = []
    for record, key in (("blended_0.01_s0", np.nan), ("blended-hello_kitty_0.01_s0", "hello_kitty")):
        base = {"record": record, "attack": "blended", "trigger_key": key, "rate": 0.01}
        rows += [{**base, "variant": "none", "test_acc": 0.86, "test_asr": 0.99},
                 {**base, "variant": "fst", "test_acc": 0.72, "test_asr": 0.02}]
    groups = [row["group"] for row in leaders(pd.DataFrame(rows))]
    assert groups == ["every low-rate record", "blended (noise key)", "blended (hello_kitty key)"]
