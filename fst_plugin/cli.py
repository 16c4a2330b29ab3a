"""``fst-plugin``: list, install, uninstall, run and demo.

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem and the fix; ``--debug`` adds
the traceback), 1 an unexpected failure (a bug: please report it with the ``--debug`` output).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from fst_plugin import __version__
from fst_plugin.adapter.launcher import EXIT_USAGE, main as run_defense, report_error
from fst_plugin.errors import FSTError

EPILOG = """examples:
  fst-plugin list
  fst-plugin install --backdoorbench ~/BackdoorBench
  fst-plugin run fst --record record/badnet_0_1 --yaml_path defense_configs/fst/cifar10.yaml
  fst-plugin demo --data-dir data/cifar10
"""


def _cmd_list(args: argparse.Namespace) -> int:
    from fst_plugin.core.modes import MODES
    from fst_plugin.plugins import available_defenses

    for name, ep in available_defenses().items():
        summary = MODES[name].summary if name in MODES else ep.value
        print(f"{name:12s} {summary}  [{ep.value}]")
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from fst_plugin.installer import install

    written = install(Path(args.backdoorbench), force=args.force)
    for path in written:
        print(f"wrote {path}")
    print(f"installed {len(written)} files; run e.g. `python defense/fst.py --result_file NAME "
          f"--yaml_path ./config/defense/fst/cifar10.yaml` from {Path(args.backdoorbench).expanduser()}")
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from fst_plugin.installer import uninstall

    removed, kept = uninstall(Path(args.backdoorbench))
    for path in removed:
        print(f"removed {path}")
    for path in kept:
        print(f"kept {path} (edited since install)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fst_plugin.demo import DemoConfig, run_demo

    config = DemoConfig(out=Path(args.out), data_dir=Path(args.data_dir) if args.data_dir else None,
                        train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                        attack_epochs=args.attack_epochs, defense_epochs=args.epochs, device=args.device,
                        seed=args.seed)
    table = run_demo(config)
    print()
    print(table.attrs["title"])
    print(table.to_markdown(floatfmt=".2f"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fst-plugin", description=__doc__.splitlines()[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"backdoorbench-fst {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the defenses registered under backdoorbench.defenses").set_defaults(func=_cmd_list)
    for name, func, text in (("install", _cmd_install, "write launchers and configs into a BackdoorBench checkout"),
                             ("uninstall", _cmd_uninstall, "remove exactly what install wrote")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--backdoorbench", required=True, metavar="DIR", help="root of the BackdoorBench checkout")
        if name == "install":
            p.add_argument("--force", action="store_true", help="overwrite files fst-plugin did not write")
        p.set_defaults(func=func)
    run = sub.add_parser("run", help="run a defense on a record folder without BackdoorBench "
                                      "(all of the defense's BackdoorBench arguments apply; see run NAME --help)",
                         add_help=False)
    run.add_argument("method", help="registered defense name (see fst-plugin list)")
    run.set_defaults(func=None)
    demo = sub.add_parser("demo", help="backdoor a small model with BadNets and purify it with every mode")
    demo.add_argument("--data-dir", help="CIFAR-10 folder (cifar-10-batches-py or train/+test/); synthetic if absent")
    demo.add_argument("--out", default="fst_demo", help="output folder (record/ and data/ go here)")
    demo.add_argument("--train-per-class", type=int, default=300)
    demo.add_argument("--test-per-class", type=int, default=100)
    demo.add_argument("--attack-epochs", type=int, default=6)
    demo.add_argument("--epochs", type=int, default=10, help="tuning epochs per defense")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    # `run METHOD ...` hands everything after METHOD to the defense's own BackdoorBench-style parser.
    positional = [a for a in argv if a != "--debug"]
    if positional[:1] == ["run"]:
        if len(positional) < 2 or positional[1].startswith("-"):
            parser.parse_args(["run", "--help"] if len(positional) < 2 else positional)
            return EXIT_USAGE
        return run_defense(positional[1], positional[2:] + (["--debug"] if debug else []),
                           prog=f"fst-plugin run {positional[1]}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)-8s] %(message)s",
                        datefmt="%Y-%m-%d:%H:%M:%S")
    try:
        return args.func(args)
    except FSTError as exc:
        return report_error(exc, debug)


if __name__ == "__main__":
    sys.exit(main())
