"""PAM on the benchmark grid (tiny protocol): ``run_defenses --methods pam fst-pam`` runs the pam defense with
the authors' optimiser and FST with PAM switched on, each in its own folder, and ``evaluate --retune`` re-measures
and retunes both. Proves the plumbing; measures nothing about PAM."""
from __future__ import annotations

import json

from bench_scripts.defenses import run as run_defenses
from bench_scripts.evaluation import diagnostics, evaluate
from bench_scripts.protocols import PAM_OPTIMISER, get_protocol, pam_run
from fst_plugin.record.layout import DefenseLayout
from tests.bench.conftest import TINY_RECORD, TinyGrid


def test_pam_variants_take_their_settings_from_the_protocol():
    cpu = get_protocol("cpu")
    mode, settings = pam_run("pam", cpu)
    assert mode == "pam" and settings["epochs"] == cpu.pam_epochs and settings["pam"] == "on"
    assert all(settings[k] == v for k, v in PAM_OPTIMISER.items())
    mode, settings = pam_run("fst-pam", cpu)
    assert mode == "fst" and "epochs" not in settings and "lr" not in settings  # FST's own optimiser
    # the CPU runs PAM at the authors' budget (the shipped yaml's steps and generator): only the precision differs
    assert settings["amp"] is True and not any(k.startswith("inversion_") or k == "generator_filters" for k in settings)
    assert cpu.pam_epochs == 90


def test_run_defenses_and_evaluate_cover_both_pam_variants(tiny_grid: TinyGrid, tmp_path):
    run_defenses.main(tiny_grid.args("--methods", "pam", "fst-pam"))
    record = tiny_grid.record()
    tiny = get_protocol("tiny")
    for variant, method in (("pam", "pam"), ("fst-pam", "fst")):
        layout = DefenseLayout.of(record, variant)
        info = json.loads(layout.run_info.read_text())
        assert info["method"] == method and info["pam"] is True and layout.trigger_generator.is_file()
        assert info["config"]["generator_filters"] == tiny.pam_settings["generator_filters"]
    assert json.loads(DefenseLayout.of(record, "pam").run_info.read_text())["config"]["sgd_momentum"] == 0.1
    df = evaluate.main(["--protocol", "tiny", "--cache", str(tiny_grid.cache), "--data", str(tiny_grid.data),
                        "--records", TINY_RECORD, "--retune", "--retune-variants", "pam", "fst-pam",
                        "--out", str(tmp_path / "results.csv")])
    for variant in ("pam", "fst-pam"):
        row = df[df.variant == variant].iloc[0]
        assert 0 <= row.test_asr <= 1 and 0 <= row.retune_asr <= 1
        detected = json.loads(DefenseLayout.of(record, variant).run_info.read_text())["pam_inversion"][0]
        assert row.pam_detected_class == detected["detected_class"]
        assert row.pam_target_found == (detected["detected_class"] == 0)  # the tiny grid's records target class 0
        assert 0 <= row.pam_share_to_detected <= 1 and 0 <= row.pam_mask_saturation <= 1
        assert DefenseLayout.of(record, variant).retune_result.is_file()
    assert df[df.variant == "none"].retune_asr.isna().all()  # only the variants asked for were retuned

    # why the inversion finds the target or not: the trigger, PAM's saved generator and noise on its own objective
    diagnostics.main(tiny_grid.args("--record", TINY_RECORD, "--no-tsne", "--inversion-split"))
    split = json.loads((tiny_grid.results / f"inversion_split_{TINY_RECORD}.json").read_text())
    directions = split["directions"]
    assert set(directions) == {f"{d}{at}" for d in ("trigger", "gaussian noise", "PAM's generator")
                               for at in ("", " at the bound")}
    assert 0 < split["mask_backdoor_area"] < 1 and "global" in split["split"]   # the map before the pooling
    for name, row in directions.items():
        assert 0 <= row["backdoor_share"] <= 1 and 0 < row["top_share"] <= 1 and row["pixel_mse"] > 0
        if name.endswith("at the bound"):
            assert abs(row["pixel_mse"] - 0.999 * split["norm_bound"]) < 1e-3 * split["norm_bound"]
