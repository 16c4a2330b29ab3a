"""The attack trainer (fst_plugin.attacks.train_classifier): its schedules, its divergence guard, and that a seed
fixes its result."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fst_plugin.attacks import TrainConfig, train_classifier
from fst_plugin.attacks.training import _scheduler
from fst_plugin.errors import ConfigError, TrainingDiverged
from fst_plugin.models import build_model


def _tiny_set(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=n)


def test_the_cosine_schedule_is_backdoorbenchs_per_epoch_annealing() -> None:
    """BackdoorBench: CosineAnnealingLR(T_max=epochs), stepped once per epoch, whatever the number of batches."""
    config = TrainConfig(epochs=5, lr=0.01, schedule="cosine", nesterov=False)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr, momentum=0.9)
    scheduler, per_step = _scheduler(optimizer, config, steps_per_epoch=391)
    assert not per_step
    for epoch in range(config.epochs):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi * epoch / 5)) / 2)
        optimizer.step()
        scheduler.step()


def test_an_unknown_schedule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown training schedule 'step'"):
        TrainConfig(schedule="step")


def test_a_nan_loss_stops_attack_training_with_one_clear_error() -> None:
    images, labels = _tiny_set()
    with pytest.raises(TrainingDiverged) as diverged:
        train_classifier(build_model("preactresnet_small", 10), images, labels, "cifar10",
                         TrainConfig(epochs=3, batch_size=16, lr=1e12, show_progress=False))
    message = str(diverged.value)
    assert "\n" not in message and "diverged" in message and "Fix: lower the learning rate" in message


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_a_seed_fixes_the_trained_weights(schedule: str) -> None:
    images, labels = _tiny_set()
    config = TrainConfig(epochs=2, batch_size=16, lr=0.01, schedule=schedule, show_progress=False, seed=4)
    losses: list[float] = []
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("preactresnet_small", 10)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        runs.append(train_classifier(model, images, labels, "cifar10", config,
                                     on_epoch_end=lambda epoch, loss: losses.append(loss)).state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(math.isfinite(v) for v in losses) and losses[:2] == losses[2:]
    assert not torch.equal(runs[0]["linear.weight"], initial["linear.weight"])  # it did train



def test_a_trigger_stamped_after_augmentation_sits_at_its_place_on_exactly_the_poisoned_rows() -> None:
    """``TrainConfig.trigger_after_augment``: the crop and flip move the image, never the stamped patch."""
    from fst_plugin.attacks import badnets_trigger, stamp_after_augment
    from fst_plugin.data.tensor_data import TensorBatches, TensorImages

    images = np.full((64, 3, 32, 32), 40, dtype=np.uint8)  # no pixel is white before the stamp
    poisoned = torch.zeros(64, dtype=torch.bool)
    poisoned[::4] = True
    data = TensorImages(torch.from_numpy(images), (torch.arange(64), poisoned))
    stamp = stamp_after_augment(badnets_trigger())
    augmented, stamped = [], []

    def hook(batch: torch.Tensor, fields: list[torch.Tensor]) -> torch.Tensor:
        augmented.append(batch)
        stamped.append(stamp(batch, fields))
        return stamped[-1]

    batches = TensorBatches(data, "cifar10", 16, shuffle=True, augment=True,
                            generator=torch.Generator().manual_seed(0), after_augment=hook)
    indices = [index for _, index, _ in batches]
    assert sorted(torch.cat(indices).tolist()) == list(range(64))
    for index, before, after in zip(indices, augmented, stamped):
        white = (after[:, :, -3:, -3:] == 255).all(dim=(1, 2, 3))
        assert torch.equal(white, poisoned[index])                 # the patch, on exactly the poisoned rows
        assert torch.equal(after[:, :, :-3], before[:, :, :-3])    # and nothing else changed
        assert not (before == 255).any()
    assert any((b == 0).any() for b in augmented)  # the crops padded, so the images did move
