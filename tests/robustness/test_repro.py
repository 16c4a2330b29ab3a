"""Issue 4.4 — reproducible: same seed and inputs on the CPU give identical metrics and weights, and the seed,
versions and full resolved config are written next to the results (run_info.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

from tests import builders as h
from fst_plugin import __version__
from fst_plugin.defense.config import DefenseConfig


@pytest.fixture(scope="module")
def twin(bb: h.TinyBB, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A second uninterrupted run with the same seed and inputs (another record copy, another folder)."""
    return h.full_run(bb, "twin", tmp_path_factory.mktemp("twin"))


def test_same_seed_same_inputs_identical_weights_and_metrics(twin: dict, reference: dict) -> None:
    assert twin["hash"] == reference["hash"]
    assert twin["metrics"] == reference["metrics"]
    assert twin["run_info"]["before"] == reference["run_info"]["before"]
    assert twin["run_info"]["after"] == reference["run_info"]["after"]
    index = [run["save_dir"] / "log" / "index.txt" for run in (twin, reference)]
    assert index[0].read_text() == index[1].read_text()


def test_the_seed_matters(bb: h.TinyBB, tmp_path: Path, reference: dict) -> None:
    """Guard against a vacuous pass: another seed gives other weights."""
    other = h.full_run(bb, "other_seed", tmp_path, "--random_seed", "8", "--epochs", "1")
    assert other["hash"] != reference["hash"]


def test_run_info_records_seed_versions_and_the_full_resolved_config(twin: dict) -> None:
    info_path = twin["save_dir"] / "run_info.json"
    assert info_path.is_file()
    info = json.loads(info_path.read_text())
    assert info["seed"] == 7 == info["config"]["random_seed"]
    assert info["method"] == "fst" and info["device"] == "cpu"
    versions = info["versions"]
    assert versions["backdoorbench-fst"] == __version__
    assert versions["torch"] == torch.__version__ and versions["torchvision"] == torchvision.__version__
    assert {"numpy", "pandas", "python"} <= set(versions)
    config = info["config"]
    assert set(config) == set(DefenseConfig.__dataclass_fields__), "every resolved setting, not just the overrides"
    # the resolved values: yaml (batch_size 16 from the test yaml) and command line (epochs, ratio) merged
    assert (config["epochs"], config["ratio"], config["batch_size"], config["lr"]) == (h.RUN_EPOCHS, 0.25, 16, 0.01)
    assert config["alpha"] == 0.2 and config["projection"] is None and config["dataset"] == "cifar10"
    assert info["before"].keys() >= {"test_acc", "test_asr", "test_ra"}
    df = pd.read_csv(twin["save_dir"] / "fst_df.csv")
    assert info["after"]["test_acc"] == pytest.approx(df["test_acc"].iloc[-1])


def test_result_file_loads_into_the_model(twin: dict) -> None:
    from fst_plugin.models import build_model
    from fst_plugin.record import load_untrusted

    result = load_untrusted(twin["save_dir"] / "defense_result.pt", "defense result")
    model = build_model(result["model_name"], result["num_classes"])
    model.load_state_dict(result["model"])
    assert h.state_dict_hash(model.state_dict()) == twin["hash"]
