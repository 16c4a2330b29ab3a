"""The retuning-attack workspace (tests/probes/retune_builders.py), built once per session for test_retune.py
and test_qra.py: read it, never write into it (their ``ws`` fixtures give private copies)."""
from __future__ import annotations

import pytest

from tests.probes.retune_builders import RetuneWorkspace, build_retune_workspace


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> RetuneWorkspace:
    return build_retune_workspace(tmp_path_factory.mktemp("retune_bb"))
