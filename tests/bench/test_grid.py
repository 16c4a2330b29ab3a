"""The grid as one command (bench_scripts.grid) on the local executor: with --retune, every model of a record is
retuned after its own defense, the clean reference record is made for it, results.csv holds the retuned columns, and
a second run finds every job done."""
from __future__ import annotations

import pandas as pd

from bench_scripts import grid
from bench_scripts.jobs.job import DONE, DONE_EARLIER
from fst_plugin.probes.config import CLEAN_REFERENCE


def test_the_grid_retunes_every_model_after_its_defense_and_a_second_run_finds_it_done(tiny_data, tmp_path):
    argv = ["--protocol", "tiny", "--data", str(tiny_data), "--cache", str(tmp_path / "cache"), "--results",
            str(tmp_path / "results"), "--attacks", "badnets:0.1", "--methods", "fst", "--retune"]
    first = {o.job: o for o in grid.main(argv).outcomes}
    assert list(first) == ["badnets_0.1_s0", "badnets_0_s0", "badnets_0.1_s0/fst", "badnets_0.1_s0/none/retune",
                           "badnets_0.1_s0/fst/retune", f"badnets_0.1_s0/{CLEAN_REFERENCE}/retune", "results.csv",
                           "table.md"]
    assert all(o.status == DONE for o in first.values())
    results = pd.read_csv(tmp_path / "results" / "results.csv").set_index("variant")
    assert set(results.index) == {"none", "fst", CLEAN_REFERENCE}
    assert results["retune_asr"].between(0, 1).all() and results.loc[CLEAN_REFERENCE, "source"] == "reference badnets_0_s0"
    again = grid.main(argv).outcomes
    assert [o.status for o in again] == [DONE_EARLIER] * 6 + [DONE, DONE]   # results and table are put together anew


def test_qra_on_a_record_with_too_few_poisoned_images_is_skipped_with_its_reason_not_failed(tiny_data, tmp_path):
    """The tiny record holds 40 poisoned images, fewer than QRA's set takes: each QRA job ends done, says why it ran
    nothing, and leaves the QRA columns empty (as evaluate --qra does), and the grid exits well."""
    argv = ["--protocol", "tiny", "--data", str(tiny_data), "--cache", str(tmp_path / "cache"), "--results",
            str(tmp_path / "results"), "--attacks", "badnets:0.1", "--methods", "fst", "--qra"]
    outcomes = {o.job: o for o in grid.main(argv).outcomes}
    qra = [o for name, o in outcomes.items() if name.endswith("/qra")]
    assert qra and all(o.status == DONE and o.note.startswith("not run: ") and "poisoned" in o.note for o in qra), qra
    results = pd.read_csv(tmp_path / "results" / "results.csv")
    assert results["retune_asr"].notna().any() and results.filter(like="qra_").isna().all().all()
