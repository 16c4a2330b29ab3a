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


def test_the_alpha_auto_section_checks_point_4_per_record_against_ft_init():
    """Within 1.5 points of FT-init's C-Acc with ASR ≤ 2% is MET; 2 points below, or 3% ASR, is MISSED; a record
    without an FT-init run is shown but not counted; no fst-auto row, no section."""
    from bench_scripts.report.targets import alpha_auto_section

    rows = []
    for record, auto_acc, auto_asr in (("badnets_0.005_s0", 0.805, 0.015), ("badnets_0.01_s0", 0.80, 0.01),
                                       ("blended_0.005_s0", 0.81, 0.03)):
        base = {"record": record, "attack": record.split("_")[0], "trigger_key": np.nan,
                "rate": float(record.split("_")[1]), "defense_wall_s": 100.0, "retune_asr": 0.5}
        rows += [{**base, "variant": "ft-init", "test_acc": 0.82, "test_asr": 0.04, "alpha": 0.0},
                 {**base, "variant": "fst", "test_acc": 0.72, "test_asr": 0.005, "alpha": 0.2},
                 {**base, "variant": "fst-auto", "test_acc": auto_acc, "test_asr": auto_asr, "alpha": 0.05}]
    rows.append({"record": "sig_0.01_s0", "attack": "sig", "trigger_key": np.nan, "rate": 0.01, "variant": "fst-auto",
                 "test_acc": 0.8, "test_asr": 0.5, "alpha": 0.05, "defense_wall_s": 90.0})
    df = pd.DataFrame(rows)
    text = alpha_auto_section(df)
    verdicts = {line.split(" | ")[0].strip("| "): line.rsplit(" | ", 1)[1].strip(" |")
                for line in text.splitlines() if line.startswith("| ") and "_s0" in line}
    assert verdicts == {"badnets_0.005_s0": "MET", "badnets_0.01_s0": "MISSED", "blended_0.005_s0": "MISSED",
                        "sig_0.01_s0": "–"}
    assert "Point 4 for fst-auto:" in text and "on 1 of 3 records with both runs" in text and "| 1.50 |" in text
    strength = df[df["variant"] == "fst-auto"].assign(variant="fst-s2", test_asr=0.01)   # a second choice: its own line
    text = alpha_auto_section(pd.concat([df, strength]))
    assert "Point 4 for fst-s2: C-Acc within 1.5 points of FT-init's and ASR ≤ 2% on 2 of 3 records" in text
    assert alpha_auto_section(df[df["variant"] != "fst-auto"]) is None
