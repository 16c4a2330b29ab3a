"""Where models, transforms and clean data come from: BackdoorBench's own code inside a checkout, ours outside.

Inside a BackdoorBench checkout (the current folder has ``defense/base.py`` and ``utils/aggregate_block``)
the defenses use its ``generate_cls_model``, ``get_transform`` and ``dataset_and_transform_generate`` so
results match its built-in defenses exactly; anywhere else the equivalents in this package are used.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn
from torch.utils.data import Dataset

from fst_plugin.data import dataset_info, get_transform, load_clean_split
from fst_plugin.errors import DataError
from fst_plugin.models import build_model

log = logging.getLogger(__name__)


def backdoorbench_root(folder: Optional[Path] = None) -> Optional[Path]:
    """The BackdoorBench checkout at ``folder`` (default: the current folder), if it is one."""
    folder = Path.cwd() if folder is None else folder
    if (folder / "defense" / "base.py").is_file() and (folder / "utils" / "aggregate_block").is_dir():
        return folder
    return None


class StandaloneBackend:
    """This package's models, transforms and dataset readers."""

    name = "standalone"

    def build_model(self, model_name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
        """``model_name`` for ``in_channels``-channel images: the dataset's (1 for MNIST), or its weights do not
        fit and its first convolution cannot read the images."""
        return build_model(model_name, num_classes, in_channels)

    def transform(self, dataset: str, train: bool) -> Callable:
        return get_transform(dataset, train)

    def clean_split(self, dataset: str, root: Path, train: bool) -> Dataset:
        return load_clean_split(dataset, root, train)


class BackdoorBenchBackend(StandaloneBackend):
    """BackdoorBench's own model factory, transforms and dataset loaders."""

    name = "backdoorbench"

    def __init__(self, root: Path) -> None:
        if str(root) not in sys.path:
            sys.path.append(str(root))
        from utils.aggregate_block import dataset_and_transform_generate as data_mod  # type: ignore
        from utils.aggregate_block.model_trainer_generate import generate_cls_model  # type: ignore
        self._data = data_mod
        self._generate_cls_model = generate_cls_model
        self._splits: dict[str, Any] = {}

    def build_model(self, model_name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
        """BackdoorBench's model as it built the record's (its factory takes no channel count: its records hold
        what it builds); ours, for ``in_channels``, where its factory cannot build the name."""
        try:
            return self._generate_cls_model(model_name, num_classes)
        except (SystemError, TypeError, OSError) as exc:
            # BackdoorBench knows no such model (SystemError('NO valid model match ...'): preactresnet_small,
            # resnet9_cpu), or its factory fails on one it lists: vit_* and convnext_tiny download ImageNet weights
            # (offline: an OSError / URLError), senet18 and resnext29 raise TypeError at f02e353. Ours builds every
            # name it lists with the same state_dict layout (tests/models), so the record's weights load all the
            # same. Anything else (out of memory, ...) is a real failure and propagates.
            log.warning("BackdoorBench's generate_cls_model cannot build %r (%s: %s); using this package's factory",
                        model_name, type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
            return build_model(model_name, num_classes, in_channels)

    def transform(self, dataset: str, train: bool) -> Callable:
        info = dataset_info(dataset)
        return self._data.get_transform(dataset, info.height, info.width, train=train)

    def clean_split(self, dataset: str, root: Path, train: bool) -> Dataset:
        key = f"{dataset}:{root}"
        if key not in self._splits:
            settings = argparse.Namespace(dataset=dataset, dataset_path=str(root),
                                          img_size=dataset_info(dataset).img_size)
            try:
                out = self._data.dataset_and_transform_generate(settings)
            except Exception as exc:
                raise DataError(f"BackdoorBench could not load {dataset} from {root} ({str(exc).splitlines()[0][:160]})",
                                f"put the dataset under {root} as BackdoorBench expects (see its data/ README)") from None
            self._splits[key] = (out[0], out[3])
        return self._splits[key][0 if train else 1]


def make_backend(inside_backdoorbench: Optional[bool] = None) -> StandaloneBackend:
    root = backdoorbench_root()
    if inside_backdoorbench is False or root is None:
        return StandaloneBackend()
    try:
        return BackdoorBenchBackend(root)
    except ImportError as exc:
        log.warning("BackdoorBench's utils could not be imported (%s); using this package's loaders", exc)
        return StandaloneBackend()
