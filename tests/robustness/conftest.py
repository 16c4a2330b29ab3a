"""The robustness suite's shared run."""
from __future__ import annotations

import pytest

from tests import builders as h


@pytest.fixture(scope="session")
def reference(bb: h.TinyBB, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted ``run fst`` on the tiny record (its own folder), shared by the kill/resume and the
    reproducibility tests: its summary (hash + metrics), run_info, record, yaml and output folder."""
    return h.full_run(bb, "reference", tmp_path_factory.mktemp("reference"))
