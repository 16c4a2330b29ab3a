"""A record written in BackdoorBench's layout is read back, defended end to end, and the outputs match
BackdoorBench's files, keys and columns."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fst_plugin.adapter.defenses import FST, LP
from fst_plugin.models import build_model
from fst_plugin.record import load_attack_record, load_untrusted
from fst_plugin.record.defense_output import CSV_COLUMNS
from fst_plugin.defense.shipped import shipped_config
from tests.builders import TinyBB, defense_args


def test_written_record_has_backdoorbench_layout(bb: TinyBB) -> None:
    raw = load_untrusted(bb.record / "attack_result.pt", "attack record")
    assert {"model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test"} <= set(raw)
    assert raw["data_path"] == "./data/cifar10" and raw["clean_data"] == "cifar10" and raw["img_size"] == (32, 32, 3)
    state = raw["bd_test"]
    assert set(state) == {"bd_data_container", "getitem_all", "getitem_all_switch", "original_index_array",
                          "poison_indicator", "save_folder_path"}
    data_dict = state["bd_data_container"]["data_dict"]
    key = next(iter(data_dict))
    assert isinstance(key, np.int64)
    entry = data_dict[key]
    assert entry["path"] == f"./record/{bb.record.name}/bd_test_dataset/{entry['other_info'][1]}/{key}.png"
    assert entry["other_info"][0] == 0  # all-to-one, target 0
    assert len(state["poison_indicator"]) == bb.n_test
    assert len(state["original_index_array"]) == bb.n_test - bb.n_test // 10  # target class excluded


def test_record_round_trip(bb: TinyBB) -> None:
    record = load_attack_record(bb.record)
    assert record.model_name == "preactresnet_small" and record.num_classes == 10
    assert record.target_labels == {0}
    assert all(img.path.is_file() and img.path.is_relative_to(bb.record) for img in record.bd_test.images)
    assert all(img.original_label != 0 for img in record.bd_test.images)
    model = build_model(record.model_name, record.num_classes)
    model.load_state_dict(record.state_dict)


def test_moved_record_still_finds_its_images(bb: TinyBB, tmp_path) -> None:
    import shutil
    moved = tmp_path / "elsewhere" / "renamed_record"
    shutil.copytree(bb.record, moved)
    record = load_attack_record(moved)
    assert all(img.path.is_relative_to(moved.resolve()) and img.path.is_file() for img in record.bd_test.images)


def test_fst_defends_a_record_end_to_end(fresh_bb: TinyBB) -> None:
    ws = fresh_bb
    args = defense_args(FST, "--record", str(ws.record), "--yaml_path", str(shipped_config("fst", "cifar10")),
                        "--dataset_path", str(ws.data), "--device", "cpu", "--num_workers", "0",
                        "--epochs", "2", "--ratio", "0.5")
    result = FST(args).defense(None)
    out = ws.record / "defense" / "fst"
    assert result.save_path == out
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    log_files = {n for n in names if n.startswith("log/") and n.endswith(".log")}
    assert len(log_files) == 1
    assert names - log_files == {"defense_result.pt", "fst_df.csv", "fst_df_summary.csv", "loss_metric_plots.png",
                                 "acc_like_metric_plots.png", "log/index.txt", "run_info.json"}
    saved = load_untrusted(out / "defense_result.pt", "defense result")
    assert set(saved) == {"model_name", "num_classes", "model"}
    model = build_model(saved["model_name"], saved["num_classes"])
    model.load_state_dict(saved["model"])
    assert all(t.device.type == "cpu" for t in saved["model"].values())
    df = pd.read_csv(out / "fst_df.csv", index_col=0)
    assert list(df.columns) == CSV_COLUMNS and list(df["epoch"]) == [0, 1]
    summary = pd.read_csv(out / "fst_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    assert float(summary.loc["last", "test_asr"]) == pytest.approx(df["test_asr"].iloc[-1])
    assert result.after["test_asr"] == pytest.approx(df["test_asr"].iloc[-1])
    indices = np.loadtxt(out / "log" / "index.txt", dtype=int)
    assert len(indices) == ws.n_train // 2 and len(set(indices)) == len(indices)
    assert indices.min() >= 0 and indices.max() < ws.n_train
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 0 and info["config"]["alpha"] == 0.2 and "torch" in info["versions"]
    assert (out / "acc_like_metric_plots.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoint" / "last.pt").exists()  # removed once the run finished


def test_command_line_overrides_yaml_and_index_file_is_used(fresh_bb: TinyBB) -> None:
    ws = fresh_bb
    index = ws.root / "my_index.txt"
    np.savetxt(index, [3, 1, 4, 15, 9], fmt="%d")
    args = defense_args(LP, "--record", str(ws.record), "--yaml_path", str(shipped_config("lp", "cifar10")),
                        "--dataset_path", str(ws.data), "--device", "cpu", "--num_workers", "0",
                        "--epochs", "1", "--index", str(index), "--lr", "0.003")
    defense = LP(args)
    assert defense.config.lr == 0.003 and defense.config.epochs == 1  # yaml says 0.01 and 10
    assert defense.config.batch_size == 128  # from the yaml
    defense.defense(None)
    used = np.loadtxt(ws.record / "defense" / "lp" / "log" / "index.txt", dtype=int)
    assert used.tolist() == [3, 1, 4, 15, 9]


def test_lp_leaves_the_feature_extractor_untouched(fresh_bb: TinyBB) -> None:
    ws = fresh_bb
    args = defense_args(LP, "--record", str(ws.record), "--dataset_path", str(ws.data),
                        "--device", "cpu", "--num_workers", "0", "--epochs", "1", "--ratio", "0.5")
    LP(args).defense(None)
    before = load_attack_record(ws.record).state_dict
    after = load_untrusted(ws.record / "defense" / "lp" / "defense_result.pt", "defense result")["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"linear.weight", "linear.bias"}


def test_clean_subset_is_the_one_backdoorbench_ft_picks() -> None:
    """Same seed, same n, same ratio → the same indices BackdoorBench's ft wrote to its index.txt
    (observed in a real BackdoorBench run: seed 0, 5000 images, ratio 0.05 starts 3155, 3445, 331)."""
    from fst_plugin.record import choose_clean_indices
    from fst_plugin.runtime import seed_everything

    seed_everything(0)
    indices = choose_clean_indices(5000, 0.05, None)
    assert len(indices) == 250 and indices[:3].tolist() == [3155, 3445, 331]


def test_the_clean_data_folder_follows_a_users_link_inside_the_root_but_never_a_records_escape(
        fresh_bb: TinyBB, tmp_path: Path) -> None:
    """One rule for the defenses and the retuning attack (``AttackRecord.clean_data_folder``)."""
    from dataclasses import replace

    from fst_plugin.errors import DataError

    record = load_attack_record(fresh_bb.record)
    elsewhere = tmp_path / "big_disk" / "cifar10"
    shutil.move(str(fresh_bb.data / "cifar10"), elsewhere)
    (fresh_bb.root / "linked").symlink_to(elsewhere, target_is_directory=True)
    nowhere = tmp_path / "no_such_folder"
    assert replace(record, data_path="./linked").clean_data_folder(nowhere) == fresh_bb.root / "linked"
    assert record.clean_data_folder(elsewhere.parent) == elsewhere  # --dataset_path comes first
    for hostile in ("../big_disk/cifar10", str(elsewhere), "linked/../../big_disk/cifar10"):
        with pytest.raises(DataError, match="dataset folder not found") as err:
            replace(record, data_path=hostile).clean_data_folder(nowhere)
        assert "big_disk" not in str(err.value)  # the escaping path was not even tried
