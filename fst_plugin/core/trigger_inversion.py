"""Backdoor trigger inversion by decoupling benign features (BTI-DBF, Xu et al., ICLR 2024), the source of the
reversed backdoor samples that PAM unlearns with (Min et al., NeurIPS 2024).

A small U-Net generator learns to turn clean images into images whose features leave the benign ones while
staying close in pixels: a stand-in for the unknown trigger. Usable alone: ``invert(model, head, loader, config)``
returns the trained generator. The steps, written from the papers and the description of the authors'
``fine_tune/BTIDBF`` scripts (AISafety-HKUST/stable_backdoor_purification; nothing copied):

1. **pretrain** the generator to reproduce its input: same features and predictions, small pixel change;
2. **decouple**: a feature mask m in [0, 1] (tanh-bounded) such that the masked features m·f keep the label
   while the complement (1 − m)·f loses it (loss CE(m·f) − CE((1 − m)·f));
3. **train the generator**: keep the benign part m·f of the generated image's features, push the rest away
   (loss −MSE((1 − m)·f) + 0.01·MSE(m·f)), falling back to the pixel loss alone while the pixel MSE exceeds
   ``norm_bound`` or the benign-feature MSE exceeds ``feat_bound``; from the second round on, also CE towards
   the detected target.

Everything works on normalised model inputs, as the authors' loaders do. Features are the head's input
(the penultimate activations found by :class:`fst_plugin.core.head.ClassifierHead`). Where we differ on purpose:
the model stays in eval mode and frozen throughout (the authors put a copy in train mode while fitting the mask,
which moves its BatchNorm statistics), and the pretraining's prediction term is the cross-entropy of the
generated image's logits against the clean image's probabilities (theirs applies softmax to the logits first).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fst_plugin.core.head import ClassifierHead

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InversionConfig:
    """The authors' CIFAR-10 settings (cfg.py / defense.sh) as defaults."""

    pretrain_epochs: int = 50
    mask_epochs: int = 20
    generator_epochs: int = 30
    generator_lr: float = 1e-3
    mask_lr: float = 0.01
    norm_bound: float = 0.3
    feat_bound: float = 3.0
    base_filters: int = 32
    depth: int = 4


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU())


class TriggerGenerator(nn.Module):
    """A U-Net (max-pool down, transposed-conv up, skip connections, 1x1 conv out) from images to images."""

    def __init__(self, channels: int = 3, base_filters: int = 32, depth: int = 4) -> None:
        super().__init__()
        widths = [min(base_filters * 2 ** i, 512) for i in range(depth)]
        self.down = nn.ModuleList(_Block(cin, cout) for cin, cout in zip([channels, *widths[:-1]], widths))
        self.bottom = _Block(widths[-1], widths[-1] * 2)
        ups = [widths[-1] * 2, *reversed(widths[1:])]
        self.up = nn.ModuleList(nn.ConvTranspose2d(cin, cout, 2, stride=2) for cin, cout in zip(ups, reversed(widths)))
        self.merge = nn.ModuleList(_Block(2 * w, w) for w in reversed(widths))
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.out(x)


class FeatureView:
    """``model`` split at its head: features (the head's input) and the head on features."""

    def __init__(self, model: nn.Module, head: ClassifierHead) -> None:
        self.model, self.head = model, head.modules[-1]  # the layer that produces the logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[0]

    def output(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients inside the block, as it was (mode, ``requires_grad``) after it."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _epochs(count: int, loader: Iterable, device: str):
    for _ in range(count):
        for images, labels, *_ in loader:
            yield images.to(device), labels.to(device)


GeneratorLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _fit_generator(view: FeatureView, gen: TriggerGenerator, loader: Iterable, epochs: int, config: InversionConfig,
                   device: str, loss_of: GeneratorLoss) -> None:
    """Adam on the generator: ``loss_of(images, made, clean features, made features)`` per batch."""
    optimiser = torch.optim.Adam(gen.parameters(), lr=config.generator_lr)
    gen.train()
    for images, _ in _epochs(epochs, loader, device):
        made = gen(images)
        with torch.no_grad():
            clean_features = view.features(images)
        loss = loss_of(images, made, clean_features, view.features(made))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def pretrain(view: FeatureView, gen: TriggerGenerator, loader: Iterable, config: InversionConfig, device: str) -> None:
    """Step 1: the generator learns to reproduce clean images (same features and predictions, little change)."""
    def loss_of(images, made, clean, feats):
        loss_pred = F.cross_entropy(view.output(feats), view.output(clean).softmax(1))
        loss_norm = F.mse_loss(made, images)
        return loss_pred + F.mse_loss(feats, clean) + (100 * loss_norm if loss_norm > 0.1 else 0.01 * loss_norm)

    _fit_generator(view, gen, loader, config.pretrain_epochs, config, device, loss_of)


def decouple(view: FeatureView, loader: Iterable, config: InversionConfig, device: str,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Step 2: the benign-feature mask m in [0, 1] (shape of one feature vector)."""
    images, _, *_ = next(iter(loader))
    with torch.no_grad():
        shape = view.features(images[:1].to(device)).shape[1:]
    raw = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    optimiser = torch.optim.Adam([raw], lr=config.mask_lr)
    for images, labels in _epochs(config.mask_epochs, loader, device):
        mask = torch.tanh(raw) / (2 + 1e-7) + 0.5
        with torch.no_grad():
            features = view.features(images)
        loss = F.cross_entropy(view.output(mask * features), labels) - F.cross_entropy(view.output((1 - mask) * features),
                                                                                       labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return (torch.tanh(raw) / (2 + 1e-7) + 0.5).detach()


def train_generator(view: FeatureView, gen: TriggerGenerator, mask: torch.Tensor, loader: Iterable,
                    config: InversionConfig, device: str, target: Optional[int] = None) -> None:
    """Step 3: generated images keep the benign features m·f and move the rest; towards ``target`` if given."""
    def loss_of(images, made, clean, feats):
        benign, backdoor = F.mse_loss(mask * clean, mask * feats), F.mse_loss((1 - mask) * clean, (1 - mask) * feats)
        loss_norm = F.mse_loss(made, images)
        if loss_norm > config.norm_bound or benign > config.feat_bound:
            loss = loss_norm
        else:
            loss = -backdoor + 0.01 * benign
        if target is not None:
            loss = loss + F.cross_entropy(view.output(feats), torch.full((len(images),), target, device=device))
        return loss

    _fit_generator(view, gen, loader, config.generator_epochs, config, device, loss_of)


@torch.no_grad()
def detect_target(view: FeatureView, gen: TriggerGenerator, loader: Iterable, device: str, num_classes: int,
                  noise: float = 0.03) -> int:
    """The class the model (in eval mode, left as it was) gives most generated images (from slightly noised clean
    inputs)."""
    gen.eval()
    counts = torch.zeros(num_classes, dtype=torch.int64)
    with frozen(view.model) as model:
        for images, _ in _epochs(1, loader, device):
            made = gen(images + noise * torch.randn_like(images))
            counts += torch.bincount(model(made).argmax(1).cpu(), minlength=num_classes)
    return int(counts.argmax())


def with_reversed(images: torch.Tensor, gen: TriggerGenerator, fraction: float,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A copy of the batch whose ``int(fraction·n + 1)`` randomly chosen images are the generator's output
    (the authors' unlearning batch; the labels stay the true ones)."""
    count = min(len(images), int(fraction * len(images) + 1))
    chosen = torch.randperm(len(images), generator=generator)[:count].to(images.device)
    mixed = images.clone()
    with torch.no_grad():
        mixed[chosen] = gen(images[chosen])
    return mixed


def invert(model: nn.Module, head: ClassifierHead, loader: Iterable, config: InversionConfig, device: str,
           gen: Optional[TriggerGenerator] = None, target: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> TriggerGenerator:
    """One inversion round (pretraining first when ``gen`` is None): the mask, then the generator. ``model`` is
    left as it was (mode and ``requires_grad``)."""
    with frozen(model):
        view = FeatureView(model, head)
        if gen is None:
            images, *_ = next(iter(loader))
            gen = TriggerGenerator(images.shape[1], config.base_filters, config.depth).to(device)
            pretrain(view, gen, loader, config, device)
        mask = decouple(view, loader, config, device, generator)
        train_generator(view, gen, mask, loader, config, device, target)
    return gen.eval()
