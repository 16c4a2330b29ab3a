"""ResNet-9 (the DAWNBench / Myrtle CIFAR-10 net) at a configurable width: the CPU benchmark protocol's model.

Why this model: PreActResNet18 costs about 18 minutes per CIFAR-10 epoch on a two-core CPU, so the FST paper's
grid cannot be reproduced there. ResNet-9 reaches PreActResNet18-like accuracy in far fewer epochs (8 convs,
two residual blocks, max-pooling instead of strided convs); at half width (32-64-128-256) one epoch takes
about 80 s on two AVX-512 cores. It keeps what FST needs: a global-pooled penultimate feature vector
(``features``) and one ``linear`` head.

``cpu_bf16``: on CPUs with native bfloat16 (AVX512-BF16 / AMX, checked at run time) the convolutional trunk runs
under ``torch.autocast('cpu', bfloat16)``, about twice as fast as float32 here; the head and the loss stay in
float32, so the FST penalty and the head-norm projection are computed exactly. Weights are kept channels_last
(faster CPU convolutions); ``load_state_dict`` copies into them and keeps that layout. On CUDA nothing of
this applies (use the caller's own AMP there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fst_plugin.runtime import cpu_bf16_supported


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + two conv-BN-ReLU layers (no downsampling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = _conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class ResNet9(nn.Module):
    """prep → layer1 (pool + residual) → layer2 (pool) → layer3 (pool + residual) → global max pool → linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 in_channels: int = 3, cpu_bf16: bool = False) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.prep = _conv_bn(in_channels, w0)
        self.layer1 = nn.Sequential(_conv_bn(w0, w1, pool=True), Residual(w1))
        self.layer2 = _conv_bn(w1, w2, pool=True)
        self.layer3 = nn.Sequential(_conv_bn(w2, w3, pool=True), Residual(w3))
        self.linear = nn.Linear(w3, num_classes)
        self.cpu_bf16 = cpu_bf16 and cpu_bf16_supported()
        self.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the head's input), float32."""
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16 and x.device.type == "cpu"):
            out = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return torch.flatten(F.adaptive_max_pool2d(out, 1), 1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def resnet9(num_classes: int = 10, in_channels: int = 3) -> ResNet9:
    """Full-width ResNet-9 (64-128-256-512), float32."""
    return ResNet9(num_classes, (64, 128, 256, 512), in_channels)


def resnet9_cpu(num_classes: int = 10, in_channels: int = 3) -> ResNet9:
    """Half-width ResNet-9 (32-64-128-256, ≈1.6M parameters) with the bf16 CPU trunk: the CPU protocol's model."""
    return ResNet9(num_classes, (32, 64, 128, 256), in_channels, cpu_bf16=True)
