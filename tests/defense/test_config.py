"""fst_plugin.defense.config: one field per key, from which the command line, validation, the resume key and the yaml
check are derived."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from fst_plugin.defense.config import (
    DEPRECATED_KEYS,
    RESUME_KEYS,
    SPECS,
    YAML_KEYS,
    DefenseConfig,
    add_arguments,
    build_config,
    load_config,
    missing_yaml_keys,
    read_yaml,
)
from fst_plugin.defense.shipped import shipped_configs_dir
from fst_plugin.core.modes import MODES
from fst_plugin.errors import ConfigError

SHIPPED = sorted(shipped_configs_dir().glob("*/*.yaml"))


def _parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return {k: v for k, v in vars(parser.parse_args(list(argv))).items() if v is not None}


def test_every_method_ships_a_yaml_for_every_dataset() -> None:
    assert {(p.parent.name, p.stem) for p in SHIPPED} == {
        (m, d) for m in MODES for d in ("cifar10", "cifar100", "gtsrb", "tiny")}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_holds_every_key_and_validates(path: Path) -> None:
    values = read_yaml(path)
    assert missing_yaml_keys(values) == []
    assert set(values) <= set(SPECS) | set(DEPRECATED_KEYS)
    build_config(values)


def test_a_yaml_without_a_key_is_reported_missing() -> None:
    values = read_yaml(shipped_configs_dir() / "fst" / "cifar10.yaml")
    del values["projection_bound"]
    assert missing_yaml_keys(values) == ["projection_bound"]


def test_every_key_but_the_command_line_record_has_a_flag_and_help() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dests = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(dests) == set(SPECS) | set(DEPRECATED_KEYS) and "terminal_info" not in SPECS
    assert all(a.help for a in dests.values())


@pytest.mark.parametrize("value", ["yes", "no", "on", "2", ""])
def test_a_boolean_that_is_not_true_or_false_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="'amp'.*expected bool.*True or False"):
        build_config(_parse("--amp", value))


@pytest.mark.parametrize("value, expected", [("True", True), ("true", True), ("1", True), ("False", False),
                                             ("0", False)])
def test_a_boolean_flag_reads_true_and_false(value: str, expected: bool) -> None:
    assert build_config(_parse("--amp", value, "-pm", value)).amp is expected
    assert build_config(_parse("--amp", value, "-pm", value)).pin_memory is expected


def test_command_line_values_are_validated_like_yaml_values() -> None:
    assert build_config(_parse("--epochs", "3", "--lr", "1e-2", "--projection", "off", "--resume")) == \
        DefenseConfig(epochs=3, lr=0.01, projection=False, resume=True)
    with pytest.raises(ConfigError, match="'epochs' is 'ten'"):
        build_config(_parse("--epochs", "ten"))
    with pytest.raises(ConfigError, match="'eval_subset' is 0, which is not > 0"):
        build_config(_parse("--eval_subset", "0"))


def test_where_things_go_and_how_they_run_do_not_enter_the_resume_key() -> None:
    assert {"epochs", "lr", "alpha", "ratio", "random_seed", "projection_bound", "eval_subset"} <= set(RESUME_KEYS)
    assert not {"device", "num_workers", "pin_memory", "log", "checkpoint_save", "resume", "trust_record",
                "save_name", "record", "result_file", "yaml_path", "terminal_info"} & set(RESUME_KEYS)
    assert "resume" not in YAML_KEYS and "projection_bound" in YAML_KEYS


def test_the_old_data_path_key_still_works_and_says_once_that_it_is_renamed(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = build_config({"data_path": "backdoorbench"}, _parse("--data_path", "backdoorbench"))
    assert config.input_pipeline == "backdoorbench"
    assert [r.getMessage() for r in caplog.records].count(
        "config key 'data_path' is deprecated: it is now 'input_pipeline' (same values); rename it") == 1
    assert len(caplog.records) == 1
    # the command line's new name wins over the yaml's old one, as any command-line value does
    assert build_config({"data_path": "backdoorbench"}, _parse("--input_pipeline", "tensor")).input_pipeline == "tensor"
    with pytest.raises(ConfigError, match="both 'data_path' and 'input_pipeline'"):
        build_config({"data_path": "tensor", "input_pipeline": "tensor"})
    with pytest.raises(ConfigError, match="'input_pipeline' is 'folder'"):
        build_config({"data_path": "folder"})


def test_the_new_name_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert build_config({"input_pipeline": "backdoorbench"}).input_pipeline == "backdoorbench"
    assert not caplog.records


@pytest.mark.parametrize("value, expected", [("auto", None), ("on", True), ("OFF", False), (True, True),
                                             (False, False), (None, None), ("", None)])
def test_projection_words(value: object, expected: object) -> None:
    assert build_config({"projection": value}).projection is expected


def test_load_config_reads_the_yaml_and_lets_the_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "y.yaml"
    path.write_text("epochs: 4\nlr: 0.5\n")
    config = load_config({"yaml_path": str(path), "lr": "0.25", "alpha": None})
    assert (config.epochs, config.lr, config.alpha, config.yaml_path) == (4, 0.25, DefenseConfig.alpha, str(path))
