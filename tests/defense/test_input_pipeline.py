"""The input_pipeline key: the tensor path by default, the per-image path on request, and the fallbacks."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from fst_plugin.adapter.defenses import FST
from fst_plugin.defense import pipeline as pipeline_module
from fst_plugin.defense.runner import prepare
from fst_plugin.data import get_transform
from fst_plugin.data.tensor_data import TensorBatches, nonstandard_transform
from tests.builders import TinyBB, defense_args


def plan_for(bb: TinyBB, *argv: str):
    args = defense_args(FST, "--record", str(bb.record), "--dataset_path", str(bb.data),
                        "--device", "cpu", "--num_workers", "0", "--epochs", "1", "--ratio", "0.2", *argv)
    defense = FST(args)
    return prepare(defense.config, defense.result, FST.method)


def batches(loader) -> tuple[torch.Tensor, ...]:
    parts = list(zip(*[tuple(b) for b in loader]))
    return tuple(torch.cat(p) for p in parts)


def test_the_tensor_path_is_the_default_and_evaluates_exactly_what_the_per_image_path_evaluates(
        bb: TinyBB) -> None:
    tensor, per_image = plan_for(bb), plan_for(bb, "--input_pipeline", "backdoorbench")
    assert tensor.input_pipeline == "tensor" and isinstance(tensor.train_loader, TensorBatches)
    assert per_image.input_pipeline == "backdoorbench" and isinstance(per_image.train_loader, DataLoader)
    assert np.array_equal(tensor.indices, per_image.indices)
    for ours, theirs in ((tensor.clean_loader, per_image.clean_loader), (tensor.bd_loader, per_image.bd_loader)):
        a, b = batches(ours), batches(theirs)
        assert len(a) == len(b)
        assert (a[0] - b[0]).abs().max().item() <= 1e-6
        for x, y in zip(a[1:], b[1:]):
            assert torch.equal(x, y)


def test_eval_subset_picks_the_same_test_images_on_both_paths(bb: TinyBB) -> None:
    tensor = plan_for(bb, "--eval_subset", "7")
    per_image = plan_for(bb, "--eval_subset", "7", "--input_pipeline", "backdoorbench")
    for ours, theirs in ((tensor.clean_loader, per_image.clean_loader), (tensor.bd_loader, per_image.bd_loader)):
        a, b = batches(ours), batches(theirs)
        assert len(a[0]) == len(b[0]) == 7
        assert (a[0] - b[0]).abs().max().item() <= 1e-6 and torch.equal(a[1], b[1])


def test_sets_above_the_bound_fall_back_to_the_per_image_path_and_say_so(
        bb: TinyBB, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = pipeline_module.fits_tensor_path
    monkeypatch.setattr(pipeline_module, "fits_tensor_path",
                        lambda count, dataset, what="images": real(count, dataset, limit_bytes=10, what=what))
    with caplog.at_level(logging.INFO):
        plan = plan_for(bb)
    assert plan.input_pipeline == "backdoorbench" and isinstance(plan.train_loader, DataLoader)
    assert "above the tensor path's bound" in caplog.text


def test_a_backend_with_a_nonstandard_transform_keeps_the_per_image_path(
        bb: TinyBB, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from fst_plugin.defense.backend import StandaloneBackend

    def transform(self, dataset: str, train: bool):
        standard = get_transform(dataset, train)
        return transforms.Compose([*standard.transforms[:-1], transforms.Normalize((0.5,) * 3, (0.5,) * 3)])

    monkeypatch.setattr(StandaloneBackend, "transform", transform)
    with caplog.at_level(logging.INFO):
        plan = plan_for(bb)
    assert plan.input_pipeline == "backdoorbench"
    assert "Normalize.mean" in caplog.text


def test_nonstandard_transform_accepts_the_standard_ones_and_names_a_changed_step() -> None:
    for dataset in ("cifar10", "cifar100", "gtsrb", "tiny", "mnist"):
        for train in (True, False):
            assert nonstandard_transform(get_transform(dataset, train), dataset, train) is None
    cropped = transforms.Compose([transforms.Resize((32, 32)), transforms.RandomCrop((32, 32), padding=2),
                                  *get_transform("cifar10", True).transforms[2:]])
    assert "padding is 2" in nonstandard_transform(cropped, "cifar10", True)
    assert "steps" in nonstandard_transform(get_transform("cifar10", True), "cifar100", True)


def test_a_full_run_on_the_tensor_path_writes_the_usual_outputs(fresh_bb: TinyBB) -> None:
    args = defense_args(FST, "--record", str(fresh_bb.record), "--dataset_path",
                        str(fresh_bb.data), "--device", "cpu", "--num_workers", "0", "--epochs", "2", "--ratio", "0.2")
    result = FST(args).defense()
    assert [row["epoch"] for row in result.history] == [0, 1]
    assert (Path(result.save_path) / "defense_result.pt").is_file()
    assert (Path(result.save_path) / "fst_df.csv").is_file()
