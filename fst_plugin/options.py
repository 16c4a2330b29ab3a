"""Settings declared once, on the dataclass that holds them.

Every config dataclass (``DefenseConfig``, ``RetuneConfig``, ``QraConfig``, ``DemoConfig``) declares each setting
with :func:`option`: its default, help text, type (the annotation), range or choices, and what else it is (a yaml
key, part of a checkpoint's resume key, a value-less switch). :func:`option_specs` reads that back as
:class:`OptionSpec` rows, and everything else is derived from them:

* :func:`add_options` / :func:`from_options`: typed flags whose defaults are the dataclass's (the commands whose
  settings live on the command line: retune, qra, demo);
* :func:`add_overrides` / :func:`build`: text flags defaulting to None for a yaml-first config (the defense's:
  the yaml gives the values, a command-line value that is not None overrides it), and the validation of yaml or
  text values into the dataclass, naming the first problem and its fix;
* :func:`options_table`: the markdown table of the docs.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Optional, Sequence, TypeVar

from fst_plugin.errors import ConfigError

T = TypeVar("T")
Check = tuple[str, Callable[[Any], bool]]  # (the rule as text, "> 0"; the test)
_META = "option"


def option(default: Any = dataclasses.MISSING, help: str = "", *, metavar: Optional[str] = None,
           parse: Optional[Callable[[Any], Any]] = None, flags: Sequence[str] = (),
           choices: Optional[Collection[str]] = None, check: Optional[Check] = None, resume: bool = True,
           in_yaml: bool = True, switch: bool = False, default_factory: Optional[Callable[[], Any]] = None) -> Any:
    """A dataclass field that is also a setting (``--<name>``, a yaml key).

    No ``default`` makes the flag required; ``parse`` reads a value the annotation's type cannot (``16/255``,
    ``auto``/``on``/``off``); ``flags`` adds aliases (``--trust-record``, ``-pm``); ``choices`` or a range
    ``check`` (text, test) bound the value; ``resume``: the value joins a checkpoint's resume key (a resume with
    another value is refused); ``in_yaml``: every shipped yaml holds it; ``switch``: a value-less flag. For
    :func:`add_options`, a bool field with default False is a switch too."""
    meta = {_META: {"help": help, "metavar": metavar, "parse": parse, "flags": tuple(flags),
                    "choices": tuple(choices) if choices else None, "check": check, "resume": resume,
                    "in_yaml": in_yaml, "switch": switch}}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One setting of a config dataclass, as :func:`option` declared it."""

    name: str
    type: type                      # the base type: Optional[X] -> X
    default: Any                    # dataclasses.MISSING when the setting is required
    help: str
    choices: Optional[tuple[str, ...]] = None
    check: Optional[Check] = None
    flags: tuple[str, ...] = ()
    switch: bool = False
    resume: bool = True
    in_yaml: bool = True
    metavar: Optional[str] = None
    parse: Optional[Callable[[Any], Any]] = None
    optional: bool = False          # the annotation is Optional[...]: an empty value is None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``Optional[X]`` → (X, True); ``Union[X, str]`` → (X, False): a number that may also be a word, which the
    option's ``parse`` reads (alpha's ``auto``); anything else → (it, False)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union:
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def option_specs(cls: type) -> list[OptionSpec]:
    """The :func:`option` fields of ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if _META not in f.metadata:
            continue
        kind, optional = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        specs.append(OptionSpec(name=f.name, type=typing.get_origin(kind) or kind, default=default,
                                optional=optional, **f.metadata[_META]))
    return specs


def parse_fraction(text: str) -> float:
    """A float, or a fraction such as ``16/255`` (how pixel budgets are usually written)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 16/255") from None


# ----- flags with the dataclass's defaults (retune, qra, demo) ---------------------------------------------------
def add_options(parser: argparse.ArgumentParser, cls: type, dashes: bool = False) -> None:
    """One typed flag per :func:`option` field of ``cls``, defaulting to the field's default; ``dashes`` spells
    ``data_dir`` as ``--data-dir`` (the demo's style) instead of ``--data_dir`` (BackdoorBench's)."""
    for spec in option_specs(cls):
        names = [f"--{spec.name.replace('_', '-') if dashes else spec.name}", *spec.flags]
        if spec.type is bool:
            parser.add_argument(*names, dest=spec.name, action="store_true", help=spec.help)
            continue
        text = spec.help
        if not spec.required and spec.default is not None and "default" not in text:
            text = f"{text} (default {spec.default})".lstrip()
        parser.add_argument(*names, dest=spec.name, type=spec.parse or (str if spec.type is Path else spec.type),
                            required=spec.required, default=None if spec.required else spec.default,
                            metavar=spec.metavar, help=text)


def from_options(cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` from the namespace :func:`add_options` parsed into (paths become :class:`Path`)."""
    values = {}
    for spec in option_specs(cls):
        value = getattr(args, spec.name)
        values[spec.name] = Path(value) if value is not None and spec.type is Path else value
    return cls(**values)


# ----- a yaml-first config (the defense's) -----------------------------------------------------------------------
def add_overrides(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting of ``cls`` (``--<name>`` and its aliases), every default None so the yaml rules. Values
    are read as text and validated by :func:`build`, like yaml values: a wrong one is one line naming the setting
    and the fix (``--amp yes`` included), never a silent False."""
    for spec in option_specs(cls):
        names = [f for f in spec.flags if not f.startswith("--")] + [f"--{spec.name}"] + \
                [f for f in spec.flags if f.startswith("--")]
        if spec.switch:
            parser.add_argument(*names, dest=spec.name, action="store_const", const=True, help=spec.help)
        else:
            metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else spec.type.__name__.upper()
            parser.add_argument(*names, dest=spec.name, type=str, metavar=metavar, help=spec.help)


def _wrong(spec: OptionSpec, value: Any) -> ConfigError:
    kind = spec.type.__name__
    return ConfigError(f"config key {spec.name!r} is {value!r} ({type(value).__name__}), expected {kind}",
                       f"set {spec.name} to a {kind} value in the yaml or on the command line")


def _as_bool(spec: OptionSpec, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ConfigError(_wrong(spec, value).problem, f"set {spec.name} to True or False (or true, false, 1, 0)")


def _as_int(spec: OptionSpec, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise _wrong(spec, value)


def _as_float(spec: OptionSpec, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):  # YAML 1.1 reads 1e-2 as a string
        raise _wrong(spec, value)
    try:
        out = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond the float range
        raise _wrong(spec, value) from None
    if out != out or out in (float("inf"), float("-inf")):
        raise _wrong(spec, value)
    return out


def _as_text(spec: OptionSpec, value: Any) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return spec.type(str(value))  # str or Path
    raise _wrong(spec, value)


_COERCE: dict[type, Callable[[OptionSpec, Any], Any]] = {bool: _as_bool, int: _as_int, float: _as_float,
                                                         str: _as_text, Path: _as_text}


def coerce(spec: OptionSpec, value: Any) -> Any:
    """A yaml or command-line value as the setting's type (``parse`` first, when the setting has one), then
    checked against its range and choices; a wrong one is a :class:`ConfigError` naming the setting and the fix."""
    if value is None or (spec.optional and value == ""):
        if spec.optional:
            return None
        raise ConfigError(f"config key {spec.name!r} is empty", f"give {spec.name} a value of type {spec.type.__name__}")
    out = spec.parse(value) if spec.parse is not None else _COERCE[spec.type](spec, value)
    if spec.check is not None and out is not None:
        text, ok = spec.check
        if not ok(out):
            raise ConfigError(f"config key {spec.name!r} is {out}, which is not {text}", f"set {spec.name} {text}")
    if spec.choices and spec.parse is None and out not in spec.choices:
        raise ConfigError(f"config key {spec.name!r} is {out!r}", f"use {' or '.join(sorted(spec.choices))}"
                          + (" (the only one this defense implements)" if len(spec.choices) == 1 else ""))
    return out


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """Validate a mapping of setting → value (a yaml merged with the command line) into ``cls``."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"the config is a {type(values).__name__}, not a mapping of key: value",
                          "write the yaml as 'key: value' lines")
    specs = {spec.name: spec for spec in option_specs(cls)}
    unknown = sorted(str(k) for k in values if k not in specs)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))}",
                          f"remove or correct them; known keys are {', '.join(specs)}")
    return cls(**{key: coerce(specs[key], value) for key, value in values.items()})


def as_text(spec: OptionSpec, value: Any) -> str:
    """``value`` as a user writes it: the word that stands for it (projection's auto/on/off), nothing for None."""
    if spec.parse is not None and spec.choices:
        return next(word for word in spec.choices if spec.parse(word) == value)
    return "" if value is None else str(value)


def options_table(cls: type) -> str:
    """The settings of ``cls`` as a markdown table (key, type, default, what it does) for the docs."""
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for spec in option_specs(cls):
        kind = "{" + ", ".join(spec.choices) + "}" if spec.choices else spec.type.__name__
        text = as_text(spec, spec.default) if not spec.required and spec.default != [] else ""
        default = "required" if spec.required else f"`{text}`" if text else ""
        rule = f" ({spec.check[0]})" if spec.check else ""
        lines.append(f"| `{spec.name}` | {kind}{rule} | {default} | {spec.help.replace('|', '/')} |")
    return "\n".join(lines)
