"""record/result_model: one reader of a saved result as a model, in BackdoorBench's format or as a bare state_dict."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fst_plugin.errors import RecordError
from fst_plugin.models import build_model
from fst_plugin.record.result_model import load_result_model

MODEL = "preactresnet_small"


@pytest.fixture()
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(MODEL, 10).state_dict()


def _same(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_backdoorbenchs_format_names_its_model_and_a_bare_state_dict_takes_the_given_names(tmp_path: Path, weights):
    torch.save({"model_name": MODEL, "num_classes": 10, "model": weights}, tmp_path / "bb.pt")
    torch.save(weights, tmp_path / "bare.pt")
    loaded = load_result_model(tmp_path / "bb.pt", "defense result", model_name="resnet18", num_classes=3)
    assert (loaded.name, loaded.num_classes) == (MODEL, 10) and _same(loaded.model, weights)
    bare = load_result_model(tmp_path / "bare.pt", "retune result", model_name=MODEL, num_classes=10)
    assert (bare.name, bare.num_classes) == (MODEL, 10) and _same(bare.model, weights)


@pytest.mark.parametrize("payload, message", [
    (None, "names no model_name or num_classes"),                       # a bare state_dict, no names given
    ({"model": {"w": "not a tensor"}}, "holds no state_dict"),
    ({"model_name": 3, "model": None}, "holds no state_dict"),
    ("WEIGHTS_WITH_BAD_NAME", "model_name is 3"),
])
def test_a_result_that_is_not_a_model_is_one_record_error_naming_the_file(tmp_path: Path, weights, payload, message):
    if payload is None:
        payload = weights
    elif payload == "WEIGHTS_WITH_BAD_NAME":
        payload = {"model_name": 3, "num_classes": 10, "model": weights}
    torch.save(payload, tmp_path / "r.pt")
    with pytest.raises(RecordError, match=message) as err:
        load_result_model(tmp_path / "r.pt", "defense result")
    assert str(tmp_path / "r.pt") in str(err.value)
