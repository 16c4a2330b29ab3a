"""The bench tests' tiny grid: synthetic images in CIFAR-10's folder layout and, for the tests that start from a
record, the tiny protocol's BadNets 10% record made by ``python -m bench_scripts.records``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bench_scripts.records import make as make_records
from fst_plugin.demo import synthetic_images, write_image_folders

TINY_RECORD = "badnets_0.1_s0"


def write_tiny_data(folder: Path) -> Path:
    """40 training and 10 test images per class under folder/{train,test}, the same images on every call."""
    rng = np.random.default_rng(0)
    write_image_folders(folder, "train", *synthetic_images(40, rng))
    write_image_folders(folder, "test", *synthetic_images(10, rng))
    return folder


@dataclass(frozen=True)
class TinyGrid:
    """Where one test's tiny grid keeps its data, records and results, and the arguments that name them."""

    data: Path
    cache: Path
    results: Path

    def args(self, *more: str) -> list[str]:
        """The tiny protocol, this grid's folders and ``more``: what every bench script of the grid takes."""
        return ["--protocol", "tiny", "--data", str(self.data), "--cache", str(self.cache),
                "--results", str(self.results), *more]

    def record(self, name: str = TINY_RECORD) -> Path:
        return self.cache / "tiny" / "record" / name


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic image folders, written once per module; read them, never write into them."""
    return write_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture()
def tiny_grid(tiny_data: Path, tmp_path: Path) -> TinyGrid:
    """A private cache holding the tiny BadNets 10% record, made by the records script."""
    grid = TinyGrid(tiny_data, tmp_path / "cache", tmp_path / "results")
    make_records.main(grid.args("--attacks", "badnets:0.1"))
    return grid
