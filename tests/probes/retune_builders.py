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
from fst_plugin.data import load_clean_split
from fst_plugin.demo import synthetic_images, write_image_folders
from fst_plugin.models import build_model
from fst_plugin.probes.config import RetuneConfig
from fst_plugin.record import load_attack_record, write_attack_record

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



def flag_unrelabelled(record_dir: Path, count: int, target_only: bool = False, replace: bool = False) -> list[int]:
    """Flag ``count`` more training images of the record that keep their true label, with a noisy PNG, as
    BackdoorBench's attacks do for WaNet's cross samples (cross_ratio 2; InputAware 1) or for a clean-label attack
    such as SIG (``target_only``: images of the target class; ``replace``: the record's dirty-label images are
    dropped first). Returns the indices flagged."""
    payload = torch.load(record_dir / "attack_result.pt", weights_only=False)
    state = payload["bd_train"]
    indicator, data_dict = state["poison_indicator"], state["bd_data_container"]["data_dict"]
    if replace:
        indicator[:] = 0
        data_dict.clear()
    labels = load_clean_split("cifar10", record_dir.parent.parent / "data" / "cifar10", train=True).targets
    free = [i for i in range(len(indicator)) if indicator[i] == 0 and (not target_only or labels[i] == TARGET)]
    chosen = free[:count]
    rng = np.random.default_rng(1)
    for index in chosen:
        label = int(labels[index])
        rel = f"bd_train_dataset/{label}/{index}.png"
        (record_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(record_dir / rel)
        data_dict[np.int64(index)] = {"path": f"./record/{record_dir.name}/{rel}", "other_info": [label, label]}
        indicator[index] = 1
    torch.save(payload, record_dir / "attack_result.pt")
    return chosen
