"""The retune and qra flags are derived from their config dataclasses (fst_plugin.options): one owner per default."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from fst_plugin.cli import build_parser
from fst_plugin.options import add_options, from_options, option, parse_fraction
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
