"""FST with alpha auto on the benchmark grid (tiny protocol): ``python -m bench_scripts.defenses --methods fst-auto`` runs FST with its
alpha chosen on held-out clean tuning data in its own folder, and ``evaluate`` reports the alpha it used. Proves the
plumbing; measures nothing about the choice."""
from __future__ import annotations

import json

import numpy as np

from bench_scripts.defenses import run as run_defenses
from bench_scripts.evaluation import evaluate
from bench_scripts.records import make as make_records
from bench_scripts.protocols import ALPHA_VARIANTS, GRID_VARIANTS
from fst_plugin.demo import synthetic_images, write_image_folders
from fst_plugin.record.layout import DefenseLayout


def test_fst_auto_runs_in_its_own_folder_and_its_row_carries_the_alpha_it_chose(tmp_path):
    assert set(ALPHA_VARIANTS) <= set(GRID_VARIANTS)
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    write_image_folders(data, "train", *synthetic_images(40, rng))
    write_image_folders(data, "test", *synthetic_images(10, rng))
    common = ["--protocol", "tiny", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results")]
    make_records.main(common + ["--data", str(data), "--attacks", "badnets:0.1"])
    run_defenses.main(common + ["--data", str(data), "--methods", "fst-auto"])
    record = tmp_path / "cache" / "tiny" / "record" / "badnets_0.1_s0"
    info = json.loads(DefenseLayout.of(record, "fst-auto").run_info.read_text())
    assert info["method"] == "fst" and info["config"]["alpha"] == "auto"
    assert info["alpha"] == info["alpha_choice"]["alpha"] > 0
    assert not DefenseLayout.of(record, "fst").folder.exists()
    df = evaluate.main(["--protocol", "tiny", "--cache", str(tmp_path / "cache"), "--data", str(data),
                        "--records", "badnets_0.1_s0", "--out", str(tmp_path / "results.csv")])
    row = df[df.variant == "fst-auto"].iloc[0]
    assert row.method == "fst" and row.alpha == info["alpha"] and 0 <= row.test_asr <= 1
