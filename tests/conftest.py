"""Session fixtures: the tiny BackdoorBench root of :mod:`tests.builders`, built once (see its docstring for what
it holds, why its model is untrained, and the seeding and thread decisions)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.builders import TinyBB, build_tiny_bb, use_test_threads

use_test_threads()


@pytest.fixture(scope="session")
def bb(tmp_path_factory: pytest.TempPathFactory) -> TinyBB:
    """root/data/cifar10/{train,test} (20 + 2 synthetic images per class) and root/record/tiny_badnet.

    Shared by every test of the session: read it, never write into it (``fresh_bb`` or
    :func:`tests.builders.copy_record` give a private copy)."""
    return build_tiny_bb(tmp_path_factory.mktemp("tiny_bb") / "bb")


@pytest.fixture()
def fresh_bb(bb: TinyBB, tmp_path: Path) -> TinyBB:
    """A private copy of the whole root, for tests that write into the record folder."""
    return bb.copy_to(tmp_path / "bb")
