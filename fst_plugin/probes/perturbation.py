"""QRA's generator: the authors' autoencoder and the eps-bounded perturbation it drives, saved and loaded here.

The perturbation is added to the [0, 1] pixel tensor (the test transform without its Normalize), so ``eps = 0`` is
an exact identity (see :mod:`fst_plugin.probes.qra` for the protocol).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision import transforms

from fst_plugin.data import get_transform
from fst_plugin.probes.output import cpu_state
from fst_plugin.record import load_untrusted

HIDDEN = 1024


class ReactivationAE(nn.Module):
    """The script's autoencoder: an MLP on the flattened normalised image, tanh out (a direction in [-1, 1])."""

    def __init__(self, shape: tuple[int, int, int], hidden: int = HIDDEN) -> None:
        super().__init__()
        self.shape = tuple(shape)
        pixels = int(np.prod(shape))
        self.net = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, pixels), nn.Tanh())

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.net(normalised.flatten(1)).view(-1, *self.shape)


class Perturbation(nn.Module):
    """Pixels in [0, 1] → the model input: normalise(clamp(pixels + clamp(eps·AE(normalise(pixels)), ±eps), 0, 1))."""

    def __init__(self, ae: ReactivationAE, eps: float, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.ae, self.eps = ae, float(eps)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def perturbed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        delta = torch.clamp(self.ae(self.normalise(pixels)) * self.eps, -self.eps, self.eps)
        return torch.clamp(pixels + delta, 0, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.perturbed_pixels(pixels))

    def saved_form(self) -> dict[str, Any]:
        """What ``qra_result.pt`` holds: enough to rebuild it with :func:`load_perturbation`."""
        return {"shape": list(self.ae.shape), "hidden": HIDDEN, "eps": self.eps,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), "model": cpu_state(self.ae)}


def pixel_transform(dataset: str) -> transforms.Compose:
    """The dataset's test transform without its final Normalize: images as [0, 1] tensors, the space of eps."""
    steps = get_transform(dataset, train=False).transforms
    assert isinstance(steps[-1], transforms.Normalize), steps
    return transforms.Compose(steps[:-1])


def load_perturbation(path: Path, trust: bool = False) -> Perturbation:
    """A saved ``qra_result.pt`` as a ready :class:`Perturbation` (eval mode)."""
    saved = load_untrusted(path, "QRA result", trust=trust)
    ae = ReactivationAE(tuple(saved["shape"]), int(saved["hidden"]))
    ae.load_state_dict(saved["model"])
    return Perturbation(ae, saved["eps"], tuple(saved["mean"]), tuple(saved["std"])).eval()
