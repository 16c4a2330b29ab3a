"""The query-based reactivation attack (issue 11 part 4): the eps budget on real images, determinism, bad input,
and the eps = 0 identity.

The fixture is the retuning-attack workspace of tests/probes/retune_builders.py (an untrained BadNets record
with 20 poisoned training images, a fake ``fst`` output, a clean reference trained on the clean images) with the
retuning attack run once for ``fst`` and ``none`` (1 epoch: QRA only needs a retuned model to distil from) and
QRA run once on ``fst`` through the CLI. QRA runs with tiny sizes (10 clean + 10 poisoned images, 2 epochs,
batch 10): these tests check the method's plumbing and invariants, not that it reactivates anything.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fst_plugin import runtime
from fst_plugin.cli import main as cli_main
from fst_plugin.data import TransformedDataset, load_clean_split, materialise
from fst_plugin.models import build_model
from fst_plugin.probes.config import QraConfig
from fst_plugin.probes.perturbation import load_perturbation, pixel_transform
from fst_plugin.probes.qra import MODELS, prepare_qra, run_qra
from fst_plugin.probes.retune import prepare_retune, run_retune
from fst_plugin.record import load_attack_record, load_untrusted
from fst_plugin.record.layout import DefenseLayout
from tests.builders import snapshot, state_dict_hash
from tests.probes.retune_builders import RetuneWorkspace, tiny

SMALL = dict(clean_num=10, poison_num=10, epochs=2, batch_size=10, ratio=0.25, device="cpu")
CLI_SMALL = [arg for key, value in SMALL.items() for arg in (f"--{key}", str(value))]


def qra_cli(ws: RetuneWorkspace, *extra: str, reference: bool = True) -> int:
    return cli_main(["qra", "--record", str(ws.attacked), "--dataset_path", str(ws.root / "data"), *CLI_SMALL,
                     *(["--reference_record", str(ws.reference)] if reference else []), *extra])


@pytest.fixture(scope="module")
def retuned(built: RetuneWorkspace, tmp_path_factory: pytest.TempPathFactory) -> RetuneWorkspace:
    """The workspace with ``fst`` and ``none`` retuned and QRA run on ``fst`` by the CLI (shared, read-only)."""
    ws = built.copy_to(tmp_path_factory.mktemp("qra_bb") / "bb")
    for defense in ("fst", "none"):
        run_retune(tiny(ws, defense=defense, epochs=1))
    assert qra_cli(ws, "--defense", "fst", "--eps", "16/255") == 0
    return ws


@pytest.fixture()
def ws(retuned: RetuneWorkspace, tmp_path: Path) -> RetuneWorkspace:
    """A private copy (tests write QRA outputs into the record)."""
    return retuned.copy_to(tmp_path / "bb")


def small(ws: RetuneWorkspace, defense: str = "fst", **overrides) -> QraConfig:
    values = dict(record=ws.attacked, defense=defense, reference_record=ws.reference, dataset_path=ws.root / "data",
                  **SMALL)
    values.update(overrides)
    return QraConfig(**values)


def test_the_saved_perturbation_stays_within_eps_on_real_images_and_the_cli_wrote_the_three_files(retuned):
    save = DefenseLayout.of(retuned.attacked, "fst").qra_dir
    assert save == retuned.attacked / "defense" / "fst" / "retune" / "qra"
    assert sorted(p.name for p in save.iterdir()) == ["qra_df.csv", "qra_result.pt", "run_info.json"]
    assert len(pd.read_csv(save / "qra_df.csv")) == 2  # one row per epoch
    info = json.loads((save / "run_info.json").read_text())
    assert set(info["metrics"]) == set(MODELS) and info["n_clean"] == 10 and info["n_poisoned"] == 10
    assert info["config"]["eps"] == pytest.approx(16 / 255)
    perturb = load_perturbation(save / "qra_result.pt")
    # every clean test and training image of the fixture, as [0, 1] pixels (the space eps is measured in)
    pixels = torch.cat([materialise(TransformedDataset(load_clean_split("cifar10", retuned.root / "data" / "cifar10",
                                                                       train=train), pixel_transform("cifar10")))
                        .tensors[0] for train in (False, True)])
    with torch.no_grad():
        moved = (perturb.perturbed_pixels(pixels) - pixels).abs()
    assert moved.max().item() <= 16 / 255 + 1e-6  # float rounding of pixels + delta, nothing more
    assert moved.max().item() > 1 / 255  # and it does perturb (the check above is not vacuous)


def test_a_fixed_seed_gives_the_same_generator_and_numbers_and_another_seed_other_images(retuned, ws):
    shared = DefenseLayout.of(retuned.attacked, "fst").qra_dir
    shutil.rmtree(DefenseLayout.of(ws.attacked, "fst").qra_dir)
    again = run_qra(small(ws, eps=16 / 255))
    assert (state_dict_hash(load_untrusted(again.save_dir / "qra_result.pt", "qra result")["model"])
            == state_dict_hash(load_untrusted(shared / "qra_result.pt", "qra result")["model"]))
    info = json.loads((shared / "run_info.json").read_text())
    assert again.metrics == info["metrics"] and list(again.poisoned_indices) == info["poisoned_train_indices"]
    assert (again.save_dir / "qra_df.csv").read_text() == (shared / "qra_df.csv").read_text()
    other = prepare_qra(small(ws, random_seed=1))
    assert [p.original_index for p in other.training.poisoned] != info["poisoned_train_indices"]


def test_off_a_terminal_the_generator_training_logs_its_epochs_and_seconds(ws, caplog, monkeypatch):
    monkeypatch.setattr(runtime, "on_terminal", lambda: False)  # pytest's stderr may be a terminal or not
    shutil.rmtree(DefenseLayout.of(ws.attacked, "fst").qra_dir)
    with caplog.at_level(logging.INFO):
        run_qra(small(ws, epochs=2))
    (line,) = [m for m in caplog.messages if m.startswith("qra generator epochs: ")]
    assert re.fullmatch(r"qra generator epochs: done, 2/2 steps in \d+\.\d s", line), line


def test_with_eps_zero_the_perturbed_numbers_equal_the_unperturbed_ones_exactly(ws, capsys):
    """Bound: exact equality. With eps = 0 the perturbation is clamp(0 * AE(x), -0, 0) = ±0, x + 0 == x for pixels
    in [0, 1] and the clamp to [0, 1] leaves them unchanged, so every model sees bit-identical inputs in the same
    batches: any difference would mean the perturbed path is not the unperturbed path plus delta."""
    assert qra_cli(ws, "--defense", "none", "--eps", "0", "--epochs", "1") == 0
    assert "none: ASR" in capsys.readouterr().out
    result_metrics = json.loads((DefenseLayout.of(ws.attacked, "none").qra_dir / "run_info.json").read_text())["metrics"]
    for name in MODELS:
        m = result_metrics[name]
        for key in ("acc", "clean_target", "asr", "ra"):
            assert m[f"{key}_qra"] == m[key], (name, key, m)
    # the unperturbed ASR is the attacked model's own (the same model, same images as the retune's "before")
    before = json.loads((ws.attacked / "defense" / "none" / "retune" / "run_info.json").read_text())["before"]
    assert result_metrics["purified"]["asr"] == pytest.approx(before["test_asr"])
    assert result_metrics["purified"]["acc"] == pytest.approx(before["test_acc"])


@pytest.mark.parametrize("extra, message", [
    (["--defense", "ft"], "'ft' has no retune result"),
    (["--defense", "ft-sam"], "defense 'ft-sam' has no output"),
    (["--defense", "fst", "--no-reference"], "QRA needs a clean reference model (no --reference_record or "
                                             "--reference_model given)"),
    (["--defense", "clean-reference"], "--defense clean-reference"),
    (["--defense", "fst", "--poison_num", "21"], "larger than the 20 poisoned training images"),
    (["--defense", "fst", "--clean_num", "51"], "--clean_num 51 is larger than the clean tuning subset (50"),
    (["--defense", "fst", "--eps", "1.5"], "--eps is 1.5"),
    (["--defense", "fst", "--eps", "-0.01"], "--eps is -0.01"),
    (["--defense", "fst", "--alpha_qra", "-0.2"], "--alpha_qra is -0.2"),
    (["--defense", "fst", "--alpha_qra", "nan"], "--alpha_qra is nan"),
    (["--defense", "fst", "--clean_num", "0", "--poison_num", "0"], "nothing to train on"),
    (["--defense", "fst", "--epochs", "0"], "--epochs is 0"),
    (["--defense", "fst", "--clean_subset", "mine"], "--clean_subset"),
    (["--defense", "fst", "--batch_size", "0"], "--batch_size is 0"),
    (["--defense", "../../x"], "under record/<name>/defense/ or none"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(ws, capsys, extra, message):
    ft = ws.attacked / "defense" / "ft"  # a finished defense that was never retuned
    shutil.copytree(ws.attacked / "defense" / "fst", ft, ignore=shutil.ignore_patterns("retune"))
    shutil.rmtree(DefenseLayout.of(ws.attacked, "fst").qra_dir)  # the fixture's run: this test's fst has no QRA output
    before = snapshot(ws.root)
    code = qra_cli(ws, *[e for e in extra if e != "--no-reference"], reference="--no-reference" not in extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if line.startswith("error:")]) == 1 and message in err[-1], err
    assert snapshot(ws.root) == before
    assert not list(ws.attacked.glob("defense/*/retune/qra"))


def test_qra_reads_the_same_clean_subset_as_the_retune_and_only_non_target_poisoned_images(retuned):
    plan = prepare_qra(small(retuned))
    np.testing.assert_array_equal(plan.training.clean_indices, retuned.fst_index[:10])
    assert all(p.original_label != plan.target for p in plan.training.poisoned)
    assert plan.training.labels[10:].tolist() == [plan.target] * 10
    assert plan.training.true_labels[10:].tolist() == [p.original_label for p in plan.training.poisoned]
    assert float(plan.training.pixels.min()) >= 0 and float(plan.training.pixels.max()) <= 1
    assert plan.save_dir == DefenseLayout.of(retuned.attacked, "fst").qra_dir  # prepare_qra itself writes nothing: see bad input


def test_qra_with_clean_subset_drawn_takes_the_retunes_draw_not_the_defenses_index(retuned):
    plan = prepare_qra(small(retuned, clean_subset="drawn"))
    draw = prepare_retune(tiny(retuned, defense="none")).tuning.subset
    np.testing.assert_array_equal(plan.training.clean_indices, draw[:10])
    assert not np.array_equal(plan.training.clean_indices, retuned.fst_index[:10])


def test_the_benchmark_leaves_the_qra_columns_empty_with_a_warning_when_the_pool_is_too_small(ws, caplog):
    """``evaluate --qra`` runs the script's defaults (500 poisoned images); a record with fewer (this one has 20,
    a 0.5% CIFAR-10 record 250) must not stop the whole evaluation: one warning naming the fix, empty columns,
    nothing written."""
    from bench_scripts.evaluation.evaluate import QRA_COLUMNS, Qra
    from bench_scripts.evaluation.per_model import Probing

    shutil.rmtree(DefenseLayout.of(ws.attacked, "fst").qra_dir)  # the fixture's run
    qra = Qra(run_missing=True, probing=Probing(ws.root / "data", "cpu", 0.25, ws.root / "results"))
    with caplog.at_level("WARNING", logger="bench.evaluate"):
        columns = qra.columns(ws.attacked, "fst", ws.reference, asr=0.0)
    assert set(columns) == set(QRA_COLUMNS) and all(np.isnan(v) for v in columns.values())
    assert "--poison_num 500 is larger than the" in caplog.text and "fst-plugin qra" in caplog.text
    assert not DefenseLayout.of(ws.attacked, "fst").qra_dir.exists()


def test_the_benchmark_attacks_only_models_purified_below_qra_max_asr(ws, caplog):
    """``evaluate --qra --qra-max-asr 0.1``: a model the defense left at 50% ASR has nothing to reactivate; QRA is
    not started on it (no warning, nothing written), while at 5% it is (and fails here on the small pool)."""
    from bench_scripts.evaluation.evaluate import Qra
    from bench_scripts.evaluation.per_model import Probing

    shutil.rmtree(DefenseLayout.of(ws.attacked, "fst").qra_dir, ignore_errors=True)
    qra = Qra(run_missing=True, probing=Probing(ws.root / "data", "cpu", 0.25, ws.root / "results"), max_asr=0.1)
    with caplog.at_level("WARNING", logger="bench.evaluate"):
        columns = qra.columns(ws.attacked, "fst", ws.reference, asr=0.5)
    assert all(np.isnan(v) for v in columns.values()) and "qra" not in caplog.text
    with caplog.at_level("WARNING", logger="bench.evaluate"):
        qra.columns(ws.attacked, "fst", ws.reference, asr=0.05)
    assert "--poison_num 500 is larger than the" in caplog.text
    assert not DefenseLayout.of(ws.attacked, "fst").qra_dir.exists()


# ----- the clean reference as a model file (BackdoorBench writes no clean record) ----------------------------------
def save_clean_model(ws: RetuneWorkspace, path: Path, form: str = "bare") -> Path:
    """The reference record's weights as a clean model file: a bare state_dict (BackdoorBench users'
    ``clean_model.pth``), or under ``'model'`` / ``'state_dict'``."""
    state = load_attack_record(ws.reference).state_dict
    torch.save({"bare": state, "model": {"model": state, "epoch": 4}, "state_dict": {"state_dict": state}}[form],
               path)
    return path


def test_qra_with_a_clean_model_file_gives_the_numbers_of_the_equivalent_reference_record(retuned, ws, tmp_path):
    """The fixture's CLI run used ``--reference_record``; the same weights as ``clean_model.pth`` must give the
    same generator and the same numbers for all three models (the reference is the only thing that changed)."""
    shared = DefenseLayout.of(retuned.attacked, "fst").qra_dir
    shutil.rmtree(DefenseLayout.of(ws.attacked, "fst").qra_dir)
    clean_model = save_clean_model(ws, tmp_path / "clean_model.pth")
    result = run_qra(small(ws, eps=16 / 255, reference_record=None, reference_model=clean_model))
    info = json.loads((shared / "run_info.json").read_text())
    assert result.metrics == info["metrics"]
    assert (state_dict_hash(load_untrusted(result.save_dir / "qra_result.pt", "qra result")["model"])
            == state_dict_hash(load_untrusted(shared / "qra_result.pt", "qra result")["model"]))
    written = json.loads((result.save_dir / "run_info.json").read_text())
    assert written["reference_model"] == str(clean_model) and "reference_record" not in written
    assert info["reference_record"] == str(retuned.reference) and "reference_model" not in info


@pytest.mark.parametrize("form", ["bare", "model", "state_dict"])
def test_a_clean_model_file_is_read_bare_or_under_model_or_state_dict(ws, tmp_path, form):
    path = save_clean_model(ws, tmp_path / f"{form}.pth", form)
    plan = prepare_qra(small(ws, reference_record=None, reference_model=path))
    expected = load_attack_record(ws.reference).state_dict
    assert state_dict_hash(plan.models["clean_reference"].state_dict()) == state_dict_hash(expected)
    assert state_dict_hash(plan.models["purified"].state_dict()) != state_dict_hash(expected)  # not vacuous


def _write_bad_reference(ws: RetuneWorkspace, path: Path, kind: str) -> Path:
    if kind == "garbage":
        path.write_bytes(b"this is not a torch file" * 10)
    elif kind == "other architecture":
        torch.save(build_model("resnet9_cpu", 10).state_dict(), path)
    elif kind == "other classes":
        torch.save({"model_name": "preactresnet_small", "num_classes": 43,
                    "model": build_model("preactresnet_small", 43).state_dict()}, path)
    elif kind == "code":  # a whole pickled object: the allow-list refuses it
        torch.save({"state_dict": load_attack_record(ws.reference).state_dict, "cfg": argparse.Namespace(a=1)},
                   path)
    return path


@pytest.mark.parametrize("kind, extra, message", [
    ("garbage", [], "reference model {path} is corrupt or truncated"),
    ("other architecture", [], "reference model {path} is not a preactresnet_small with 10 classes"),
    ("other classes", [], "reference model {path} has 43 classes, the attacked record 10"),
    ("code", [], "which is not on the allow-list"),
    ("missing", [], "reference model {path} does not exist"),
    ("fine", ["--reference_record", "{reference}"], "--reference_record and --reference_model both name the clean "
                                                     "reference"),
])
def test_a_bad_clean_model_file_or_both_references_exit_2_with_one_line_and_write_nothing(ws, capsys, tmp_path,
                                                                                           kind, extra, message):
    shutil.rmtree(DefenseLayout.of(ws.attacked, "fst").qra_dir)  # the fixture's run
    path = tmp_path / "clean_model.pth"
    if kind == "fine":
        save_clean_model(ws, path)
    elif kind != "missing":
        _write_bad_reference(ws, path, kind)
    before = snapshot(ws.root)
    code = qra_cli(ws, "--defense", "fst", "--reference_model", str(path),
                   *[e.format(reference=ws.reference) for e in extra], reference=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if line.startswith("error:")]) == 1, err
    assert message.format(path=path) in err[-1], err
    assert snapshot(ws.root) == before
    assert not list(ws.attacked.glob("defense/*/retune/qra"))
