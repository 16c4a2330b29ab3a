"""The settings of ``fst-plugin demo``.

Kept apart from :mod:`fst_plugin.demo` (which imports torch, pandas and the defenses) so that the command line
can build its parser from these fields (:mod:`fst_plugin.options`) without loading it: a default or a help text
is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fst_plugin.options import option


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings; those made with :func:`option` are its flags (``--data-dir``, ...)."""

    data_dir: Optional[Path] = option(None, "CIFAR-10 folder (cifar-10-batches-py or train/+test/); synthetic if "
                                            "absent")
    download: bool = option(False, "fetch CIFAR-10 with torchvision into --data-dir (default OUT/cifar10); needs "
                                   "internet")
    out: Path = option(Path("fst_demo"), "output folder (record/ and data/ go here)")
    train_per_class: int = option(300, "training images per class")
    test_per_class: int = option(50, "test images per class")
    attack_epochs: int = option(6, "epochs of the backdoor training")
    defense_epochs: int = option(10, "tuning epochs per defense", flags=("--epochs",))
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    seed: int = option(0, "seed of the images, the attack and the defenses")
    poison_rate: float = 0.1
    target: int = 0
    ratio: float = 0.2
    model: str = "preactresnet_small"
