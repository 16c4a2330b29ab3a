"""``fst-plugin``: list, install, export, uninstall, run, demo, retune and qra.

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
from fst_plugin.demo_config import DemoConfig
from fst_plugin.errors import FSTError
from fst_plugin.options import add_options, from_options
from fst_plugin.probes.config import QraConfig, RetuneConfig

EPILOG = """examples:
  fst-plugin list
  fst-plugin install --backdoorbench ~/BackdoorBench
  fst-plugin export --backdoorbench ~/BackdoorBench --methods fst fe-tuning ft-init
  fst-plugin run fst --record record/badnet_0_1 --yaml_path defense_configs/fst/cifar10.yaml
  fst-plugin demo --data-dir data/cifar10
  fst-plugin retune --record record/badnet_0_1 --defense fst --dataset_path ./data
  fst-plugin qra --record record/badnet_0_1 --defense fst --reference_record record/clean_0 --dataset_path ./data
"""


def _cmd_list(args: argparse.Namespace) -> int:
    from fst_plugin.core.modes import MODES
    from fst_plugin.plugins import available_defenses

    for name, ep in available_defenses().items():
        summary = MODES[name].summary if name in MODES else ep.value
        print(f"{name:12s} {summary}  [{ep.value}]")
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from fst_plugin.export.installer import install

    written = install(Path(args.backdoorbench), force=args.force)
    for path in written:
        print(f"wrote {path}")
    print(f"installed {len(written)} files; run e.g. `python defense/fst.py --result_file NAME "
          f"--yaml_path ./config/defense/fst/cifar10.yaml` from {Path(args.backdoorbench).expanduser()}")
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from fst_plugin.export.installer import uninstall

    removed, kept = uninstall(Path(args.backdoorbench))
    for path in removed:
        print(f"removed {path}")
    for path in kept:
        print(f"kept {path} (edited since install)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fst_plugin.export.exporter import export

    written = export(Path(args.backdoorbench), methods=args.methods, force=args.force)
    for path in written:
        print(f"wrote {path}")
    print(f"exported {len(written)} files (self-contained: they need BackdoorBench only); "
          f"`fst-plugin uninstall --backdoorbench {args.backdoorbench}` removes them")
    return 0


def _log_to_file(path: Path, verbose: bool) -> None:
    """Every log record goes to ``path``; the terminal shows warnings only, or everything with ``verbose``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    to_file = logging.FileHandler(path, mode="w")
    to_file.setFormatter(logging.Formatter("%(asctime)s [%(levelname)-8s] [%(name)s] %(message)s"))
    root.addHandler(to_file)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fst_plugin.demo import run_demo

    config = from_options(DemoConfig, args)
    _log_to_file(config.out / "demo.log", args.verbose)
    table = run_demo(config)
    print(table.attrs["title"])
    print(table.to_markdown(floatfmt=".2f"))
    print(f"(logs: {config.out / 'demo.log'})", file=sys.stderr)
    return 0


def _cmd_retune(args: argparse.Namespace) -> int:
    from fst_plugin.probes.retune import run_retune

    result = run_retune(from_options(RetuneConfig, args))
    print(f"{result.defense}: C-Acc {100 * result.before['test_acc']:.2f} -> {100 * result.after['test_acc']:.2f}, "
          f"ASR {100 * result.before['test_asr']:.2f} -> {100 * result.after['test_asr']:.2f}, "
          f"RA {100 * result.before['test_ra']:.2f} -> {100 * result.after['test_ra']:.2f} "
          f"({len(result.poisoned_indices)} poisoned + {result.n_clean} clean images); wrote {result.save_dir}")
    return 0


def _add_retune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retune", help="retuning attack: fine-tune a model on its clean tuning set with a few "
                                      "poisoned images and measure whether the backdoor comes back")
    add_options(p, RetuneConfig)
    p.set_defaults(func=_cmd_retune)


def _cmd_qra(args: argparse.Namespace) -> int:
    from fst_plugin.probes.qra import run_qra

    result = run_qra(from_options(QraConfig, args))
    pct = {name: {k: 100 * v for k, v in m.items()} for name, m in result.metrics.items()}
    p, r, t = pct["purified"], pct["clean_reference"], pct["retuned"]
    print(f"{result.defense}: ASR {p['asr']:.2f} -> {p['asr_qra']:.2f} with the QRA perturbation, clean images to "
          f"class {result.target} {p['clean_target']:.2f} -> {p['clean_target_qra']:.2f}, C-Acc {p['acc']:.2f} -> "
          f"{p['acc_qra']:.2f}; clean reference ASR {r['asr']:.2f} -> {r['asr_qra']:.2f}, clean images to class "
          f"{result.target} {r['clean_target']:.2f} -> {r['clean_target_qra']:.2f}; retuned ASR {t['asr']:.2f} -> "
          f"{t['asr_qra']:.2f}; wrote {result.save_dir}")
    return 0


def _add_qra_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qra", help="query-based reactivation attack: learn a small input perturbation that makes a "
                                   "purified model act like its retuned version (needs `retune` first) while a "
                                   "clean model is not fooled")
    add_options(p, QraConfig)
    p.set_defaults(func=_cmd_qra)


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
    from fst_plugin.export.exporter import DEFAULT_METHODS

    export = sub.add_parser("export", help="write self-contained BackdoorBench defenses (no import of this "
                                           "package) into a checkout, for an upstream pull request")
    export.add_argument("--backdoorbench", required=True, metavar="DIR", help="root of the BackdoorBench checkout")
    export.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help=f"tuning modes to export (default: {' '.join(DEFAULT_METHODS)})")
    export.add_argument("--force", action="store_true", help="overwrite files fst-plugin did not write")
    export.set_defaults(func=_cmd_export)
    run = sub.add_parser("run", help="run a defense on a record folder without BackdoorBench "
                                      "(all of the defense's BackdoorBench arguments apply; see run NAME --help)",
                         add_help=False)
    run.add_argument("method", help="registered defense name (see fst-plugin list)")
    run.set_defaults(func=None)
    demo = sub.add_parser("demo", help="backdoor a small model with BadNets and purify it with every mode")
    add_options(demo, DemoConfig, dashes=True)
    demo.add_argument("-v", "--verbose", action="store_true", help="print the logs too (always in OUT/demo.log)")
    demo.set_defaults(func=_cmd_demo)
    _add_retune_parser(sub)
    _add_qra_parser(sub)
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
