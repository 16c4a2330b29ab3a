"""BTI-DBF trigger inversion (core/trigger_inversion.py), as plumbing on a tiny model: shapes, the mask's range,
that pretraining teaches the generator to reproduce its input, that the unlearning batch swaps exactly
int(0.2·n + 1) images, and that the model is left untouched."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fst_plugin.core.head import find_head
from fst_plugin.core.trigger_inversion import (
    FeatureView, InversionConfig, TriggerGenerator, decouple, detect_target, invert, pretrain, with_reversed,
)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10))
    smooth = F.interpolate(torch.randn(32, 3, 4, 4), size=16, mode="bilinear", align_corners=False)  # image-like
    data = TensorDataset(smooth, torch.randint(0, 10, (32,)))
    return model.eval(), find_head(model, 10), DataLoader(data, batch_size=16)


def test_the_generator_maps_images_to_images_and_pretraining_teaches_it_to_reproduce_them():
    model, head, loader = _setup()
    gen = TriggerGenerator(3, base_filters=4, depth=2)
    images = next(iter(loader))[0]
    assert gen(images).shape == images.shape
    before = F.mse_loss(gen(images), images).item()
    pretrain(FeatureView(model, head), gen, loader, InversionConfig(pretrain_epochs=20, generator_lr=1e-2,
                                                                           base_filters=4), "cpu")
    assert F.mse_loss(gen(images), images).item() < 0.5 * before


def test_the_mask_has_the_feature_shape_and_lies_in_zero_one():
    model, head, loader = _setup()
    mask = decouple(FeatureView(model, head), loader, InversionConfig(mask_epochs=2), "cpu", torch.Generator().manual_seed(0))
    assert mask.shape == (8,) and float(mask.min()) >= 0 and float(mask.max()) <= 1


def test_a_round_leaves_the_model_untouched_and_the_unlearning_batch_swaps_exactly_int_02n_plus_1_images():
    model, head, loader = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = InversionConfig(pretrain_epochs=1, mask_epochs=1, generator_epochs=1, base_filters=4, depth=2)
    gen = invert(model, head, loader, config, "cpu", generator=torch.Generator().manual_seed(0))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    images = next(iter(loader))[0]
    mixed = with_reversed(images, gen, 0.2, torch.Generator().manual_seed(0))
    changed = (mixed != images).flatten(1).any(1)
    assert int(changed.sum()) == int(0.2 * len(images) + 1)
    target = detect_target(FeatureView(model, head), gen, loader, "cpu", 10)
    assert 0 <= target < 10
