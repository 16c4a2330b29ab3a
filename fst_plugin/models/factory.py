"""Build a classifier by the ``model_name`` an attack record carries, in the form BackdoorBench builds it.

Every name of BackdoorBench's ``generate_cls_model`` (utils/aggregate_block/model_trainer_generate.py) builds
here, without downloading anything, into a module whose state_dict has BackdoorBench's parameter names and
shapes: ``preactresnet18``, ``senet18`` and ``resnext29`` are our own implementations of its CIFAR models; every
other name is torchvision's model of that name with ``num_classes`` outputs, built without pretrained weights
(BackdoorBench's ``vit_*`` and ``convnext_tiny`` start from ImageNet weights, which a record's weights replace
anyway), in BackdoorBench's form (:func:`backdoorbench_form`). Any other torchvision classification name
builds too, and ``preactresnet_small``, ``resnet9`` and ``resnet9_cpu`` are this package's CPU models.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torchvision
from torch import nn
from torchvision.models import GoogLeNet, Inception3
from torchvision.transforms import Resize

from fst_plugin.errors import ModelError
from fst_plugin.models.preact_resnet import preactresnet18, preactresnet_small
from fst_plugin.models.resnet9 import resnet9, resnet9_cpu
from fst_plugin.models.resnext import resnext29
from fst_plugin.models.senet import senet18

_OWN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "preactresnet18": preactresnet18,
    "preactresnet_small": preactresnet_small,
    "resnet9": resnet9,
    "resnet9_cpu": resnet9_cpu,
    "resnext29": resnext29,
    "senet18": senet18,
}
OWN_CPU_MODELS = ("preactresnet_small", "resnet9", "resnet9_cpu")  # ours alone: BackdoorBench cannot build them
VIT_INPUT_SIZE = (224, 224)  # BackdoorBench resizes every input to a ViT's pretraining size


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def available_models() -> list[str]:
    return sorted(_OWN_MODELS) + sorted(_torchvision_names())


def backdoorbench_form(model: nn.Module, name: str) -> nn.Module:
    """``model`` (torchvision's ``name``) as BackdoorBench holds it, ready for the tuning loop.

    * A ViT (BackdoorBench's ``model_name.startswith("vit")`` branch) sits behind ``Resize((224, 224))`` in an
      ``nn.Sequential``, so its state_dict keys start with ``1.``.
    * Inception-v3 and GoogLeNet keep their auxiliary classifiers (their weights are in every state_dict) but
      return the logits alone in training mode too: the tuning loop takes one logits tensor, not the
      ``(logits, aux)`` tuple torchvision returns while training. The auxiliary heads get no gradient.
    """
    if isinstance(model, (Inception3, GoogLeNet)):
        model.aux_logits = False
    if name.startswith("vit"):
        return nn.Sequential(Resize(VIT_INPUT_SIZE), model)
    return model


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Return an untrained ``name`` with ``num_classes`` outputs, in BackdoorBench's form."""
    if name in _OWN_MODELS:
        return _OWN_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if name not in _torchvision_names():
        raise ModelError(f"unknown model_name {name!r}",
                         "use a BackdoorBench model name (preactresnet18, vgg19_bn, vit_b_16, ...), "
                         "preactresnet_small, resnet9_cpu or a torchvision classification model name")
    if in_channels != 3:
        raise ModelError(f"model {name!r} takes 3-channel images, not {in_channels}",
                         "use preactresnet18, senet18 or resnext29 for a grayscale dataset")
    return backdoorbench_form(torchvision.models.get_model(name, weights=None, num_classes=num_classes), name)


def load_weights(model: nn.Module, state_dict: dict, model_name: str) -> None:
    """Load ``state_dict`` (a DataParallel ``module.`` prefix is stripped) or say what does not fit.

    The state_dict's ``_metadata`` (each module's version) travels along; a plain dict without it (as a record
    loader may hand over) is read as written by this torchvision: MNASNet refuses a state_dict without a version.
    """
    def strip(key: str) -> str:
        return key[7:] if key.startswith("module.") else "" if key == "module" else key

    metadata = getattr(state_dict, "_metadata", None)
    state_dict = OrderedDict((strip(k), v) for k, v in state_dict.items())
    if metadata is None:
        metadata = getattr(model.state_dict(), "_metadata", {})
    state_dict._metadata = OrderedDict((strip(k), v) for k, v in metadata.items())  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise ModelError(f"the record's state_dict does not fit model {model_name!r} ({detail})",
                         "check the record's model_name and num_classes, or re-run the attack") from None
