"""fst_plugin.options: every config dataclass declares each setting once; flags, validation and the docs table
are derived from the fields (the retune and qra flags, the defense's yaml-first flags): one owner per default."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

import pytest

from fst_plugin.cli import build_parser
from fst_plugin.errors import ConfigError
from fst_plugin.options import (
    OptionSpec,
    add_options,
    add_overrides,
    build,
    from_options,
    option,
    option_specs,
    options_table,
    parse_fraction,
)
from fst_plugin.probes.config import QraConfig, RetuneConfig


@pytest.mark.parametrize("command, cls", [("retune", RetuneConfig), ("qra", QraConfig)])
def test_the_cli_defaults_are_the_dataclass_defaults(command: str, cls: type) -> None:
    args = build_parser().parse_args([command, "--record", "rec", "--defense", "fst"])
    built = from_options(cls, args)
    expected = cls(record=Path("rec"), defense="fst")
    assert built == expected
    # every field but the programmatic show_progress is a flag
    flags = {f.name for f in dataclasses.fields(cls)} - {"show_progress"}
    assert flags <= set(vars(args))


def test_values_are_typed_and_aliases_work() -> None:
    args = build_parser().parse_args(["qra", "--record", "r", "--defense", "none", "--reference_record", "ref",
                                      "--eps", "8/255", "--epochs", "3", "--trust-record", "--dataset_path", "d"])
    config = from_options(QraConfig, args)
    assert config.eps == pytest.approx(8 / 255) and config.epochs == 3 and config.trust_record is True
    assert config.reference_record == Path("ref") and config.dataset_path == Path("d")


def test_required_fields_and_bad_types_are_argparse_errors(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as missing:
        parser.parse_args(["retune", "--defense", "fst"])
    assert missing.value.code == 2 and "--record" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        parser.parse_args(["qra", "--record", "r", "--defense", "fst", "--eps", "1/0"])
    assert bad.value.code == 2 and "fraction like 16/255" in capsys.readouterr().err


def test_a_new_field_becomes_a_flag_without_touching_the_cli() -> None:
    @dataclasses.dataclass(frozen=True)
    class Settings:
        path: Path = option(metavar="DIR", help="where")
        steps: int = option(3, "how many")
        fast: bool = option(False, "a switch", flags=("--go-fast",))
        internal: int = 7                      # no option(): not a flag

    parser = argparse.ArgumentParser()
    add_options(parser, Settings)
    assert "--internal" not in parser.format_help() and "(default 3)" in parser.format_help()
    assert from_options(Settings, parser.parse_args(["--path", "x", "--go-fast"])) == Settings(Path("x"), 3, True)


@pytest.mark.parametrize("text, value", [("16/255", 16 / 255), ("0.5", 0.5), ("0", 0.0)])
def test_parse_fraction(text: str, value: float) -> None:
    assert parse_fraction(text) == pytest.approx(value)


@dataclasses.dataclass(frozen=True)
class Knobs:
    """A yaml-first config: every setting has a default, the command line overrides."""

    steps: int = option(3, "how many steps", check=("> 0", lambda v: v > 0))
    mode: str = option("fast", "how", choices=("fast", "slow"))
    rate: Optional[float] = option(None, "a rate", resume=False)
    quiet: bool = option(False, "no output", switch=True, in_yaml=False, flags=("-q",))
    tags: list = option(help="labels", default_factory=list, in_yaml=False)
    plain: int = 1                              # no option(): not a setting


def test_option_specs_describe_each_setting_once() -> None:
    specs = {spec.name: spec for spec in option_specs(Knobs)}
    assert list(specs) == ["steps", "mode", "rate", "quiet", "tags"]
    assert specs["rate"] == OptionSpec(name="rate", type=float, default=None, help="a rate", resume=False,
                                       optional=True)
    assert specs["mode"].choices == ("fast", "slow") and specs["steps"].check[0] == "> 0"
    assert specs["tags"].default == [] and specs["tags"].type is list
    assert not specs["steps"].required and option_specs(RetuneConfig)[0].required


def test_build_validates_types_ranges_and_choices_with_one_line_errors() -> None:
    assert build(Knobs, {"steps": "4", "rate": "0.5", "mode": "slow"}) == Knobs(steps=4, mode="slow", rate=0.5)
    assert build(Knobs, {"rate": ""}).rate is None
    for values, problem in (({"steps": 0}, "'steps' is 0, which is not > 0"), ({"mode": "medium"}, "'medium'"),
                            ({"steps": "many"}, "expected int"), ({"plain": 2}, "unknown config key(s) 'plain'"),
                            ({"steps": None}, "'steps' is empty"), ({"rate": float("nan")}, "expected float")):
        with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            build(Knobs, values)


def test_overrides_default_to_none_so_a_yaml_rules() -> None:
    parser = argparse.ArgumentParser()
    add_overrides(parser, Knobs)
    assert vars(parser.parse_args([])) == {"steps": None, "mode": None, "rate": None, "quiet": None, "tags": None}
    args = parser.parse_args(["--steps", "5", "-q"])
    assert build(Knobs, {k: v for k, v in vars(args).items() if v is not None}) == Knobs(steps=5, quiet=True)


def test_the_docs_table_has_one_row_per_setting() -> None:
    table = options_table(Knobs).splitlines()
    assert table[0] == "| key | type | default | what it does |" and len(table) == 2 + 5
    assert table[2] == "| `steps` | int (> 0) | `3` | how many steps |"
    assert table[3] == "| `mode` | {fast, slow} | `fast` | how |"
    assert "required" in options_table(RetuneConfig).splitlines()[2]


def test_dashes_spell_the_demo_style_flags() -> None:
    @dataclasses.dataclass(frozen=True)
    class Demo:
        data_dir: Optional[Path] = option(None, "where")

    parser = argparse.ArgumentParser()
    add_options(parser, Demo, dashes=True)
    assert from_options(Demo, parser.parse_args(["--data-dir", "d"])) == Demo(Path("d"))


def test_the_demo_flags_are_its_config_fields_in_the_demo_style() -> None:
    from fst_plugin.demo_config import DemoConfig

    parser = build_parser()
    assert from_options(DemoConfig, parser.parse_args(["demo"])) == DemoConfig()
    args = parser.parse_args(["demo", "--data-dir", "d", "--train-per-class", "7", "--epochs", "2", "-v"])
    assert from_options(DemoConfig, args) == DemoConfig(data_dir=Path("d"), train_per_class=7, defense_epochs=2)
    assert args.verbose is True
