"""FST with alpha auto on the benchmark grid (tiny protocol): ``python -m bench_scripts.defenses --methods fst-auto`` runs FST with its
alpha chosen on held-out clean tuning data in its own folder, and ``evaluate`` reports the alpha it used. Proves the
plumbing; measures nothing about the choice."""
from __future__ import annotations

import json

from bench_scripts.defenses import run as run_defenses
from bench_scripts.evaluation import evaluate
from bench_scripts.protocols import ALPHA_VARIANTS, GRID_VARIANTS
from fst_plugin.record.layout import DefenseLayout
from tests.bench.conftest import TINY_RECORD, TinyGrid


def test_fst_auto_runs_in_its_own_folder_and_its_row_carries_the_alpha_it_chose(tiny_grid: TinyGrid, tmp_path):
    assert set(ALPHA_VARIANTS) <= set(GRID_VARIANTS)
    run_defenses.main(tiny_grid.args("--methods", "fst-auto"))
    record = tiny_grid.record()
    info = json.loads(DefenseLayout.of(record, "fst-auto").run_info.read_text())
    assert info["method"] == "fst" and info["config"]["alpha"] == "auto"
    assert info["alpha"] == info["alpha_choice"]["alpha"] > 0
    assert not DefenseLayout.of(record, "fst").folder.exists()
    df = evaluate.main(["--protocol", "tiny", "--cache", str(tiny_grid.cache), "--data", str(tiny_grid.data),
                        "--records", TINY_RECORD, "--out", str(tmp_path / "results.csv")])
    row = df[df.variant == "fst-auto"].iloc[0]
    assert row.method == "fst" and row.alpha == info["alpha"] and 0 <= row.test_asr <= 1
