"""PAM on the benchmark grid (tiny protocol): ``run_defenses --methods pam fst-pam`` runs the pam defense with
the authors' optimiser and FST with PAM switched on, each in its own folder, and ``evaluate --retune`` re-measures
and retunes both. Proves the plumbing; measures nothing about PAM."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench_scripts.defenses import run as run_defenses
from bench_scripts.evaluation import evaluate
from bench_scripts.records import make as make_records
from bench_scripts.protocols import PAM_OPTIMISER, get_protocol, pam_run
from fst_plugin.demo import synthetic_images, write_image_folders
from fst_plugin.record.layout import DefenseLayout


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


def test_run_defenses_and_evaluate_cover_both_pam_variants(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    write_image_folders(data, "train", *synthetic_images(40, rng))
    write_image_folders(data, "test", *synthetic_images(10, rng))
    common = ["--protocol", "tiny", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results")]
    make_records.main(common + ["--data", str(data), "--attacks", "badnets:0.1"])
    run_defenses.main(common + ["--data", str(data), "--methods", "pam", "fst-pam"])
    record = tmp_path / "cache" / "tiny" / "record" / "badnets_0.1_s0"
    tiny = get_protocol("tiny")
    for variant, method in (("pam", "pam"), ("fst-pam", "fst")):
        layout = DefenseLayout.of(record, variant)
        info = json.loads(layout.run_info.read_text())
        assert info["method"] == method and info["pam"] is True and layout.trigger_generator.is_file()
        assert info["config"]["generator_filters"] == tiny.pam_settings["generator_filters"]
    assert json.loads(DefenseLayout.of(record, "pam").run_info.read_text())["config"]["sgd_momentum"] == 0.1
    df = evaluate.main(["--protocol", "tiny", "--cache", str(tmp_path / "cache"), "--data", str(data),
                        "--records", "badnets_0.1_s0", "--retune", "--retune-variants", "pam", "fst-pam",
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
