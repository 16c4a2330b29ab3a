"""Shared fixtures: a tiny BackdoorBench-shaped workspace (synthetic images, a BadNets record) built once."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fst_plugin.demo import DemoConfig, Workspace, prepare_workspace

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """root/data/cifar10/{train,test} (20 + 5 synthetic images per class) and root/record/demo_badnet."""
    out = tmp_path_factory.mktemp("bb_workspace")
    return prepare_workspace(DemoConfig(out=out, train_per_class=20, test_per_class=5, attack_epochs=1,
                                        device="cpu", seed=0))


@pytest.fixture()
def fresh_workspace(workspace: Workspace, tmp_path: Path) -> Workspace:
    """A private copy of the workspace, for tests that write into the record folder."""
    root = tmp_path / "bb"
    shutil.copytree(workspace.root, root)
    return Workspace(root, root / "record" / workspace.record_dir.name, workspace.source, workspace.n_train,
                     workspace.n_test, workspace.before)
