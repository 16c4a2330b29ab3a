"""SENet-18 as BackdoorBench names it: pre-activation blocks with squeeze-and-excitation, head ``linear``.

BackdoorBench lists ``senet18`` in ``generate_cls_model`` (utils/aggregate_block/model_trainer_generate.py, its
``models/senet.py``): a conv-BN-ReLU stem (``conv1``, ``bn1``), four stages of two pre-activation blocks whose
residual branch is rescaled by two 1x1 convolutions (``fc1``: planes → planes/16, ``fc2``: back, both with
bias), global average pooling and ``linear``. This independent implementation has the same parameter names
and shapes, so a state_dict of that model loads here. (At BackdoorBench commit f02e353 its factory calls
``SENet18(num_classes=...)``, which that function does not accept; the module is the one it means to build.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fst_plugin.models.preact_resnet import PreActBlock


class SEPreActBlock(PreActBlock):
    """A pre-activation block whose residual branch is scaled channel-wise by a squeeze-and-excitation gate."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, planes, stride)
        self.fc1 = nn.Conv2d(planes, planes // 16, 1)
        self.fc2 = nn.Conv2d(planes // 16, planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        return out * gate + shortcut


class SENet(nn.Module):
    """Stem conv-BN-ReLU, stages of ``SEPreActBlock`` (strides 1, 2, 2, ...), average pool, ``linear`` head."""

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 widths: tuple[int, ...] = (64, 128, 256, 512), in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, (width, blocks) in enumerate(zip(widths, num_blocks)):
            layers = []
            for stride in [1 if i == 0 else 2] + [1] * (blocks - 1):
                layers.append(SEPreActBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.stages = len(stages)
        for i, stage in enumerate(stages):
            setattr(self, f"layer{i + 1}", stage)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def senet18(num_classes: int = 10, in_channels: int = 3) -> SENet:
    return SENet((2, 2, 2, 2), num_classes, in_channels=in_channels)
