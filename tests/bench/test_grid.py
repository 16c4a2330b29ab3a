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
