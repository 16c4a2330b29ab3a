"""The retuning-attack workspace shared by test_retune.py and test_qra.py (built once per session by
``conftest.py``'s ``built`` fixture): synthetic 32x32 images (20 train / 5 test per class), a BadNets record whose
model is untrained (composition and plumbing do not need a backdoor) with 20 poisoned training images, a fake
``fst`` output (that model + a shuffled ``log/index.txt``), and a clean reference record: ``preactresnet_small``
trained on the clean images only, the tiny protocol's model (the costly part, ~15 s: hence once per session).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fst_plugin.attacks import TrainConfig, badnets_trigger, poison_indices, poisoned_test_items, train_classifier
from fst_plugin.demo import synthetic_images, write_image_folders
from fst_plugin.models import build_model
from fst_plugin.record import load_attack_record, write_attack_record
from fst_plugin.probe_config import RetuneConfig

TARGET = 0
MODEL = "preactresnet_small"


@dataclass(frozen=True)
class RetuneWorkspace:
    """The workspace's paths; :meth:`copy_to` gives a private copy for tests that write into a record."""

    root: Path            # a BackdoorBench-like root: data/cifar10/{train,test}, record/<name>/
    attacked: Path        # record/tiny_badnet (bd_train: 20 poisoned images; defense/fst/)
    reference: Path       # record/tiny_clean (rate 0: trained on clean images only)
    fst_index: np.ndarray  # the fake fst defense's clean indices, in file order

    def copy_to(self, root: Path) -> "RetuneWorkspace":
        shutil.copytree(self.root, root, symlinks=True)
        return replace(self, root=root, attacked=root / "record" / self.attacked.name,
                       reference=root / "record" / self.reference.name)


def _record(root: Path, name: str, model: torch.nn.Module, x_test, y_test, train_size: int, bd_train) -> Path:
    return write_attack_record(root / "record" / name, model_name=MODEL, num_classes=10,
                               state_dict=model.state_dict(), clean_data="cifar10", img_size=(32, 32, 3),
                               test_size=len(y_test), train_size=train_size, bd_train=bd_train,
                               bd_test=poisoned_test_items(x_test, y_test, badnets_trigger(), TARGET))


def build_retune_workspace(root: Path) -> RetuneWorkspace:
    """Write the workspace under ``root`` (see the module docstring)."""
    rng = np.random.default_rng(0)
    x_train, y_train = synthetic_images(20, rng)
    x_test, y_test = synthetic_images(5, rng)
    x_train, y_train = write_image_folders(root / "data" / "cifar10", "train", x_train, y_train)
    x_test, y_test = write_image_folders(root / "data" / "cifar10", "test", x_test, y_test)
    trigger = badnets_trigger()
    chosen = poison_indices(y_train, 0.1, TARGET, rng)
    bd_train = [(int(i), Image.fromarray(trigger(x_train[i:i + 1])[0]), TARGET, int(y_train[i])) for i in chosen]
    torch.manual_seed(0)
    attacked = _record(root, "tiny_badnet", build_model(MODEL, 10), x_test, y_test, len(y_train), bd_train)
    clean = build_model(MODEL, 10)
    train_classifier(clean, x_train, y_train, "cifar10", TrainConfig(epochs=4, batch_size=32, augment=False, seed=0))
    reference = _record(root, "tiny_clean", clean, x_test, y_test, len(y_train), [])
    fst = attacked / "defense" / "fst"
    (fst / "log").mkdir(parents=True)
    torch.save({"model_name": MODEL, "num_classes": 10, "model": load_attack_record(attacked).state_dict},
               fst / "defense_result.pt")
    index = rng.permutation(len(y_train))[:50]
    np.savetxt(fst / "log" / "index.txt", index, fmt="%d")  # as BackdoorBench's ft writes it
    return RetuneWorkspace(root, attacked, reference, index)


def tiny(ws: RetuneWorkspace, defense: str = "fst", **overrides) -> RetuneConfig:
    """The official protocol's settings, on the tiny fixture (a tuning subset of 50 images, one batch)."""
    values = dict(record=ws.attacked, defense=defense, dataset_path=ws.root / "data", device="cpu", ratio=0.25,
                  epochs=2, batch_size=128)
    values.update(overrides)
    return RetuneConfig(**values)
