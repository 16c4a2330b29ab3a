"""Command-line options declared once, on the dataclass that holds them.

A run's configuration (``RetuneConfig``, ``QraConfig``) is a dataclass; each field that is also a command-line
flag carries its help text through :func:`option`. :func:`add_options` derives the argparse flags from the
fields (type from the annotation, default from the field), and :func:`from_options` builds the dataclass back
from the parsed namespace, so a default or a help text has one owner. ``DefenseConfig`` keeps its own
:func:`fst_plugin.config.setting`: its flags default to None because a yaml supplies the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, metavar: Optional[str] = None,
           parse: Optional[Callable[[str], Any]] = None, flags: Sequence[str] = ()) -> Any:
    """A dataclass field that is also ``--<name>``: no ``default`` makes the flag required; ``parse`` reads the
    text when the annotation's type cannot (``16/255``); ``flags`` adds aliases (``--trust-record``). A bool
    field with default False becomes a value-less switch."""
    return dataclasses.field(default=default, metadata={"option": {"help": help, "metavar": metavar,
                                                                   "parse": parse, "flags": tuple(flags)}})


def parse_fraction(text: str) -> float:
    """A float, or a fraction such as ``16/255`` (how pixel budgets are usually written)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 16/255") from None


def _option_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def _base_type(annotation: Any) -> Any:
    """``Optional[X]`` → ``X``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per :func:`option` field of ``cls``, in field order."""
    for f, annotation in _option_fields(cls):
        meta = f.metadata["option"]
        names = [f"--{f.name}", *meta["flags"]]
        kind = _base_type(annotation)
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", help=meta["help"])
            continue
        required = f.default is dataclasses.MISSING
        text = meta["help"]
        if not required and f.default is not None and "default" not in text:
            text = f"{text} (default {f.default})".lstrip()
        parser.add_argument(*names, dest=f.name, type=meta["parse"] or (str if kind is Path else kind),
                            required=required, default=None if required else f.default, metavar=meta["metavar"],
                            help=text)


def from_options(cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` from the namespace :func:`add_options` parsed into (paths become :class:`Path`)."""
    values = {}
    for f, annotation in _option_fields(cls):
        value = getattr(args, f.name)
        if value is not None and _base_type(annotation) is Path:
            value = Path(value)
        values[f.name] = value
    return cls(**values)
