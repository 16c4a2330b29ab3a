"""The shipped yamls are generated from DefenseConfig: complete (BackdoorBench reads every key from them), and
equal to what fst_plugin.defense.shipped generates, so a default has one owner. A run without a yaml takes the one
shipped for its method on the record's dataset, the command line on top (resolve_settings, issue 29)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fst_plugin.core.modes import MODES
from fst_plugin.core.tuning import TuningConfig
from fst_plugin.defense.config import DefenseConfig, build_config, read_yaml
from fst_plugin.defense.shipped import (
    DATASETS,
    render,
    resolve_settings,
    shipped_config,
    shipped_configs_dir,
    shipped_values,
)
from fst_plugin.errors import ConfigError
from tests.builders import write_yaml

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


def test_without_a_yaml_pam_on_a_cifar10_record_takes_the_authors_90_epochs_and_5_percent_clean_data() -> None:
    settings = resolve_settings("pam", {"record": "record/x"}, "cifar10")
    config = settings.config
    assert (config.epochs, config.ratio, config.lr, config.sgd_momentum, config.lr_scheduler) == (
        90, 0.05, 0.01, 0.1, "ConstantLR")
    assert config.yaml_path == str(shipped_config("pam", "cifar10")) and config.record == "record/x"
    assert settings.origin == (f"settings: {shipped_config('pam', 'cifar10')} (shipped for pam on cifar10, the "
                               f"record's dataset; no --yaml_path), command line on top")


def test_without_a_yaml_fst_on_a_gtsrb_record_takes_the_papers_gtsrb_alpha_and_epochs() -> None:
    config = resolve_settings("fst", {}, "gtsrb").config
    assert (config.alpha, config.epochs, config.dataset) == (0.1, 15, "gtsrb")
    assert config.yaml_path == str(shipped_config("fst", "gtsrb"))


def test_the_command_line_wins_over_the_shipped_yaml_and_none_leaves_its_value() -> None:
    config = resolve_settings("pam", {"epochs": "3", "lr": 0.5, "ratio": None}, "cifar10").config
    assert (config.epochs, config.lr, config.ratio, config.sgd_momentum) == (3, 0.5, 0.05, 0.1)


def test_a_given_yaml_wins_over_the_records_dataset_and_the_origin_says_so(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "mine.yaml", epochs=4)
    settings = resolve_settings("pam", {"yaml_path": str(path), "lr": "0.25"}, "gtsrb")
    assert (settings.config.epochs, settings.config.lr, settings.config.dataset) == (4, 0.25, "cifar10")
    assert settings.origin == f"settings: {path} (--yaml_path), command line on top"


@pytest.mark.parametrize("dataset", ["mnist", "tiny-imagenet", "../fst/cifar10"])
def test_a_dataset_with_no_shipped_yaml_is_refused_in_one_line_naming_the_yaml_path_fix(dataset: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_settings("pam", {"epochs": 3}, dataset)
    message = str(caught.value)
    assert "\n" not in message and "the record's dataset" in message and "Fix: pass --yaml_path" in message


def test_without_a_yaml_or_a_record_there_is_no_dataset_to_choose_by() -> None:
    with pytest.raises(ConfigError, match="no attack record given"):
        resolve_settings("pam", {}, None)


def test_the_installers_config_name_is_cifar10s_yaml_and_an_unshipped_dataset_falls_back_to_nothing() -> None:
    assert shipped_config("pam", "config") == shipped_config("pam", "cifar10")
    with pytest.raises(ConfigError, match="ships no settings for dataset 'mnist'"):
        shipped_config("pam", "mnist")
    with pytest.raises(ConfigError, match="no shipped config for defense 'mine'"):
        shipped_config("mine", "cifar10")
