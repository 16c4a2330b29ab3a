"""fst_plugin.defense.backend: BackdoorBench's model factory first, ours only for a model it does not know."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fst_plugin.defense.backend import BackdoorBenchBackend


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
