"""The shipped yamls are generated from DefenseConfig: complete (BackdoorBench reads every key from them), and
equal to what fst_plugin.defense.shipped generates, so a default has one owner."""
from __future__ import annotations

import pytest

from fst_plugin.core.modes import MODES
from fst_plugin.core.tuning import TuningConfig
from fst_plugin.defense.config import DefenseConfig, build_config, read_yaml
from fst_plugin.defense.shipped import DATASETS, render, shipped_config, shipped_configs_dir, shipped_values

PAIRS = [(method, dataset) for method in MODES for dataset in DATASETS]


@pytest.mark.parametrize("method, dataset", PAIRS, ids=lambda v: v)
def test_every_shipped_yaml_is_what_the_config_generates(method: str, dataset: str) -> None:
    path = shipped_configs_dir() / method / f"{dataset}.yaml"
    assert path.read_text() == render(method, dataset), \
        f"{path} differs from the config: run python -m fst_plugin.defense.shipped"
    assert build_config(read_yaml(path)) == build_config(shipped_values(method, dataset))


def test_the_tuning_defaults_are_the_cores_and_the_yamls_follow_them() -> None:
    config = DefenseConfig()
    assert (config.epochs, config.lr, config.sgd_momentum, config.wd, config.alpha, config.projection_bound) == (
        TuningConfig.epochs, TuningConfig.lr, TuningConfig.momentum, TuningConfig.weight_decay, TuningConfig.alpha,
        TuningConfig.projection_bound)
    cifar10 = build_config(read_yaml(shipped_config("fst", "cifar10")))
    assert cifar10.alpha == TuningConfig.alpha and cifar10.epochs == TuningConfig.epochs


def test_only_fst_gets_the_papers_per_dataset_alpha() -> None:
    assert shipped_values("fst", "cifar100")["alpha"] == 0.001
    assert shipped_values("ft-init", "cifar100")["alpha"] == TuningConfig.alpha
    assert shipped_values("lp", "gtsrb")["epochs"] == 15 and shipped_values("lp", "gtsrb")["lr"] == TuningConfig.lr
