"""Backdoor a model and write it as a BackdoorBench attack record: the one implementation behind the demo's
workspace (``fst_plugin.demo``), the test fixtures and the benchmark's records (``bench_scripts/records``).

The caller chooses the data, the trigger and the poisoned indices (so its random stream stays its own); this
module poisons, trains with :func:`fst_plugin.attacks.training.train_classifier`, measures C-Acc / ASR and writes
the record with :func:`fst_plugin.record.write_attack_record`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from fst_plugin.attacks.training import TrainConfig, accuracy_and_asr, train_classifier
from fst_plugin.attacks.triggers import Trigger, poison_split
from fst_plugin.data import dataset_info
from fst_plugin.models import build_model
from fst_plugin.record import write_attack_record

log = logging.getLogger(__name__)


@dataclass
class Attack:
    """An all-to-one attack on arrays: ``trigger`` applied to the training images at ``poisoned``."""

    trigger: Trigger
    poisoned: np.ndarray     # indices into the training arrays
    target: int = 0
    relabel: bool = True     # False: clean-label (SIG poisons target-class images and keeps their labels)


@dataclass
class Split:
    """uint8 NHWC images and labels; ``index`` maps them into the full split of ``size`` images (None: they are it)."""

    images: np.ndarray
    labels: np.ndarray
    index: Optional[np.ndarray] = None
    size: Optional[int] = None

    def original_index(self, i: int) -> int:
        return int(i if self.index is None else self.index[i])


@dataclass
class BackdooredModel:
    model: nn.Module
    record_dir: Path
    test_acc: float          # on the clean test images (fraction)
    test_asr: float          # on the triggered non-target test images (fraction)
    train_s: float


def poisoned_test_items(images: np.ndarray, labels: np.ndarray, trigger: Trigger,
                        target: int) -> list[tuple[int, "object", int, int]]:
    """BackdoorBench's bd_test: every non-target test image with the trigger, as record-writer items."""
    from PIL import Image

    keep = np.flatnonzero(labels != target)
    triggered = trigger(images[keep])
    mode = "L" if images.shape[-1] == 1 else "RGB"
    return [(int(i), Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode), int(target), int(labels[i]))
            for i, img in zip(keep, triggered)]


def backdoor_and_record(record_dir: Path, *, model_name: str, dataset: str, train: Split, test: Split, attack: Attack,
                        train_config: TrainConfig, keep_bd_train: bool = False,
                        on_epoch_end: Optional[Callable[[int, float], None]] = None,
                        record_extra: Optional[Callable[[BackdooredModel], Mapping[str, Any]]] = None) -> BackdooredModel:
    """Poison ``train``, train ``model_name`` on it, measure C-Acc / ASR on ``test`` and write ``record_dir``.

    The record's ``bd_test`` is every non-target test image with the trigger; with ``keep_bd_train`` the poisoned
    training images are kept too. ``record_extra(result)`` adds keys to ``attack_result.pt`` (e.g. ``attack``).
    """
    info = dataset_info(dataset)
    poisoned = poison_split(train.images, train.labels, attack.trigger, attack.poisoned, attack.target,
                            relabel=attack.relabel)
    # torch's default generator starts from a random seed in every process (torch.initial_seed() differs
    # between two fresh interpreters), so the initial weights must be drawn under the run's own seed.
    torch.manual_seed(train_config.seed)
    model = build_model(model_name, info.num_classes, info.channels)  # 1 for MNIST: the images' own channels
    started = time.time()
    if train_config.epochs > 0 and train_config.trigger_after_augment:
        # the clean images with the poisoned labels; the trigger is stamped after each batch's augmentation
        train_classifier(model, train.images, poisoned.labels, dataset, train_config, on_epoch_end=on_epoch_end,
                         stamp=(attack.trigger, attack.poisoned))
    elif train_config.epochs > 0:
        train_classifier(model, poisoned.images, poisoned.labels, dataset, train_config, on_epoch_end=on_epoch_end)
    train_s = time.time() - started
    acc, asr = accuracy_and_asr(model, test.images, test.labels, attack.trigger, attack.target, dataset,
                                train_config.device)
    result = BackdooredModel(model, Path(record_dir), acc, asr, train_s)
    log.info("%s: C-Acc %.2f%% ASR %.2f%% after %.0f s of training", Path(record_dir).name, 100 * acc, 100 * asr,
             train_s)
    bd_test = [(test.original_index(i), img, bd, orig)
               for i, img, bd, orig in poisoned_test_items(test.images, test.labels, attack.trigger, attack.target)]
    bd_train = None
    if keep_bd_train:
        from PIL import Image

        bd_train = [(train.original_index(i), Image.fromarray(poisoned.images[i]), int(poisoned.labels[i]),
                     int(train.labels[i])) for i in attack.poisoned]
    write_attack_record(record_dir, model_name=model_name, num_classes=info.num_classes, state_dict=model.state_dict(),
                        clean_data=dataset, img_size=(info.height, info.width, info.channels),
                        test_size=test.size or len(test.labels), bd_test=bd_test,
                        train_size=train.size or len(train.labels),
                        bd_train=bd_train, **dict(record_extra(result) if record_extra else {}))
    return result
