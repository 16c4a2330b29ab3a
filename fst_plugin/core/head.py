"""Finding the classifier head of an arbitrary image classifier.

The head is the last ``nn.Linear`` whose ``out_features`` equals the class count (``linear`` in
BackdoorBench's PreActResNet18, ``fc`` in torchvision ResNets, ``classifier.6`` in VGG and AlexNet,
``classifier.1`` / ``.2`` / ``.3`` in EfficientNet / ConvNeXt / MobileNet-v3, ``1.heads.head`` in BackdoorBench's
``Sequential(Resize, ViT)``; ``fc`` rather than the auxiliary heads of Inception-v3 and GoogLeNet). A model whose
logits come from a convolution (SqueezeNet) has no such head and is refused. ``head_name`` overrides the search
with a dotted module name. ``whole_classifier`` widens the head to every ``nn.Linear`` inside the head's parent
block (the paper's choice for VGG19-BN's three-layer classifier): all of them are re-initialised, penalised and
projected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fst_plugin.errors import ModelError


@dataclass(frozen=True)
class ClassifierHead:
    """The head's linear layers (qualified name, module), the last one producing the logits."""

    layers: tuple[tuple[str, nn.Linear], ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]

    @property
    def modules(self) -> list[nn.Linear]:
        return [module for _, module in self.layers]

    def parameter_names(self) -> set[str]:
        """Qualified names of every parameter (weights and biases) that belongs to the head."""
        return {f"{name}.{p}" for name, module in self.layers for p, _ in module.named_parameters()}


def _resolve(model: nn.Module, dotted: str) -> nn.Module:
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ModelError(
            f"--head {dotted!r} names no module of {type(model).__name__}",
            f"pass the dotted name of its classifier layer; its Linear layers are {names or 'none'}",
        ) from None


def find_head(
    model: nn.Module,
    num_classes: int,
    head_name: str | None = None,
    whole_classifier: bool = False,
) -> ClassifierHead:
    """Locate the classifier head of ``model`` (see the module docstring for the rules)."""
    if head_name:
        last_name, last = head_name, _resolve(model, head_name)
        if isinstance(last, nn.Sequential) and not isinstance(last, nn.Linear):
            linears = [(f"{head_name}.{n}", m) for n, m in last.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ModelError(f"--head {head_name!r} contains no nn.Linear layer",
                                 "name the Linear layer (or the block holding it) that produces the logits")
            last_name, last = linears[-1]
        if not isinstance(last, nn.Linear):
            raise ModelError(
                f"--head {head_name!r} is a {type(last).__name__}, not an nn.Linear",
                "name the nn.Linear layer that produces the logits",
            )
        if last.out_features != num_classes:
            raise ModelError(
                f"head {last_name!r} has {last.out_features} outputs but the record has {num_classes} classes",
                "check --head and the record's num_classes",
            )
    else:
        candidates = [(n, m) for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and m.out_features == num_classes]
        if not candidates:
            convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
            if convs:  # SqueezeNet: a 1x1 convolution produces the logits
                raise ModelError(
                    f"no nn.Linear layer with {num_classes} outputs found in {type(model).__name__}: its classifier "
                    f"is a convolution ({convs[-1]})",
                    "feature shift tuning needs a linear head (--head cannot name a convolution): use a model with an "
                    "nn.Linear classifier",
                )
            raise ModelError(
                f"no nn.Linear layer with {num_classes} outputs found in {type(model).__name__}",
                "pass --head with the dotted name of the classifier layer, or check num_classes",
            )
        last_name, last = candidates[-1]
    if not whole_classifier or "." not in last_name:
        return ClassifierHead(((last_name, last),))
    parent_name = last_name.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_name)
    layers = tuple((f"{parent_name}.{n}", m) for n, m in parent.named_modules()
                   if isinstance(m, nn.Linear))
    return ClassifierHead(layers)


@torch.no_grad()
def reinit_head(head: ClassifierHead) -> None:
    """Draw every head weight and bias from U(−1/√d, 1/√d), d = in_features (the paper's re-init)."""
    for layer in head.modules:
        bound = 1.0 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.weight, -bound, bound)
        if layer.bias is not None:
            nn.init.uniform_(layer.bias, -bound, bound)


def feature_shift_penalty(head: ClassifierHead, initial_weights: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l ⟨W_l, W₀_l⟩ (Frobenius): minimising it pushes the head away from the backdoored one."""
    return sum((layer.weight * w0).sum() for layer, w0 in zip(head.modules, initial_weights))


@torch.no_grad()
def project_head_norm(head: ClassifierHead, target_norms: list[torch.Tensor], at_most: bool = False) -> None:
    """Rescale each head weight to the Frobenius norm of the backdoored head (W ← W·‖W₀‖/‖W‖); with
    ``at_most``, only the weights whose norm exceeds it (projection onto the ball ‖W‖ ≤ ‖W₀‖)."""
    for layer, norm in zip(head.modules, target_norms):
        current = layer.weight.norm()
        if current > 0 and not (at_most and current <= norm):
            layer.weight.mul_(norm / current)
