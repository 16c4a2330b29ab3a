"""Standalone ``fst-plugin run`` on a record of a model other than PreActResNet: built by our factory, the head
found inside ``classifier[...]``, tuned, and saved so that the same factory loads the result back."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fst_plugin.models import build_model
from fst_plugin.models.factory import load_weights
from fst_plugin.record import load_untrusted
from tests.builders import run_cli, write_yaml

MODEL = "mobilenet_v3_large"  # a BackdoorBench model whose head is classifier.3 of a four-layer classifier


@pytest.fixture(scope="module")
def mobilenet_bb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/data/cifar10/{train,test} (5 + 2 synthetic images per class) and root/record/tiny_mobilenet."""
    from fst_plugin.attacks import TrainConfig, badnets_trigger
    from fst_plugin.attacks import Attack, Split, backdoor_and_record
    from fst_plugin.demo import synthetic_images, write_image_folders

    root = tmp_path_factory.mktemp("mobilenet_bb")
    rng = np.random.default_rng(0)
    data = root / "data" / "cifar10"
    train = Split(*write_image_folders(data, "train", *synthetic_images(5, rng)))
    test = Split(*write_image_folders(data, "test", *synthetic_images(2, rng)))
    backdoor_and_record(root / "record" / "tiny_mobilenet", model_name=MODEL, dataset="cifar10", train=train,
                        test=test, attack=Attack(badnets_trigger(), np.array([], dtype=np.int64), 0),
                        train_config=TrainConfig(epochs=0, device="cpu", seed=0))
    return root


@pytest.mark.parametrize("extra", [[], ["--whole_classifier", "true"]], ids=["head", "whole_classifier"])
def test_run_tunes_a_mobilenet_record_and_saves_what_the_factory_loads(mobilenet_bb: Path, extra: list[str],
                                                                      tmp_path: Path) -> None:
    record = tmp_path / "record" / "tiny_mobilenet"
    shutil.copytree(mobilenet_bb / "record" / "tiny_mobilenet", record)
    result = run_cli(["run", "fst", "--record", record, "--yaml_path", write_yaml(tmp_path / "fst.yaml"),
                      "--dataset_path", mobilenet_bb / "data", "--epochs", "1", "--ratio", "0.5", "--num_workers",
                      "0", "--device", "cpu", *extra], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected_head = "classifier.0, classifier.3" if extra else "classifier.3"
    assert f"classifier head: {expected_head}" in result.stderr
    saved = load_untrusted(record / "defense" / "fst" / "defense_result.pt", "defense result")
    assert saved["model_name"] == MODEL
    load_weights(build_model(MODEL, saved["num_classes"]), saved["model"], MODEL)
