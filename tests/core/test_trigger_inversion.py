"""BTI-DBF trigger inversion (core/trigger_inversion.py) as the PAM authors run it, as plumbing on tiny models: the
feature split before the global pool (and its fallback), the authors' U-Net, budgets counted in optimiser steps,
the mask fitted on a copy in train mode, one Adam for the generator across rounds, the phase log lines, and that
the model is left untouched."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fst_plugin.core.head import find_head
from fst_plugin.core.trigger_inversion import (
    FeatureView, Inversion, InversionConfig, TriggerGenerator, decouple, detect_target, invert, mask_saturation,
    pretrain, with_reversed,
)


class _Pooled(nn.Module):
    """conv → BN → ReLU → functional global pool → head: the seam is the ReLU's map, pooled by ``pool``."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = pool
        self.linear = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        pooled = f.amax(dim=(2, 3)) if self.pool == "max" else F.adaptive_avg_pool2d(f, 1).flatten(1)
        return self.linear(pooled)


def _loader(n: int = 32) -> DataLoader:
    smooth = F.interpolate(torch.randn(n, 3, 4, 4), size=16, mode="bilinear", align_corners=False)  # image-like
    return DataLoader(TensorDataset(smooth, torch.randint(0, 10, (n,))), batch_size=16)


def _fresh() -> Inversion:
    return Inversion.new(3, InversionConfig(base_filters=4, depth=2), "cpu")


def _setup(pool: str = "avg"):
    torch.manual_seed(0)
    model = _Pooled(pool).eval()
    return model, find_head(model, 10), _loader()


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_the_features_are_the_last_map_before_the_global_pool_and_the_output_reproduces_the_logits(pool):
    model, head, loader = _setup(pool)
    images = next(iter(loader))[0]
    view = FeatureView(model, head, images)
    features = view.features(images)
    assert features.shape == (16, 8, 16, 16)
    assert view.split == f"body (8x16x16, then global {pool} pool)"
    assert torch.allclose(view.output(features), model(images), atol=1e-5)


def test_a_model_with_an_mlp_behind_the_pool_is_split_at_the_heads_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    images = next(iter(_loader()))[0]
    view = FeatureView(model, find_head(model, 10), images)
    assert view.split == "the head's input" and view.pool is None
    assert view.features(images).shape == (16, 16)
    assert torch.allclose(view.output(view.features(images)), model(images), atol=1e-6)


def test_the_generator_is_the_authors_unet_and_pretraining_teaches_it_to_reproduce_images():
    gen = TriggerGenerator(3, base_filters=32, depth=4)
    norms = [m for m in gen.modules() if isinstance(m, nn.InstanceNorm2d)]
    ups = [m for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert norms and all(m.affine for m in norms)
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in ups] == [
        (512, 512, (3, 3), (2, 2)), (256, 256, (3, 3), (2, 2)), (128, 128, (3, 3), (2, 2)), (64, 64, (3, 3), (2, 2))]
    model, head, loader = _setup()
    small = TriggerGenerator(3, base_filters=4, depth=2)
    images = next(iter(loader))[0]
    assert small(images).shape == images.shape
    before = F.mse_loss(small(images), images).item()
    pretrain(FeatureView(model, head, images), Inversion(small, torch.optim.Adam(small.parameters())), loader,
             InversionConfig(pretrain_steps=40, generator_lr=1e-2, base_filters=4), "cpu")
    assert F.mse_loss(small(images), images).item() < 0.5 * before


def test_the_generator_takes_images_whose_side_is_not_a_multiple_of_its_poolings():
    gen = TriggerGenerator(1, base_filters=4, depth=4).eval()
    mnist = torch.rand(2, 1, 28, 28)
    assert gen(mnist).shape == mnist.shape


def test_budgets_are_optimiser_steps_whatever_the_loaders_length(caplog):
    model, head, loader = _setup()  # 2 batches an epoch
    images = next(iter(loader))[0]
    view = FeatureView(model, head, images)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    with caplog.at_level(logging.INFO):
        decouple(view, _fresh(), loader, InversionConfig(mask_steps=5, show_progress=False), "cpu",
                 torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) == 1 + 5  # the shape probe, then one forward per step: 2.5 passes over the loader
    assert any("benign-feature mask: done, 5/5 steps in" in r.getMessage() for r in caplog.records)


def test_the_mask_has_the_feature_maps_shape_and_lies_in_zero_one():
    model, head, loader = _setup()
    view = FeatureView(model, head, next(iter(loader))[0])
    mask = decouple(view, _fresh(), loader, InversionConfig(mask_steps=2), "cpu", torch.Generator().manual_seed(0))
    assert mask.shape == (1, 8, 16, 16) and float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert mask_saturation(torch.full((4,), 0.5)) == 0.0 and mask_saturation(torch.tensor([0.0, 1.0])) == 1.0


def test_a_round_fits_the_mask_on_a_copy_in_train_mode_and_leaves_the_model_untouched(caplog, monkeypatch):
    model, head, loader = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[tuple[bool, bool]] = []  # (the viewed model is the caller's, it is in train mode) at each features()
    features = FeatureView.features
    monkeypatch.setattr(FeatureView, "features",
                        lambda self, x: seen.append((self.model is model, self.model.training)) or features(self, x))
    original_body = model.body
    config = InversionConfig(pretrain_steps=1, mask_steps=2, generator_steps=2, base_filters=4, depth=2,
                             show_progress=False)
    with caplog.at_level(logging.INFO):
        inversion = invert(model, head, loader, config, "cpu", generator=torch.Generator().manual_seed(0))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm statistics included: the copy moved, not the model
    assert model.body is original_body and not model.training
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    phases = [r.getMessage().split(":")[1].strip() for r in caplog.records if r.getMessage().startswith("inversion:")]
    assert phases == ["pretraining", "benign-feature mask", "trigger generator"]
    assert inversion.split.startswith("body (") and inversion.mask.shape == (1, 8, 16, 16)
    assert not any(is_callers for is_callers, _ in seen)
    # pretraining (1 step, 2 passes) in eval mode, the mask (shape probe + 2 steps) in train mode, the generator in eval
    assert [training for _, training in seen] == [False] * 2 + [True] * 3 + [False] * 4


def test_one_adam_carries_the_generator_across_rounds():
    model, head, loader = _setup()
    config = InversionConfig(pretrain_steps=1, mask_steps=1, generator_steps=3, base_filters=4, depth=2,
                             show_progress=False)
    first = invert(model, head, loader, config, "cpu", generator=torch.Generator().manual_seed(0))
    optimiser = first.optimiser
    steps_after_one = optimiser.state[next(iter(first.generator.parameters()))]["step"].item()
    second = invert(model, head, loader, config, "cpu", inversion=first, target=3,
                    generator=torch.Generator().manual_seed(1))
    assert second is first and second.optimiser is optimiser
    assert optimiser.state[next(iter(first.generator.parameters()))]["step"].item() == steps_after_one + 3


def test_the_unlearning_batch_swaps_exactly_int_02n_plus_1_images_and_detection_names_a_class():
    model, head, loader = _setup()
    gen = Inversion.new(3, InversionConfig(base_filters=4, depth=2), "cpu").generator.eval()
    images = next(iter(loader))[0]
    mixed = with_reversed(images, gen, 0.2, torch.Generator().manual_seed(0))
    changed = (mixed != images).flatten(1).any(1)
    assert int(changed.sum()) == int(0.2 * len(images) + 1)
    assert 0 <= detect_target(model, gen, loader, "cpu", 10) < 10
    assert not model.training


def test_an_inversion_stopped_mid_phase_continues_from_its_state_at_that_phase_and_step():
    model, head, loader = _setup()
    config = InversionConfig(pretrain_steps=3, mask_steps=4, generator_steps=3, base_filters=4, depth=2,
                             show_progress=False)
    saved: list[dict] = []

    class Stop(Exception):
        pass

    def save_then_stop(inversion: Inversion, phase_ended: bool) -> None:
        saved.append(inversion.state_dict())
        if inversion.phase == "mask" and inversion.step == 2:
            raise Stop  # the process dies two steps into the mask

    first = Inversion.new(3, config, "cpu")
    first.saved = save_then_stop
    with pytest.raises(Stop):
        invert(model, head, loader, config, "cpu", inversion=first, generator=torch.Generator().manual_seed(0))
    state = saved[-1]
    assert (state["phase"], state["step"]) == ("mask", 2) and state["mask_raw"] is not None
    assert state["pretrain_optimiser"] is None  # the pretraining was finished and is not redone
    steps = []
    resumed = Inversion.from_state(state, 3, config, "cpu")
    resumed.saved = lambda inversion, ended: steps.append((inversion.phase, inversion.step, ended))
    assert torch.equal(resumed.generator.state_dict()["out.weight"], first.generator.state_dict()["out.weight"])
    done = invert(model, head, loader, config, "cpu", inversion=resumed, generator=torch.Generator().manual_seed(0))
    assert done.phase == "done" and done.mask.shape == (1, 8, 16, 16)
    # the mask's remaining 2 steps (one offered mid-phase), then the generator's 3 (two offered mid-phase)
    assert steps == [("mask", 3, False), ("generator", 0, True), ("generator", 1, False), ("generator", 2, False),
                     ("done", 0, True)]
