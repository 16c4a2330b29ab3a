"""The retuning attack (issue 11): tuning-set composition, determinism, bad input, a clean model's floor, and
records in BackdoorBench's own layout.

The fixture is the retuning-attack workspace of tests/probes/retune_builders.py (built once per session by
conftest.py's ``built``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fst_plugin.cli import main as cli_main
from fst_plugin.data import get_transform
from fst_plugin.models import build_model
from fst_plugin.probes.retune import prepare_retune, run_retune
from fst_plugin.record import load_attack_record, load_untrusted
from tests.builders import snapshot, state_dict_hash
from tests.probes.retune_builders import MODEL, TARGET, RetuneWorkspace, flag_unrelabelled, tiny


@pytest.fixture()
def ws(built: RetuneWorkspace, tmp_path: Path) -> RetuneWorkspace:
    """A private copy (tests write retune outputs into the record)."""
    return built.copy_to(tmp_path / "bb")


def test_the_tuning_set_is_exactly_poison_num_poisoned_images_then_the_rest_of_the_defenses_own_indices(ws):
    plan = prepare_retune(tiny(ws, poison_num=5))
    tuning = plan.tuning
    record = load_attack_record(ws.attacked)
    pool = {img.original_index: img for img in record.bd_train.images}
    assert len(tuning.poisoned) == 5 and len({p.original_index for p in tuning.poisoned}) == 5
    assert all(p.original_index in pool for p in tuning.poisoned)
    np.testing.assert_array_equal(tuning.subset, ws.fst_index)
    np.testing.assert_array_equal(tuning.clean_indices, ws.fst_index[5:])
    assert len(tuning.images) == len(tuning.labels) == len(ws.fst_index)
    assert tuning.labels[:5].tolist() == [TARGET] * 5
    assert tuning.index_source.endswith("defense/fst/log/index.txt")
    # poisoned images get the test transform (no augmentation): exactly the PNG, normalised
    with Image.open(tuning.poisoned[0].path) as png:
        expected = get_transform("cifar10", train=False)(png.convert("RGB"))
    assert torch.equal(tuning.images[0], expected)
    # and nothing was written by preparing
    assert not (ws.attacked / "defense" / "fst" / "retune").exists()


def test_a_model_without_index_file_gets_backdoorbenchs_seeded_draw_of_ratio_times_n_images(ws):
    plan = prepare_retune(tiny(ws, defense="none", ratio=0.1))
    assert len(plan.tuning.subset) == 20 and plan.tuning.index_source.startswith("drawn")
    again = prepare_retune(tiny(ws, defense="none", ratio=0.1))
    np.testing.assert_array_equal(plan.tuning.subset, again.tuning.subset)


def test_clean_subset_drawn_retunes_a_defense_on_the_seeded_draw_not_on_its_own_index(ws):
    """``--clean_subset drawn`` (the authors' script): the defense's log/index.txt is passed over, so a defense and
    the attacked model get the same clean images; the default keeps the defense's own."""
    own = prepare_retune(tiny(ws))
    drawn = prepare_retune(tiny(ws, clean_subset="drawn"))
    attacked = prepare_retune(tiny(ws, defense="none"))
    np.testing.assert_array_equal(drawn.tuning.subset, attacked.tuning.subset)
    assert drawn.tuning.index_source.startswith("drawn") and own.tuning.index_source.endswith("log/index.txt")
    assert not np.array_equal(own.tuning.subset, drawn.tuning.subset)  # the fixture's index is not the draw
    np.testing.assert_array_equal(own.tuning.subset, ws.fst_index)


def test_the_benchmarks_probe_subset_reaches_the_retune(ws):
    """``--set probe_subset=drawn`` on a bench script: the protocol's field travels through Probing to the retune."""
    from bench_scripts.evaluation.per_model import Probing, RetuneModel
    from bench_scripts.protocols import get_protocol

    protocol = get_protocol("tiny", probe_subset="drawn")
    assert RetuneModel(ws.attacked, "fst", Probing(ws.root / "data", "cpu", 0.25, ws.root / "results",
                                                    protocol.probe_subset))() == ""
    info = json.loads((ws.attacked / "defense" / "fst" / "retune" / "run_info.json").read_text())
    assert info["clean_index_source"].startswith("drawn") and info["config"]["clean_subset"] == "drawn"


def test_a_retune_with_a_fixed_seed_is_deterministic_and_writes_backdoorbench_formats(ws):
    first = run_retune(tiny(ws))
    out = ws.attacked / "defense" / "fst" / "retune"
    saved = load_untrusted(out / "retune_result.pt", "retune result")
    assert set(saved) == {"model_name", "num_classes", "model"} and saved["model_name"] == MODEL
    model = build_model(saved["model_name"], saved["num_classes"])
    model.load_state_dict(saved["model"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["n_poisoned"] == 5 and info["poisoned_train_indices"] == list(first.poisoned_indices)
    assert info["after"] == first.after
    assert (out / "retune_df.csv").read_text().count("\n") == 1 + 2  # header + one row per epoch
    hash_first = state_dict_hash(saved["model"])
    shutil.rmtree(out)
    second = run_retune(tiny(ws))
    assert state_dict_hash(load_untrusted(out / "retune_result.pt", "r")["model"]) == hash_first
    assert second.after == first.after and second.poisoned_indices == first.poisoned_indices
    other = prepare_retune(tiny(ws, random_seed=1))
    assert tuple(p.original_index for p in other.tuning.poisoned) != first.poisoned_indices


@pytest.mark.parametrize("extra, message", [
    (["--defense", "ft-sam"], "defense 'ft-sam' has no output"),
    (["--defense", "ft-sam"], "pass one of: fst, "),   # the hint lists the record's finished defenses
    (["--defense", "fst", "--poison_num", "21"], "larger than the 20 poisoned training images"),
    (["--defense", "fst", "--poison_num", "-1"], "--poison_num is -1"),
    (["--defense", "fst", "--epochs", "0"], "--epochs is 0"),
    (["--defense", "fst", "--lr", "-0.1"], "--lr is -0.1"),
    (["--defense", "fst", "--lr", "nan"], "--lr is nan"),
    (["--defense", "fst", "--batch_size", "0"], "--batch_size is 0"),
    (["--defense", "none", "--ratio", "1.5"], "--ratio is 1.5"),
    (["--defense", "fst", "--clean_subset", "mine"], "--clean_subset"),
    (["--defense", "../../x"], "not a defense folder name"),
    (["--defense", "clean-reference"], "goes with --defense clean-reference, and only with it"),
    (["--defense", "fst", "--reference_model", "clean_model.pth"], "goes with --defense clean-reference"),
    (["--defense", "clean-reference", "--reference_record", "r", "--reference_model", "m.pth"],
     "--reference_record and --reference_model both name the clean reference"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(ws, capsys, extra, message):
    before = snapshot(ws.root)
    code = cli_main(["retune", "--record", str(ws.attacked), "--dataset_path", str(ws.root / "data"),
                     "--device", "cpu", "--ratio", "0.25", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if line.startswith("error:")]) == 1 and message in err[-1]
    assert snapshot(ws.root) == before


def test_a_record_without_bd_train_exits_2_and_writes_nothing(ws, capsys):
    payload = load_untrusted(ws.attacked / "attack_result.pt", "record")
    payload["bd_train"] = None
    torch.save(payload, ws.attacked / "attack_result.pt")
    before = snapshot(ws.root)
    code = cli_main(["retune", "--record", str(ws.attacked), "--defense", "fst", "--device", "cpu",
                     "--dataset_path", str(ws.root / "data")])
    assert code == 2 and "has no bd_train" in capsys.readouterr().err
    assert snapshot(ws.root) == before


def test_a_diverging_retune_exits_2_with_the_learning_rate_to_lower_and_writes_nothing(ws, capsys):
    before = snapshot(ws.root)
    code = cli_main(["retune", "--record", str(ws.attacked), "--defense", "fst", "--device", "cpu", "--epochs", "2",
                     "--dataset_path", str(ws.root / "data"), "--ratio", "0.25", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 2 and "the loss became" in err and "lr=1e+30" in err and "alpha" not in err
    assert snapshot(ws.root) == before


def test_a_defense_folder_linked_outside_the_record_is_refused(ws, capsys, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(ws.attacked / "defense" / "fst", outside)
    (ws.attacked / "defense" / "linked").symlink_to(outside, target_is_directory=True)
    code = cli_main(["retune", "--record", str(ws.attacked), "--defense", "linked", "--device", "cpu",
                     "--dataset_path", str(ws.root / "data"), "--ratio", "0.25"])
    assert code == 2 and "outside the record folder" in capsys.readouterr().err
    assert not (outside / "retune").exists()


def test_a_clean_reference_model_stays_near_its_pre_attack_asr(ws):
    """Bound: ASR may rise by at most 10 points. The tiny protocol retunes with the official defaults (5 poisoned
    images, 5 epochs, lr 0.01, batch 128) on a 50-image subset, i.e. 5 SGD steps in which a tenth of the batch is
    poisoned: a model that never learned the trigger does not acquire a BadNets backdoor from that. 10 points is
    4-5 of the 45 poisoned test images, room for the noise of a 200-image model. The bound is not vacuous: a
    retune with all 20 poisoned images (40% of the set) for 20 epochs raises ASR from 22% to 40% (measured after
    the tensor-path trainer landed; 5 epochs of it were too few to move this reference model), which is what a
    bug that trained on the poisoned pool or skipped the subset would look like.
    """
    result = run_retune(tiny(ws, defense="clean-reference", reference_record=ws.reference, epochs=5))
    assert result.save_dir == ws.attacked / "defense" / "clean-reference" / "retune"
    assert (result.save_dir / "retune_result.pt").is_file()
    assert result.before["test_acc"] > 0.5  # a real clean model, not chance
    assert result.after["test_asr"] <= result.before["test_asr"] + 0.10, (result.before, result.after)
    shutil.rmtree(result.save_dir)
    heavy = run_retune(tiny(ws, defense="clean-reference", reference_record=ws.reference, epochs=20, poison_num=20))
    assert heavy.after["test_asr"] > result.before["test_asr"] + 0.10, (heavy.before, heavy.after)


def test_the_clean_reference_retuned_from_a_clean_model_file_equals_the_one_from_its_record(ws, tmp_path, capsys):
    """BackdoorBench users hold a clean model file, not a record: ``--reference_model clean_model.pth`` (a bare
    state_dict) retunes the same weights into the same place as ``--reference_record``, bit for bit."""
    from_record = run_retune(tiny(ws, defense="clean-reference", reference_record=ws.reference, epochs=1))
    out = from_record.save_dir
    first = state_dict_hash(load_untrusted(out / "retune_result.pt", "retune result")["model"])
    shutil.rmtree(out)
    clean_model = tmp_path / "clean_model.pth"
    torch.save(load_attack_record(ws.reference).state_dict, clean_model)
    code = cli_main(["retune", "--record", str(ws.attacked), "--defense", "clean-reference", "--reference_model",
                     str(clean_model), "--dataset_path", str(ws.root / "data"), "--device", "cpu", "--ratio", "0.25",
                     "--epochs", "1"])
    assert code == 0, capsys.readouterr().err
    assert state_dict_hash(load_untrusted(out / "retune_result.pt", "retune result")["model"]) == first
    info = json.loads((out / "run_info.json").read_text())
    assert info["before"] == from_record.before and info["after"] == from_record.after
    assert info["config"]["reference_model"] == str(clean_model) and info["config"]["reference_record"] is None


def test_retune_runs_on_a_record_in_backdoorbenchs_own_layout_from_its_root(ws, capsys, monkeypatch):
    """BackdoorBench keeps bd_train paths relative to its root (./record/<name>/bd_train_dataset/<label>/<i>.png);
    its ft writes log/index.txt, other built-ins (here an 'anp' folder) write no index file."""
    payload = load_untrusted(ws.attacked / "attack_result.pt", "record")
    data_dict = payload["bd_train"]["bd_data_container"]["data_dict"]
    key, entry = next(iter(data_dict.items()))
    assert isinstance(key, np.int64)
    assert entry["path"] == f"./record/tiny_badnet/bd_train_dataset/{entry['other_info'][1]}/{int(key)}.png"
    ft = ws.attacked / "defense" / "ft"
    shutil.copytree(ws.attacked / "defense" / "fst", ft)
    anp = ws.attacked / "defense" / "anp"
    anp.mkdir()
    shutil.copy(ft / "defense_result.pt", anp / "defense_result.pt")
    monkeypatch.chdir(ws.root)
    for defense in ("ft", "anp", "none"):
        code = cli_main(["retune", "--record", "record/tiny_badnet", "--defense", defense, "--device", "cpu",
                         "--epochs", "1", "--ratio", "0.25"])
        assert code == 0, capsys.readouterr().err
        info = json.loads((ws.attacked / "defense" / defense / "retune" / "run_info.json").read_text())
        assert info["n_poisoned"] == 5
        assert info["clean_index_source"].startswith("drawn") == (defense != "ft")
    assert "ASR" in capsys.readouterr().out



def test_on_a_wanet_shaped_record_the_retune_uses_only_backdoor_images_with_the_target_label(ws):
    """BackdoorBench's WaNet flags cross samples (noise warp, true label) beside the backdoor images: they must
    never reach the retuning attack's tuning set, and run_info.json names the rule and the pool."""
    cross = set(flag_unrelabelled(ws.attacked, 40))
    assert len(load_attack_record(ws.attacked).bd_train.images) == 60 and len(cross) == 40
    plan = prepare_retune(tiny(ws, poison_num=20))
    assert not {p.original_index for p in plan.tuning.poisoned} & cross
    assert all(p.bd_label == TARGET != p.original_label for p in plan.tuning.poisoned)
    assert plan.tuning.labels[:20].tolist() == [TARGET] * 20
    result = run_retune(tiny(ws, poison_num=5, epochs=1))
    info = json.loads((result.save_dir / "run_info.json").read_text())
    assert info["poison_pool"] == {"rule": "dirty-label", "size": 20, "flagged": 60, "excluded": 40,
                                   "targets": [TARGET]}
    assert not set(info["poisoned_train_indices"]) & cross


def test_on_a_clean_label_record_the_pool_is_the_flagged_images_of_the_target_class(ws, capsys):
    """SIG-shaped: only target-class images are flagged and none changes its label."""
    flagged = set(flag_unrelabelled(ws.attacked, 10, target_only=True, replace=True))
    plan = prepare_retune(tiny(ws, poison_num=5))
    assert {p.original_index for p in plan.tuning.poisoned} <= flagged
    assert plan.tuning.pool.rule == "clean-label" and len(plan.tuning.pool.images) == 10
    assert plan.tuning.labels[:5].tolist() == [TARGET] * 5
    # QRA takes its poisoned images outside the target class: none here, so it refuses in one line
    code = cli_main(["qra", "--record", str(ws.attacked), "--defense", "fst", "--dataset_path", str(ws.root / "data"),
                     "--reference_record", str(ws.reference), "--poison_num", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "outside the target class" in err[-1] and "clean-label pool" in err[-1] and "needs a dirty-label record" in err[-1]
