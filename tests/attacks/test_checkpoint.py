"""Attack training that is stopped and resumed ends where an uninterrupted run ends (bit for bit on the CPU), and
the epoch-at-once augmentation draws the very batches of the per-batch kernels."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from fst_plugin.attacks import Checkpointing, TrainConfig, TrainingPaused, read_progress, train_classifier
from fst_plugin.attacks.training import EpochAugment
from fst_plugin.data.tensor_data import TensorBatches, TensorImages
from fst_plugin.models import build_model


def _tiny_set(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=n)


def _train(config: TrainConfig, losses: list[float] | None = None) -> dict[str, torch.Tensor]:
    images, labels = _tiny_set()
    torch.manual_seed(0)
    model = build_model("preactresnet_small", 10)
    train_classifier(model, images, labels, "cifar10", config,
                     on_epoch_end=None if losses is None else lambda e, loss: losses.append(loss))
    return model.state_dict()


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(epochs=3, batch_size=8, lr=0.05, schedule="cosine", **kwargs)


def test_a_paused_training_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path) -> None:
    whole_losses: list[float] = []
    whole = _train(_config(), whole_losses)
    path = tmp_path / "ckpt.pt"
    for done in (1, 2):  # a deadline already past: pause after every epoch
        with pytest.raises(TrainingPaused, match=f"after epoch {done} of 3"):
            _train(_config(checkpointing=Checkpointing(path, every=5, deadline=time.time())))
        assert read_progress(Checkpointing(path)) == {**read_progress(Checkpointing(path)), "epochs_done": done,
                                                      "epochs": 3}
    resumed_losses: list[float] = []
    resumed = _train(_config(checkpointing=Checkpointing(path, every=5)), resumed_losses)
    assert resumed_losses == whole_losses  # the paused epochs are replayed to on_epoch_end
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert json.loads(path.with_name("ckpt.pt.json").read_text())["epochs_done"] == 3


def test_a_checkpoint_of_another_training_is_not_resumed(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingPaused):
        _train(_config(checkpointing=Checkpointing(path, deadline=time.time())))
    other = _train(_config(seed=1, checkpointing=Checkpointing(path)))
    fresh = _train(_config(seed=1))
    assert all(torch.equal(other[k], fresh[k]) for k in fresh)


def test_epoch_at_once_augmentation_equals_the_per_batch_kernels() -> None:
    images, labels = _tiny_set(37)
    data = TensorImages(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                        (torch.from_numpy(labels.astype(np.int64)),))
    torch.manual_seed(5)
    per_batch = [b[0] for b in TensorBatches(data, "cifar10", 8, shuffle=True, augment=True)]
    sizes = [8, 8, 8, 8, 5]
    hook = EpochAugment(sizes, "cifar10", torch.Generator(), enabled=True)
    torch.manual_seed(5)
    hook.start_epoch()
    at_once = [b[0] for b in TensorBatches(data, "cifar10", 8, shuffle=True, generator=hook.generator,
                                           after_augment=hook)]
    assert len(per_batch) == len(at_once) == 5
    assert all(torch.equal(a, b) for a, b in zip(per_batch, at_once))
