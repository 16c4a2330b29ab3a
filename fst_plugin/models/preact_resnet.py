"""Pre-activation ResNet-18 with exactly BackdoorBench's parameter names, order and shapes.

BackdoorBench's ``preactresnet18`` (head ``linear``, 102 state_dict entries, no final BatchNorm) is the
model most of its attack records hold; this independent implementation loads those state_dicts as they
are and writes ones BackdoorBench's ``generate_cls_model('preactresnet18')`` loads back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Attribute order fixes the state_dict order: bn1, conv1, bn2, conv2, shortcut.
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Stem conv, four stages of pre-activation blocks, global average pool, ``linear`` head."""

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 widths: tuple[int, ...] = (64, 128, 256, 512), in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        for i, (width, blocks) in enumerate(zip(widths, num_blocks)):
            setattr(self, f"layer{i + 1}", self._make_layer(width, blocks, stride=1 if i == 0 else 2))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(widths[-1], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of the head)."""
        out = self.conv1(x)
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return torch.flatten(self.avgpool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def preactresnet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels=in_channels)


def preactresnet_small(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """A quarter-width, three-stage PreActResNet (≈0.3M parameters) for CPU demos and benchmarks."""
    return PreActResNet((1, 1, 1), num_classes, widths=(32, 64, 128), in_channels=in_channels)
