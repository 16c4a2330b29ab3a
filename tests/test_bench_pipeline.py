"""The benchmark pipeline end to end on the ``tiny`` protocol (synthetic images, one attack epoch): records,
the defense grid, ablations, the one evaluator, diagnostics and the tables. Proves the scripts run and agree
with each other; measures nothing about FST."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_scripts/ lives at the repository root

from bench_scripts import ablations, diagnostics, evaluate, make_records, make_table, run_defenses  # noqa: E402
from bench_scripts.common import METHODS, make_trigger  # noqa: E402
from fst_plugin.demo import synthetic_images, write_image_folders  # noqa: E402
from fst_plugin.record import load_attack_record  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    data = root / "mydata"              # deliberately not called cifar10: the scripts must not care
    write_image_folders(data, "train", *synthetic_images(40, rng))
    write_image_folders(data, "test", *synthetic_images(10, rng))
    common = ["--protocol", "tiny", "--cache", str(root / "cache"), "--results", str(root / "results")]
    make_records.main(common + ["--data", str(data), "--attacks", "badnets:0.1", "sig:0.05"])
    run_defenses.main(common + ["--data", str(data)])
    ablations.main(common + ["--data", str(data), "--record", "badnets_0.1_s0"])
    evaluate.main(["--protocol", "tiny", "--cache", str(root / "cache"), "--data", str(data),
                   "--out", str(root / "results" / "results.csv")])
    diagnostics.main(common + ["--data", str(data), "--record", "badnets_0.1_s0"])
    make_table.main(["--protocol", "tiny", "--cache", str(root / "cache"), "--results", str(root / "results")])
    return root


def test_records_are_backdoorbench_records(bench):
    rec = load_attack_record(bench / "cache" / "tiny" / "record" / "sig_0.05_s0")
    info = json.loads(rec.extra["bench_json"])
    assert info["clean_label"] and info["n_poisoned"] == 20
    assert rec.bd_train is not None and int(rec.bd_train.poison_indicator.sum()) == 20
    assert all(img.bd_label == 0 and img.original_label != 0 for img in rec.bd_test.images)
    assert len(rec.bd_test.images) == 90 and rec.data_path == "./data/cifar10"


def test_evaluator_matches_training_time_check_and_covers_every_run(bench):
    df = pd.read_csv(bench / "results" / "results.csv")
    for record in ("badnets_0.1_s0", "sig_0.05_s0"):
        rec = load_attack_record(bench / "cache" / "tiny" / "record" / record)
        fast = json.loads(rec.extra["bench_json"])["fast_eval"]
        none = df[(df.record == record) & (df.variant == "none")].iloc[0]
        assert none.test_acc == pytest.approx(fast["test_acc"], abs=1e-4)  # the CSV keeps 5 decimals
        assert none.test_asr == pytest.approx(fast["test_asr"], abs=1e-4)
        assert set(METHODS) <= set(df[df.record == record].variant)
    variants = set(df[df.record == "badnets_0.1_s0"].variant)
    assert {"fst_alpha0", "fst_n20", "ft-init_n20", "fe-tuning_n20", "fst_noproj"} <= variants
    assert df[df.variant == "fst_n20"].iloc[0].n_clean == 20
    assert df[["test_acc", "test_asr", "test_ra", "sep_probe"]].notna().all().all()


def test_tables_and_figures(bench):
    text = (bench / "results" / "table.md").read_text()
    assert "| **average, all** |" in text and "FST C-Acc" in text and "## Targets" in text
    figs = bench / "results" / "figures"
    for name in ("tsne_badnets_0.1_s0.png", "efficiency_badnets_0.1_s0.png", "size_badnets_0.1_s0.png"):
        assert (figs / name).stat().st_size > 0
    steps = [json.loads(line)["step"] for line in (bench / "results" / "timings.jsonl").read_text().splitlines()]
    assert "make_record badnets_0.1_s0" in steps and "defense fst badnets_0.1_s0" in steps


@pytest.mark.parametrize("attack", ["badnets", "blended", "sig", "wanet"])
def test_triggers_are_deterministic_and_change_images(attack):
    x = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    a, b = make_trigger(attack, 0)(x), make_trigger(attack, 0)(x)
    assert a.dtype == np.uint8 and a.shape == x.shape and np.array_equal(a, b) and not np.array_equal(a, x)


def test_gpu_protocol_runs_on_a_tiny_subset_on_the_cpu(bench, tmp_path):
    """The paper-scale config (PreActResNet18, AMP) exercised end to end with CPU-sized overrides."""
    data = bench / "mydata"
    shrink = ["--set", "device=cpu", "epochs=1", "train_per_class=10", "test_per_class=5", "defense_epochs=1",
              "defense_ratio=0.1", "eval_subset=20", "num_workers=0"]
    common = ["--protocol", "gpu", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results")]
    make_records.main(common + ["--data", str(data), "--attacks", "wanet:0.1"] + shrink)
    run_defenses.main(common + ["--data", str(data), "--methods", "fst"] + shrink)
    df = evaluate.main(["--protocol", "gpu", "--cache", str(tmp_path / "cache"), "--data", str(data),
                        "--out", str(tmp_path / "results.csv")] + shrink)
    assert list(df.variant) == ["none", "fst"] and (df.model == "preactresnet18").all()
