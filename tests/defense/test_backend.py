"""fst_plugin.defense.backend: BackdoorBench's model factory first, ours only for a model it does not know; outside
BackdoorBench, ours with the dataset's channel count (an MNIST record runs end to end on a 1-channel model)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from fst_plugin.api import run_defense
from fst_plugin.defense.backend import BackdoorBenchBackend, StandaloneBackend
from fst_plugin.models import build_model
from fst_plugin.record import load_attack_record, load_untrusted
from fst_plugin.core.unlearning import generator_from_state
from tests.builders import assert_outputs_complete, build_tiny_mnist, write_yaml


def _backend(generate) -> BackdoorBenchBackend:
    backend = BackdoorBenchBackend.__new__(BackdoorBenchBackend)  # no checkout needed for the model path
    backend._generate_cls_model = generate
    return backend


def test_a_model_backdoorbench_does_not_know_comes_from_our_factory_and_says_so(caplog) -> None:
    def unknown(name, num_classes):
        raise SystemError("NO valid model match in function generate_cls_model!")

    with caplog.at_level(logging.WARNING, logger="fst_plugin.defense.backend"):
        model = _backend(unknown).build_model("resnet9_cpu", 10)
    assert isinstance(model, nn.Module) and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert "cannot build 'resnet9_cpu'" in caplog.text and "NO valid model match" in caplog.text


@pytest.mark.parametrize("failure", [OSError("<urlopen error [Errno -3] Temporary failure in name resolution>"),
                                     TypeError("__init__() got an unexpected keyword argument 'num_classes'")])
def test_a_model_backdoorbench_s_factory_fails_on_comes_from_ours(caplog, failure) -> None:
    """Its vit_* / convnext_tiny download ImageNet weights (offline: OSError); senet18 / resnext29 raise TypeError."""
    def failing(name, num_classes):
        raise failure

    with caplog.at_level(logging.WARNING, logger="fst_plugin.defense.backend"):
        model = _backend(failing).build_model("senet18", 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and "cannot build 'senet18'" in caplog.text


def test_any_other_failure_of_backdoorbench_s_factory_is_not_swallowed() -> None:
    def broken(name, num_classes):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        _backend(broken).build_model("preactresnet18", 10)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", ["preactresnet_small", "resnet9"])
def test_the_standalone_backend_and_the_fallback_build_for_the_datasets_channel_count(name) -> None:
    def unknown(model_name, num_classes):
        raise SystemError("NO valid model match in function generate_cls_model!")

    for model in (StandaloneBackend().build_model(name, 10, 1), _backend(unknown).build_model(name, 10, 1)):
        assert _first_conv(model).in_channels == 1
        assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert _first_conv(StandaloneBackend().build_model(name, 10)).in_channels == 3  # the default is unchanged


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory):
    """An MNIST-shaped root (1x28x28 images, a record of a 1-channel preactresnet_small) and an explicit yaml:
    no yaml ships for mnist, so a run names one (the shipped fst/cifar10.yaml with ``dataset: mnist``)."""
    root = tmp_path_factory.mktemp("mnist_bb")
    return build_tiny_mnist(root), write_yaml(root / "fst_mnist.yaml", dataset="mnist", ratio=0.5)


@pytest.mark.parametrize("pipeline", ["tensor", "backdoorbench"])
def test_an_mnist_record_runs_a_defense_end_to_end_on_a_one_channel_model(mnist, tmp_path: Path, pipeline) -> None:
    """Before, the standalone path built every model for 3 channels: the 1-channel record's weights did not fit
    (and the attack writer could not even build such a record). Both input paths: the tensor path and the per-image
    transforms."""
    fixture, yaml_path = mnist
    record_dir = tmp_path / "record" / fixture.record.name
    shutil.copytree(fixture.record, record_dir)
    record = load_attack_record(record_dir)
    assert record.clean_data == "mnist" and record.state_dict["conv1.weight"].shape[1] == 1
    result = run_defense("fst", record_dir, yaml_path=str(yaml_path), dataset_path=str(fixture.data), device="cpu",
                         epochs=1, input_pipeline=pipeline)
    assert "defense_result.pt" in assert_outputs_complete(Path(result.save_path))
    assert [row["epoch"] for row in result.history] == [0]
    assert 0 <= result.history[-1]["test_acc"] <= 1 and 0 <= result.history[-1]["test_asr"] <= 1
    saved = load_untrusted(Path(result.save_path) / "defense_result.pt", "defense result")
    model = build_model(saved["model_name"], saved["num_classes"], in_channels=1)
    model.load_state_dict(saved["model"])  # the tuned weights are a 1-channel model's
    assert not torch.equal(saved["model"]["linear.weight"], record.state_dict["linear.weight"])  # it did tune


def test_pam_runs_on_an_mnist_record_its_generator_keeping_the_28_pixel_side(mnist, tmp_path: Path) -> None:
    """The authors' U-Net pools four times; at 28×28 it pads to 32 and crops back, so PAM runs on MNIST too."""
    fixture, yaml_path = mnist
    record_dir = tmp_path / "record" / fixture.record.name
    shutil.copytree(fixture.record, record_dir)
    result = run_defense("pam", record_dir, yaml_path=str(yaml_path), dataset_path=str(fixture.data), device="cpu",
                         epochs=1, unlearn_rounds=1, inversion_pretrain_steps=1, inversion_mask_steps=1,
                         inversion_generator_steps=1, generator_filters=4)
    state = torch.load(Path(result.save_path) / "trigger_generator.pt", weights_only=False)
    gen = generator_from_state(state)
    assert state["channels"] == 1 and gen(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)
