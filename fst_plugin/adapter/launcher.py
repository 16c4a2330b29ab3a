"""The entry point shared by ``defense/<name>.py`` launchers in a BackdoorBench checkout and ``fst-plugin run``.

It parses BackdoorBench-style arguments for the named defense, runs ``defense(result_file)`` and turns
every :class:`FSTError` into one line on stderr and exit code 2 (a traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from fst_plugin.errors import FSTError

EXIT_USAGE = 2


def report_error(exc: BaseException, debug: bool) -> int:
    if debug:
        logging.getLogger(__name__).exception("failed")
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def main(method: str, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run defense ``method`` with BackdoorBench's command line; return the exit code."""
    if os.getcwd() not in sys.path:  # BackdoorBench's scripts import utils/ and defense/ from the cwd
        sys.path.append(os.getcwd())
    from fst_plugin.plugins import load_defense

    parser = argparse.ArgumentParser(prog=prog or f"defense/{method}.py",
                                     description=f"{method}: backdoor purification by tuning (backdoorbench-fst)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        defense_cls = load_defense(method)
        defense_cls.add_arguments(parser)
        args = parser.parse_args(argv)
        debug = args.__dict__.pop("debug")
        defense = defense_cls(args)
        defense.defense(defense.config.result_file)
    except FSTError as exc:
        return report_error(exc, debug)
    return 0
