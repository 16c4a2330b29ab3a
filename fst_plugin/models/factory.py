"""Build a classifier by the ``model_name`` an attack record carries.

Our own models come first (``preactresnet18`` matches BackdoorBench's state_dict exactly); any other name
is passed to torchvision's model registry (``resnet18``, ``vgg19_bn``, ``densenet161``, ``vit_b_16``...),
built without pretrained weights and with ``num_classes`` outputs.
"""
from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn

from fst_plugin.errors import ModelError
from fst_plugin.models.preact_resnet import preactresnet18, preactresnet_small
from fst_plugin.models.resnet9 import resnet9, resnet9_cpu

_OWN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "preactresnet18": preactresnet18,
    "preactresnet_small": preactresnet_small,
    "resnet9": resnet9,
    "resnet9_cpu": resnet9_cpu,
}


def available_models() -> list[str]:
    return sorted(_OWN_MODELS) + sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Return an untrained ``name`` with ``num_classes`` outputs."""
    if name in _OWN_MODELS:
        return _OWN_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ModelError(f"unknown model_name {name!r}",
                     "use preactresnet18, preactresnet_small or a torchvision classification model name")


def load_weights(model: nn.Module, state_dict: dict, model_name: str) -> None:
    """Load ``state_dict`` (a DataParallel ``module.`` prefix is stripped) or say what does not fit."""
    state_dict = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise ModelError(f"the record's state_dict does not fit model {model_name!r} ({detail})",
                         "check the record's model_name and num_classes, or re-run the attack") from None
