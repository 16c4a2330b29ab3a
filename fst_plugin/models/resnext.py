"""ResNeXt-29 (2x64d) as BackdoorBench names it: three stages of grouped-convolution bottlenecks, head ``linear``.

BackdoorBench lists ``resnext29`` in ``generate_cls_model`` (utils/aggregate_block/model_trainer_generate.py, its
``models/resnext.py``, ``ResNeXt29_2x64d``): a 1x1 conv-BN stem of 64 channels (``conv1``, ``bn1``), three stages
of three blocks (strides 1, 2, 2), each block ``conv1`` 1x1 → ``conv2`` 3x3 grouped (``cardinality`` groups) →
``conv3`` 1x1 to twice the group width, each conv followed by its BN, a conv-BN ``shortcut`` where the shape
changes; the bottleneck width doubles after every stage; global average pooling and ``linear``. This independent
implementation has the same parameter names and shapes. (At BackdoorBench commit f02e353 its factory calls
``ResNeXt29_2x64d(num_classes=...)``, which that function does not accept; the module is the one it means to build.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXPANSION = 2  # a block's output has twice its group width


class GroupedBottleneck(nn.Module):
    def __init__(self, in_planes: int, cardinality: int, bottleneck_width: int, stride: int) -> None:
        super().__init__()
        group_width = cardinality * bottleneck_width
        out_planes = EXPANSION * group_width
        self.conv1 = nn.Conv2d(in_planes, group_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(group_width)
        self.conv3 = nn.Conv2d(group_width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNeXt(nn.Module):
    """1x1 stem, stages of ``GroupedBottleneck`` (bottleneck width doubling per stage), average pool, ``linear``."""

    def __init__(self, num_blocks: tuple[int, ...] = (3, 3, 3), cardinality: int = 2, bottleneck_width: int = 64,
                 num_classes: int = 10, stem_width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_planes, width = stem_width, bottleneck_width
        for i, blocks in enumerate(num_blocks):
            layers = []
            for stride in [1 if i == 0 else 2] + [1] * (blocks - 1):
                layers.append(GroupedBottleneck(in_planes, cardinality, width, stride))
                in_planes = EXPANSION * cardinality * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            width *= 2
        self.stages = len(num_blocks)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnext29(num_classes: int = 10, in_channels: int = 3) -> ResNeXt:
    """ResNeXt-29, 2x64d (cardinality 2, bottleneck width 64): BackdoorBench's ``resnext29``."""
    return ResNeXt((3, 3, 3), 2, 64, num_classes, in_channels=in_channels)
