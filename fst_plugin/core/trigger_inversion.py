"""Backdoor trigger inversion by decoupling benign features (BTI-DBF, Xu et al., ICLR 2024), the source of the
reversed backdoor samples that PAM unlearns with (Min et al., NeurIPS 2024), as the PAM authors run it
(AISafety-HKUST/stable_backdoor_purification, ``fine_tune/BTIDBF``: ``pretrain.py``, ``btidbfu.py``,
``models/unet_*.py``, ``models/mask.py``; written from reading them, nothing copied).

A U-Net generator learns to turn clean images into images whose features leave the benign ones while staying
close in pixels: a stand-in for the unknown trigger. Usable alone: ``invert(model, head, loader, config)`` returns
the trained generator. The steps, each a budget of optimiser steps (the authors' epochs over their 2500 images at
batch 128, 20 batches an epoch):

1. **pretrain** (1000 steps, their 50 epochs) the generator to reproduce its input: same features and
   predictions, small pixel change;
2. **decouple** (400 steps a round, their 20 epochs): a feature mask m in [0, 1] (tanh-bounded, drawn afresh each
   round) such that the masked features m·f keep the label while the complement (1 − m)·f loses it (loss
   CE(m·f) − CE((1 − m)·f)), fitted on a copy of the model in train mode, as theirs;
3. **train the generator** (600 steps a round, their 30 epochs), the copy in eval mode: keep the benign part m·f
   of the generated image's features, push the rest away (loss −MSE((1 − m)·f) + 0.01·MSE(m·f)), falling back to
   the pixel loss alone while the pixel MSE exceeds ``norm_bound`` or the benign-feature MSE exceeds
   ``feat_bound``; from the second round on, also CE towards the detected target. One Adam serves the generator
   across the rounds (theirs is made once, before the first round).

**The features** are the model's last feature map before its global pooling (the authors' ResNet-18 ``layer4``
output, C×H×W, which their ``from_features_to_output`` pools and classifies): :class:`FeatureView` finds, on one
probe batch, the last module output whose global average or max pool is the head's input, and classifies a
feature map by that pool and the head. A model where no such map exists (an MLP classifier behind the pool, as
VGG's or MobileNet-v3's, or a ViT) is split at the head's input instead, and the view says so (``split``).

Everything works on normalised model inputs, as the authors' loaders do. Deviations that remain are listed in
docs/pam.md.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fst_plugin.core.head import ClassifierHead
from fst_plugin.runtime import cpu_bf16_supported, phase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InversionConfig:
    """The authors' CIFAR-10 settings (cfg.py / defense.sh), the budgets in optimiser steps."""

    pretrain_steps: int = 1000
    mask_steps: int = 400
    generator_steps: int = 600
    generator_lr: float = 1e-3
    mask_lr: float = 0.01
    norm_bound: float = 0.3
    feat_bound: float = 3.0
    base_filters: int = 32
    depth: int = 4
    bf16: bool = False                    # the generator's passes under bfloat16 autocast (a precision choice)
    show_progress: Optional[bool] = None  # tqdm on a terminal, a log line per phase otherwise


def autocast(device: str, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``enabled`` (the generator costs ~4x the classifier per image; bf16 halves
    it on CPUs with native bf16 and on GPUs), else nothing."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled and (kind != "cpu" or cpu_bf16_supported()))


class _ConvBlock(nn.Module):
    """Two 3×3 convolutions, each followed by an affine InstanceNorm and a LeakyReLU (the authors'
    ``EncoderBlock``, which their decoder reuses)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True)
        self.conv2, self.norm2 = nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.norm1(self.conv1(x)))
        return F.leaky_relu(self.norm2(self.conv2(x)))


class TriggerGenerator(nn.Module):
    """The authors' U-Net (``UNet(n_channels=3, num_classes=3, base_filter_num=32, num_blocks=4)``): encoder blocks
    of ``base_filters·2^i`` channels (at most 512) with 2×2 max-pooling, a bottleneck of twice the last width, and
    decoder steps of a 3×3 stride-2 transposed convolution (channels kept) and a LeakyReLU, concatenated with the
    skip and merged by a block; a 1×1 convolution back to image channels. An image whose side is not a multiple of
    2^depth (MNIST's 28) is zero-padded to the next one and cropped back (theirs takes 32 and 224 only; at 28 four
    poolings would leave a 1×1 map that InstanceNorm refuses)."""

    def __init__(self, channels: int = 3, base_filters: int = 32, depth: int = 4) -> None:
        super().__init__()
        widths = [min(base_filters * 2 ** i, 512) for i in range(depth)]
        self.down = nn.ModuleList(_ConvBlock(cin, cout) for cin, cout in zip([channels, *widths[:-1]], widths))
        self.bottom = _ConvBlock(widths[-1], widths[-1] * 2)
        ups = [widths[-1] * 2, *reversed(widths[1:])]
        self.up = nn.ModuleList(nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1) for c in ups)
        self.merge = nn.ModuleList(_ConvBlock(c + w, w) for c, w in zip(ups, reversed(widths)))
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        unit = 2 ** len(self.down)
        x = F.pad(x, (0, -width % unit, 0, -height % unit))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([F.leaky_relu(up(x)), skip], dim=1))
        return self.out(x)[..., :height, :width]


_POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "avg": lambda f: f.mean(dim=(2, 3)),
    "max": lambda f: f.amax(dim=(2, 3)),
}


class FeatureView:
    """``model`` split at its last feature map before the global pooling in front of the head (``split`` names it),
    or, where no such map exists, at the head's input. ``features(x)`` runs the model and returns the map;
    ``output(features)`` pools and classifies it, as the authors' ``from_features_to_output``."""

    def __init__(self, model: nn.Module, head: ClassifierHead, probe: Optional[torch.Tensor] = None) -> None:
        self.model, self.head = model, head.modules[-1]  # the layer that produces the logits
        self.seam: Optional[nn.Module] = None
        self.pool: Optional[str] = None
        self.split = "the head's input"
        if probe is not None:
            self._find_seam(probe)

    @torch.no_grad()
    def _find_seam(self, probe: torch.Tensor) -> None:
        """The last module output (a map larger than 1×1) whose global average or max pool equals the head's
        input on ``probe``, in the model's current mode."""
        outputs: list[tuple[str, nn.Module, torch.Tensor]] = []
        head_input: list[torch.Tensor] = []

        def record(name: str, module: nn.Module) -> Callable:
            def hook(_m: nn.Module, _inputs: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                    outputs.append((name, module, out.detach().float().clone()))
            return hook

        handles = [m.register_forward_hook(record(n, m)) for n, m in self.model.named_modules()
                   if n and m is not self.head]
        handles.append(self.head.register_forward_hook(lambda _m, inputs, _o: head_input.append(inputs[0].detach())))
        try:
            self.model(probe)
        finally:
            for handle in handles:
                handle.remove()
        if not head_input or head_input[0].dim() != 2:
            return
        target = head_input[0].float()
        for name, module, out in reversed(outputs):
            for pool, reduce in _POOLS.items():
                pooled = reduce(out)
                if pooled.shape == target.shape and torch.allclose(pooled, target, rtol=1e-3, atol=1e-4):
                    self.seam, self.pool = module, pool
                    self.split = f"{name} ({'x'.join(map(str, out.shape[1:]))}, then global {pool} pool)"
                    return

    def features(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        if self.seam is None:
            handle = self.head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        else:
            handle = self.seam.register_forward_hook(lambda _m, _inputs, out: captured.append(out))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[-1].float()

    def output(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features if self.pool is None else _POOLS[self.pool](features))


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


def _steps(inversion: "Inversion", count: int, loader: Iterable, device: str, desc: str,
           show: Optional[bool]) -> Iterator[tuple]:
    """The batches (images, labels on ``device``) of the phase under way, from ``inversion.step`` to ``count``,
    passing over ``loader`` as often as needed; ``inversion.step`` counts each step taken (the caller steps once per
    batch) and ``inversion.saved`` is offered the state after it, so a long phase can be resumed. Progress: a bar on
    a terminal, else log lines."""
    if inversion.step >= count:
        return
    with phase(desc, count, show) as bar:
        bar.update(inversion.step)
        while True:
            for images, labels, *_ in loader:
                yield images.to(device), labels.to(device)
                inversion.step += 1
                bar.update(1)
                if inversion.step >= count:
                    return
                inversion.offer()


GeneratorLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _fit_generator(view: FeatureView, inversion: "Inversion", optimiser: torch.optim.Optimizer, loader: Iterable,
                   steps: int, device: str, loss_of: GeneratorLoss, desc: str, config: "InversionConfig") -> None:
    """Adam steps on the generator up to ``steps``: ``loss_of(images, made, clean features, made features)``."""
    gen = inversion.generator
    gen.train()
    for images, _ in _steps(inversion, steps, loader, device, desc, config.show_progress):
        with autocast(device, config.bf16):
            made = gen(images).float()
        with torch.no_grad():
            clean_features = view.features(images)
        loss = loss_of(images, made, clean_features, view.features(made))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def pretrain(view: FeatureView, inversion: "Inversion", loader: Iterable, config: InversionConfig, device: str) -> None:
    """Step 1: the generator learns to reproduce clean images (same features and predictions, little change), with
    its own Adam (the authors' pretrain.py). The prediction term is theirs: ``CrossEntropyLoss`` with the clean
    image's softmax as the input and the generated image's softmax as the soft target."""
    def loss_of(images, made, clean, feats):
        loss_pred = F.cross_entropy(view.output(clean).softmax(1), view.output(feats).softmax(1))
        loss_norm = F.mse_loss(made, images)
        return loss_pred + F.mse_loss(feats, clean) + (100 * loss_norm if loss_norm > 0.1 else 0.01 * loss_norm)

    if inversion.pretrain_optimiser is None:
        inversion.pretrain_optimiser = torch.optim.Adam(inversion.generator.parameters(), lr=config.generator_lr)
    _fit_generator(view, inversion, inversion.pretrain_optimiser, loader, config.pretrain_steps, device, loss_of,
                   "inversion: pretraining", config)
    inversion.advance("mask")


def decouple(view: FeatureView, inversion: "Inversion", loader: Iterable, config: InversionConfig, device: str,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Step 2: the benign-feature mask m in [0, 1], of one feature map's shape (batch dimension 1), fitted in the
    model's current mode (the authors': a copy in train mode), from a fresh random start each round."""
    if inversion.mask_raw is None:
        images, _, *_ = next(iter(loader))
        with torch.no_grad():
            shape = view.features(images[:1].to(device)).shape
        inversion.mask_raw = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
        inversion.mask_optimiser = torch.optim.Adam([inversion.mask_raw], lr=config.mask_lr)
    raw, optimiser = inversion.mask_raw, inversion.mask_optimiser
    for images, labels in _steps(inversion, config.mask_steps, loader, device, "inversion: benign-feature mask",
                                 config.show_progress):
        mask = torch.tanh(raw) / (2 + 1e-7) + 0.5
        with torch.no_grad():
            features = view.features(images)
        loss = F.cross_entropy(view.output(mask * features), labels) - F.cross_entropy(view.output((1 - mask) * features),
                                                                                       labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    inversion.mask = (torch.tanh(raw) / (2 + 1e-7) + 0.5).detach()
    inversion.advance("generator")
    return inversion.mask


def train_generator(view: FeatureView, inversion: "Inversion", loader: Iterable, config: InversionConfig, device: str,
                    target: Optional[int] = None) -> None:
    """Step 3: generated images keep the benign features m·f and move the rest; towards ``target`` if given."""
    mask = inversion.mask

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

    _fit_generator(view, inversion, inversion.optimiser, loader, config.generator_steps, device, loss_of,
                   "inversion: trigger generator", config)
    inversion.advance("done")


@torch.no_grad()
def class_counts(model: nn.Module, gen: TriggerGenerator, loader: Iterable, device: str, num_classes: int,
                 noise: float = 0.03) -> torch.Tensor:
    """How many generated images (from slightly noised clean inputs, one pass over ``loader``) the model, in eval
    mode and left as it was, gives each class (the authors' ``get_target_label`` counts)."""
    gen.eval()
    counts = torch.zeros(num_classes, dtype=torch.int64)
    with frozen(model):
        for images, *_ in loader:
            images = images.to(device)
            made = gen(images + noise * torch.randn_like(images))
            counts += torch.bincount(model(made).argmax(1).cpu(), minlength=num_classes)
    return counts


def detect_target(model: nn.Module, gen: TriggerGenerator, loader: Iterable, device: str, num_classes: int,
                  noise: float = 0.03) -> int:
    """The class the model gives most generated images."""
    return int(class_counts(model, gen, loader, device, num_classes, noise).argmax())


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


def mask_saturation(mask: torch.Tensor) -> float:
    """Mean of |2m − 1|: 0 when every entry sits at its random start's centre 0.5, 1 when each is 0 or 1."""
    return float((2 * mask - 1).abs().mean())


@dataclass
class Inversion:
    """A trigger generator and everything that fits it, resumable at any step: its Adam (one for every round, as the
    authors'), the pretraining's own Adam, the mask and its Adam while it is fitted, the phase under way
    (``pretrain`` → ``mask`` → ``generator`` → ``done``; a new round starts again at ``mask``) and the steps taken in
    it, and the feature split. ``saved``, when set, is offered the inversion after every step (it decides itself
    whether to write, e.g. at most every few minutes) and after every phase."""

    generator: TriggerGenerator
    optimiser: torch.optim.Optimizer
    phase: str = "pretrain"
    step: int = 0
    mask: Optional[torch.Tensor] = None
    split: str = ""
    pretrain_optimiser: Optional[torch.optim.Optimizer] = None
    mask_raw: Optional[torch.Tensor] = None
    mask_optimiser: Optional[torch.optim.Optimizer] = None
    saved: Optional[Callable[["Inversion", bool], None]] = None

    @classmethod
    def new(cls, channels: int, config: InversionConfig, device: str) -> "Inversion":
        gen = TriggerGenerator(channels, config.base_filters, config.depth).to(device)
        return cls(gen, torch.optim.Adam(gen.parameters(), lr=config.generator_lr))

    def offer(self, phase_ended: bool = False) -> None:
        if self.saved is not None:
            self.saved(self, phase_ended)

    def advance(self, phase: str) -> None:
        """The phase under way is finished: the next one starts at step 0 (what only that phase used is dropped)."""
        if self.phase == "pretrain":
            self.pretrain_optimiser = None
        if self.phase == "mask":
            self.mask_raw = self.mask_optimiser = None
        self.phase, self.step = phase, 0
        self.offer(phase_ended=True)

    def next_round(self) -> None:
        if self.phase == "done":
            self.phase, self.step, self.mask = "mask", 0, None

    def state_dict(self) -> dict[str, Any]:
        """Everything but the generator's architecture settings (the caller's config has them), on the CPU."""
        def cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().cpu().clone()

        def opt(o: Optional[torch.optim.Optimizer]) -> Optional[dict[str, Any]]:
            return None if o is None else copy.deepcopy(o.state_dict())

        return {"generator": {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
                "optimiser": opt(self.optimiser), "phase": self.phase, "step": self.step, "mask": cpu(self.mask),
                "split": self.split, "pretrain_optimiser": opt(self.pretrain_optimiser), "mask_raw": cpu(self.mask_raw),
                "mask_optimiser": opt(self.mask_optimiser)}

    @classmethod
    def from_state(cls, state: dict[str, Any], channels: int, config: InversionConfig, device: str) -> "Inversion":
        inversion = cls.new(channels, config, device)
        inversion.generator.load_state_dict(state["generator"])
        inversion.optimiser.load_state_dict(state["optimiser"])
        inversion.phase, inversion.step, inversion.split = state["phase"], state["step"], state["split"]
        inversion.mask = None if state["mask"] is None else state["mask"].to(device)
        if state["pretrain_optimiser"] is not None:
            inversion.pretrain_optimiser = torch.optim.Adam(inversion.generator.parameters(), lr=config.generator_lr)
            inversion.pretrain_optimiser.load_state_dict(state["pretrain_optimiser"])
        if state["mask_raw"] is not None:
            inversion.mask_raw = state["mask_raw"].to(device).requires_grad_(True)
            inversion.mask_optimiser = torch.optim.Adam([inversion.mask_raw], lr=config.mask_lr)
            inversion.mask_optimiser.load_state_dict(state["mask_optimiser"])
        return inversion


def invert(model: nn.Module, head: ClassifierHead, loader: Iterable, config: InversionConfig, device: str,
           inversion: Optional[Inversion] = None, target: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> Inversion:
    """One inversion round on a copy of ``model``: pretraining first when ``inversion`` is None (or still in it),
    then the mask with the copy in train mode, then the generator with it in eval mode. A finished ``inversion``
    starts a new round; one stopped mid-round (restored from its state) continues where it stopped. ``model``
    itself is not touched."""
    probe, *_ = next(iter(loader))
    probe = probe.to(device)
    if inversion is None:
        inversion = Inversion.new(probe.shape[1], config, device)
    inversion.next_round()
    copied = copy.deepcopy(model).requires_grad_(False)
    view = FeatureView(copied.eval(), head_of_copy(model, copied, head), probe)
    inversion.split = view.split
    if inversion.phase == "pretrain":
        pretrain(view, inversion, loader, config, device)
    if inversion.phase == "mask":
        copied.train()
        decouple(view, inversion, loader, config, device, generator)
        copied.eval()
    if inversion.phase == "generator":
        train_generator(view, inversion, loader, config, device, target)
    inversion.generator.eval()
    return inversion


def head_of_copy(model: nn.Module, copied: nn.Module, head: ClassifierHead) -> ClassifierHead:
    """``head``'s layers as they sit in ``copied``, a deep copy of ``model``."""
    return ClassifierHead(tuple((name, copied.get_submodule(name)) for name in head.names))
