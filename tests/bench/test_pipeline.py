"""The benchmark pipeline end to end on the ``tiny`` protocol (synthetic images, one attack epoch): records,
the defense grid, ablations, the one evaluator, diagnostics and the tables. Proves the scripts run and agree
with each other; measures nothing about FST."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("sklearn")

from bench_scripts.defenses import ablations
from bench_scripts.defenses import run as run_defenses
from bench_scripts.evaluation import diagnostics, evaluate
from bench_scripts.records import make as make_records
from bench_scripts.report import make_table
from bench_scripts.common import make_trigger
from bench_scripts.protocols import METHODS, get_protocol
from bench_scripts.report.tables import row_label
from fst_plugin.data import materialise
from tests.bench.conftest import write_tiny_data
from fst_plugin.record import load_attack_record


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = write_tiny_data(root / "mydata")   # deliberately not called cifar10: the scripts must not care
    common = ["--protocol", "tiny", "--cache", str(root / "cache"), "--results", str(root / "results")]
    make_records.main(common + ["--data", str(data), "--attacks", "badnets:0.1", "sig:0.05"])
    run_defenses.main(common + ["--data", str(data)])
    ablations.main(common + ["--data", str(data), "--record", "badnets_0.1_s0"])
    evaluate.main(["--protocol", "tiny", "--cache", str(root / "cache"), "--data", str(data),
                   "--out", str(root / "results" / "results.csv")])
    diagnostics.main(common + ["--data", str(data), "--record", "badnets_0.1_s0", "--fresh-head", "--layers", "fst"])
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
    assert {"fst_alpha0", "fst_n20", "ft-init_n20", "fe-tuning_n20", "fst_noproj", "fst_atmost"} <= variants
    assert df[df.variant == "fst_n20"].iloc[0].n_clean == 20
    assert df[["test_acc", "test_asr", "test_ra", "feat_target_share", "feat_true_share"]].notna().all().all()


def test_tables_and_figures(bench):
    text = (bench / "results" / "table.md").read_text()
    assert "| **average, all** |" in text and "FST C-Acc" in text and "## Targets" in text
    figs = bench / "results" / "figures"
    for name in ("tsne_badnets_0.1_s0.png", "efficiency_badnets_0.1_s0.png", "size_badnets_0.1_s0.png"):
        assert (figs / name).stat().st_size > 0
    steps = [json.loads(line)["step"] for line in (bench / "results" / "timings.jsonl").read_text().splitlines()]
    assert "make_record badnets_0.1_s0" in steps and "defense fst badnets_0.1_s0" in steps
    probe = json.loads((bench / "results" / "fresh_head_badnets_0.1_s0.json").read_text())
    assert 0.0 <= probe["fresh_head_acc"] <= 1.0 and probe["w0_norm"] > 0 and probe["tuning_images"] == 100
    assert "## Fresh head on frozen features" in text
    layers = json.loads((bench / "results" / "layers_badnets_0.1_s0.json").read_text())
    assert set(layers["models"]) == {"none", "fst"} and "## Where the trigger lives (per stage)" in text
    for stages in layers["models"].values():
        assert all(0.0 <= v["trigger_probe_acc"] <= 1.0 and 0.0 <= v["target_share"] <= 1.0 for v in stages.values())


def test_materialise_keeps_every_field_of_every_item():
    """The per-epoch evaluation subset is decoded once into tensors: same images, labels and BackdoorBench's
    extra fields (original index, poison flag, original label), in order."""
    images = torch.randn(5, 3, 4, 4)
    items = [(images[i], 0, i + 10, 1, i % 3) for i in range(5)]
    data = materialise(torch.utils.data.Subset(items, [4, 1, 3]))
    assert len(data) == 3 and len(data.tensors) == 5
    img, label, index, flag, orig = data[0]
    assert torch.equal(img, images[4]) and (int(label), int(index), int(flag), int(orig)) == (0, 14, 1, 1)
    assert data.tensors[2].tolist() == [14, 11, 13]


@pytest.mark.parametrize("attack", ["badnets", "blended", "sig", "wanet"])
def test_triggers_are_deterministic_and_change_images(attack):
    x = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    a, b = make_trigger(attack, 0)(x), make_trigger(attack, 0)(x)
    assert a.dtype == np.uint8 and a.shape == x.shape and np.array_equal(a, b) and not np.array_equal(a, x)


def test_an_image_keyed_blended_record_is_its_own_record(bench, tmp_path):
    """--blend-pattern IMAGE gives ``blended-<stem>_…``: it must not be served from the noise-key record's cache,
    and the table labels it by its key."""
    from PIL import Image

    key = tmp_path / "flower.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(key)
    common = ["--protocol", "tiny", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results"),
              "--data", str(bench / "mydata"), "--attacks", "blended:0.1"]
    noise_dir, = make_records.main(common)
    image_dir, = make_records.main(common + ["--blend-pattern", str(key)])
    assert (noise_dir.name, image_dir.name) == ("blended_0.1_s0", "blended-flower_0.1_s0")
    noise, image = load_attack_record(noise_dir), load_attack_record(image_dir)
    assert json.loads(image.extra["bench_json"])["trigger_key"] == "flower"
    assert json.loads(noise.extra["bench_json"])["trigger_key"] is None
    first = [np.asarray(Image.open(rec.bd_test.images[0].path)) for rec in (noise, image)]
    assert not np.array_equal(*first)
    assert row_label("blended", 0.01, "flower") == "blended (flower key) 1%"
    assert row_label("blended", 0.01, float("nan")) == "blended 1%"  # a CSV's empty cell


def test_a_record_trained_another_way_is_its_own_record(bench, tmp_path):
    """``--epochs N`` or ``--set model=…`` trains other records than the protocol's: they live in their own cache
    folder (``tiny+epochs=2``), are never served from the protocol's, and the defenses and the evaluator given the
    same settings find them there. Settings that only change the defenses keep the protocol's folder."""
    cache = tmp_path / "cache"
    common = ["--protocol", "tiny", "--cache", str(cache), "--results", str(tmp_path / "results"),
              "--data", str(bench / "mydata")]
    plain, = make_records.main(common + ["--attacks", "badnets:0.1"])
    longer, = make_records.main(common + ["--attacks", "badnets:0.1", "--epochs", "2"])
    assert plain == cache / "tiny" / "record" / "badnets_0.1_s0"
    assert longer == cache / "tiny+epochs=2" / "record" / "badnets_0.1_s0"
    assert [len(json.loads(load_attack_record(d).extra["bench_json"])["epochs"]) for d in (plain, longer)] == [1, 2]
    run_defenses.main(common + ["--methods", "ft-init", "--set", "epochs=2", "defense_epochs=1"])
    assert (longer / "defense" / "ft-init" / "defense_result.pt").is_file() and not (plain / "defense").exists()
    df = evaluate.main(["--protocol", "tiny", "--cache", str(cache), "--data", str(bench / "mydata"),
                        "--out", str(tmp_path / "results.csv"), "--set", "epochs=2"])
    assert list(df.variant) == ["none", "ft-init"] and set(df.record) == {"badnets_0.1_s0"}
    assert get_protocol("cpu", defense_ratio=0.05, job_cpus=1, epochs=10).cache_folder == "cpu"
    assert get_protocol("cpu", model="resnet18", lr=0.05).cache_folder == "cpu+model=resnet18+lr=0.05"


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


FAKE_BB_DEFENSE = '''
"""Stands in for a BackdoorBench defense script: reads the record the way BackdoorBench does (paths relative to
its root, PNG folders from bd_test's save_folder_path) and writes a defense_result.pt in its format."""
import argparse, os, sys
from pathlib import Path
import torch
p = argparse.ArgumentParser()
for flag in ("--result_file", "--dataset", "--yaml_path", "--model", "--device", "--num_workers", "--ratio", "--epochs",
             "--amp"):
    p.add_argument(flag)
a = p.parse_args()
assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
assert Path(a.yaml_path).is_file(), a.yaml_path
record = Path("record") / a.result_file
res = torch.load(record / "attack_result.pt", weights_only=False)
folder = Path(res["bd_test"]["bd_data_container"]["save_folder_path"])
pngs = sorted(folder.rglob("*.png"))
assert pngs, f"no PNGs under {folder} (relative to {os.getcwd()})"
out = record / "defense" / Path(sys.argv[0]).stem
out.mkdir(parents=True, exist_ok=True)
torch.save({"model_name": res["model_name"], "num_classes": res["num_classes"], "model": res["model"],
            "epochs_arg": a.epochs, "amp_arg": a.amp, "model_arg": a.model}, out / "defense_result.pt")
'''


def test_backdoorbench_builtins_run_from_its_root_on_our_records(bench, tmp_path):
    """--backdoorbench: the record is linked under <BB>/record/ by its own name (its PNG paths are relative to
    BackdoorBench's root), each built-in is run there with --bb-args, and its result joins results.csv."""
    bb = tmp_path / "BackdoorBench"
    for name in ("ft", "ft-sam"):
        (bb / "defense").mkdir(parents=True, exist_ok=True)
        (bb / "defense" / f"{name}.py").write_text(FAKE_BB_DEFENSE)
        (bb / "config" / "defense" / name).mkdir(parents=True)
        (bb / "config" / "defense" / name / "cifar10.yaml").write_text("epochs: 20\n")
    data = bench / "mydata"
    common = ["--protocol", "tiny", "--cache", str(bench / "cache"), "--results", str(tmp_path / "results")]
    run_defenses.main(common + ["--data", str(data), "--records", "badnets_0.1_s0", "--methods",
                                "--backdoorbench", str(bb), "--bb-defenses", "ft", "ft-sam", "--bb-args=--amp False"])
    record = bench / "cache" / "tiny" / "record" / "badnets_0.1_s0"
    assert (bb / "record" / "badnets_0.1_s0").resolve() == record.resolve()
    for name in ("ft", "ft-sam"):   # the yaml's 20 epochs capped at the tiny protocol's bb_epochs
        saved = torch.load(record / "defense" / name / "defense_result.pt", weights_only=True)
        assert (saved["epochs_arg"], saved["amp_arg"], saved["model_arg"]) == ("1", "False", "preactresnet_small")
    assert (bb / "data" / "cifar10").resolve() == data.resolve()
    df = evaluate.main(["--protocol", "tiny", "--cache", str(bench / "cache"), "--data", str(data),
                        "--records", "badnets_0.1_s0", "--out", str(tmp_path / "results.csv")])
    none = df[df.variant == "none"].iloc[0]
    for name in ("ft", "ft-sam"):   # the fake "defense" returns the attacked model unchanged
        row = df[df.variant == name].iloc[0]
        assert row.source == "backdoorbench" and row.test_asr == pytest.approx(none.test_asr)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_jobs_train_records_side_by_side_and_a_failing_job_does_not_stop_the_others(tiny_data, tmp_path, capsys):
    """--jobs 2: each record in its own process, the same record as a one-process run; a job that fails (here
    Blended's key image is missing) reports one line, writes nothing, and the script exits 2 after the others."""
    common = ["--protocol", "tiny", "--data", str(tiny_data), "--results", str(tmp_path / "results")]
    with pytest.raises(SystemExit) as stopped:
        make_records.main(common + ["--cache", str(tmp_path / "par"), "--jobs", "2", "--blend-pattern",
                                    str(tmp_path / "missing.png"), "--attacks", "badnets:0.1", "sig:0.05", "blended:0.1"])
    assert stopped.value.code == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: blended-missing_0.1_s0: ")
    records = tmp_path / "par" / "tiny" / "record"
    assert sorted(p.name for p in records.iterdir()) == ["badnets_0.1_s0", "sig_0.05_s0"]
    serial, = make_records.main(common + ["--cache", str(tmp_path / "one"), "--attacks", "badnets:0.1"])
    side_by_side = load_attack_record(records / "badnets_0.1_s0")
    alone = load_attack_record(serial)
    for key, value in alone.state_dict.items():
        assert torch.allclose(side_by_side.state_dict[key].float(), value.float(), atol=1e-4), key
    assert load_attack_record(records / "sig_0.05_s0").bd_test is not None


def test_a_diverging_attack_writes_no_record_and_exits_with_one_line(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        make_records.main(["--protocol", "tiny", "--data", str(tiny_data), "--cache", str(tmp_path / "cache"),
                           "--results", str(tmp_path / "results"), "--attacks", "badnets:0.1",
                           "--set", "lr=1000000000000.0"])
    assert stopped.value.code == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "diverged" in errors[0] and "Fix: lower the learning rate" in errors[0]
    assert not list((tmp_path / "cache").rglob("attack_result.pt"))
    assert not (tmp_path / "cache" / "tiny" / "record" / "badnets_0.1_s0").exists()
