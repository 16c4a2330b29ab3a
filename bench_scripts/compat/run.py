"""The compatibility matrix against a real BackdoorBench checkout (issue 18, part 2).

Runs each of BackdoorBench's attack scripts for one epoch on a small class-balanced CIFAR-10 subset, then on
every record it wrote: ``fst-plugin install`` once, the five modes through the installed launchers
``python defense/<m>.py``, ``fst-plugin retune`` and ``fst-plugin qra`` on FST's result, and last the exported
scripts (``fst-plugin export``; ``install`` is run again afterwards so the checkout ends with the launchers).
Only public command lines are used. Each cell is ``ok`` or a one-line reason; results.csv and README.md go to
``--out``. The checkout is the user's, outside this repository: its records, the subset (``data/compat``) and
the logs (``compat_logs/``) are written there.

    python -m bench_scripts.compat --backdoorbench BB --data DATA --out bench_results/compat

Run it with the interpreter BackdoorBench runs with (it also runs every command); that interpreter must import
this package (``pip install -e .``). A record whose ``attack_result.pt`` exists is reused (``--force`` re-runs).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_scripts.compat.matrix import (
    EXPORTED, MODES, OK, Cell, Row, check_pool, failure_reason, render_readme, write_cifar10_subset, write_csv,
)
from bench_scripts.jobs.process import run_command
from fst_plugin.record.layout import DefenseLayout, attack_result, record_dir

log = logging.getLogger("compat")

DATA = "./data/compat"            # the subset, relative to the BackdoorBench root (its records keep this path)
PREFIX = "compat_"                # record folder prefix
CLEAN = "clean"                   # QRA's clean reference record (see clean_reference)
COMMON = ["--yaml_path", "./config/attack/prototype/cifar10.yaml", "--dataset_path", DATA, "--epochs", "1",
          "--device", "cpu", "--amp", "False", "--num_workers", "0", "--pin_memory", "False",
          "--non_blocking", "False", "--random_seed", "0"]
DEFENSE = ["--dataset_path", DATA, "--epochs", "1", "--ratio", "0.1", "--device", "cpu", "--num_workers", "0"]
PROBE = ["--dataset_path", DATA, "--device", "cpu", "--epochs", "1"]
QRA = ["--clean_num", "50", "--poison_num", "50"]
NOT_RUN = "not run (stopped at the time limit)"


@dataclass(frozen=True)
class AttackSpec:
    """One BackdoorBench attack script and the arguments that make it a 1-epoch CPU run."""

    name: str
    script: str
    args: tuple[str, ...] = ()
    bd_yaml: str | None = ""        # "": config/attack/<name>/default.yaml; None: the script takes none

    def command(self) -> list[str]:
        bd_yaml = [] if self.bd_yaml is None else ["--bd_yaml_path",
                                                   self.bd_yaml or f"./config/attack/{self.name}/default.yaml"]
        return [f"attack/{self.script}.py", *COMMON, *bd_yaml, *self.args, "--save_folder_name", PREFIX + self.name]


TROJANNN_YAML = "compat_logs/trojannn.yaml"   # its clean model comes from prototype.py (see trojannn_yaml)
PROTOTYPE = AttackSpec("prototype", "prototype", bd_yaml=None)   # clean training: trojannn's and QRA's clean model
ATTACKS = (
    AttackSpec("badnet", "badnet"), AttackSpec("blended", "blended"), AttackSpec("sig", "sig"),
    AttackSpec("wanet", "wanet"), AttackSpec("inputaware", "inputaware", ("--clean_train_epochs", "1")),
    AttackSpec("bpp", "bpp"), AttackSpec("lf", "lf"), AttackSpec("ctrl", "ctrl"),
    AttackSpec("trojannn", "trojannn", ("--mask_update_iters", "50"), TROJANNN_YAML),
    AttackSpec("blind", "blind"),
    AttackSpec("lira", "lira", ("--both_train_epochs", "1", "--epochs", "2"), "./config/attack/lira/cifar10.yaml"),
    AttackSpec("poison_ink", "poison_ink"),
)


class Runner:
    """Runs commands from the BackdoorBench root with this interpreter; logs each to ``compat_logs/``.

    ``report_only``: runs nothing; a cell is read back from its result file or its log (``--report``)."""

    def __init__(self, backdoorbench: Path, timeout: int, report_only: bool = False) -> None:
        self.root, self.timeout, self.report_only = backdoorbench, timeout, report_only
        (backdoorbench / "compat_logs").mkdir(exist_ok=True)

    def __call__(self, label: str, argv: list[str], plugin: bool = False, produces: Path | None = None,
                 reuse: bool = False) -> Cell:
        """``plugin``: argv is an ``fst-plugin`` command line (run as ``python -m fst_plugin``). ``produces``: the
        file a success writes (``ok`` needs it; with ``reuse``, an existing one is taken without running)."""
        full = [sys.executable, *(["-m", "fst_plugin"] if plugin else []), *argv]
        shown = shlex.join((["fst-plugin"] if plugin else ["python"]) + argv).replace(str(self.root), "BB")
        logfile = self.root / "compat_logs" / f"{label}.log"
        if (reuse or self.report_only) and produces is not None and produces.exists():
            return Cell(OK, shown)
        if self.report_only:
            return self.read_back(logfile, shown, produces)
        log.info("%s: %s", label, shown)
        # its own process group, killed whole at the time limit or on Ctrl-C (jobs/process.py owns both)
        code = run_command(full, logfile, cwd=self.root, timeout_s=self.timeout, shown=shown)
        code = 124 if code is None else code
        output = logfile.read_text(errors="replace")
        with open(logfile, "a") as out:
            out.write(f"\n[exit {code}]\n")
        status = self.status(output, code, produces)
        log.info("%s: %s", label, status)
        return Cell(status, shown)

    def status(self, output: str, code: int, produces: Path | None) -> str:
        if code == 0 and produces is not None and not produces.exists():
            return f"exit 0 without writing {produces.name}"
        return OK if code == 0 else failure_reason(output, self.root, code)

    def read_back(self, logfile: Path, shown: str, produces: Path | None) -> Cell:
        """The cell of a command an earlier run ran (its log ends with ``[exit N]``), or ``NOT_RUN``."""
        if not logfile.exists():
            return Cell(NOT_RUN, shown)
        text = logfile.read_text()
        exit_line = re.search(r"\[exit (-?\d+)\]\s*$", text)
        if exit_line:
            code = int(exit_line.group(1))
        else:   # a log written before logs ended with their exit code: failed if it shows a refusal or traceback
            code = 0 if failure_reason(text, self.root, 1).startswith("exit 1:") else 1
        return Cell(self.status(text, code, produces), shown)


def trojannn_yaml(root: Path) -> None:
    """BackdoorBench's trojannn yaml plus ``pretrain_model_path``: its ``--pretrain_model_path`` flag is typed int
    (attack/trojannn.py), so a path can only come through the yaml. The clean model is prototype.py's."""
    source = (root / "config/attack/trojannn/preactresnet18.yaml").read_text()
    clean_model = f"./record/{PREFIX}{PROTOTYPE.name}/clean_model.pth"
    (root / TROJANNN_YAML).write_text(source.rstrip() + f"\npretrain_model_path: {clean_model}\n")


def run_attack(run: Runner, spec: AttackSpec, force: bool) -> Cell:
    record = record_dir(run.root, PREFIX + spec.name)
    done = record / "clean_model.pth" if spec.name == "prototype" else attack_result(record)
    if not run.report_only and record.exists() and (force or not done.exists()):
        shutil.rmtree(record)                       # BackdoorBench's os.mkdir refuses an existing folder
    return run(f"{spec.name}__attack", spec.command(), produces=done, reuse=not force)


def clean_reference(root: Path, template: str, force: bool) -> Cell:
    """QRA's clean reference record. BackdoorBench writes none (``badnet.py --pratio 0`` exits with "No poison
    sample generated !", ``prototype.py`` saves ``clean_model.pth`` only), so it is ``template``'s
    ``attack_result.pt`` with its model replaced by prototype.py's clean model."""
    clean_model = record_dir(root, f"{PREFIX}prototype") / "clean_model.pth"
    how = f"record/{template}/attack_result.pt with model = record/{PREFIX}prototype/clean_model.pth"
    target = attack_result(record_dir(root, f"{PREFIX}{CLEAN}"))
    if not clean_model.exists():
        return Cell("no clean model: prototype.py did not run", how)
    if target.exists() and not force:
        return Cell(OK, how)
    result = torch.load(attack_result(record_dir(root, template)), map_location="cpu", weights_only=False)
    result["model"] = torch.load(clean_model, map_location="cpu", weights_only=True)
    target.parent.mkdir(exist_ok=True)
    torch.save(result, target)
    return Cell(OK, how)


def record_labels(record: Path) -> tuple[dict[int, tuple[int, int]], int]:
    """bd_train's (bd_label, original_label) per index from ``attack_result.pt``, and the attack target."""
    result = torch.load(attack_result(record), map_location="cpu", weights_only=False)
    data = result["bd_train"]["bd_data_container"]["data_dict"]
    labels = {int(i): (int(v["other_info"][0]), int(v["other_info"][1])) for i, v in data.items()}
    bd_test = result["bd_test"]["bd_data_container"]["data_dict"]
    return labels, min(int(v["other_info"][0]) for v in bd_test.values())


def defend(run: Runner, row: Row, method: str, reuse: bool) -> None:
    """One mode through its installed launcher."""
    result = DefenseLayout.of(record_dir(run.root, row.record), method).result
    row.cells[method] = run(f"{row.attack}__{method}", defense_argv(row, method), produces=result, reuse=reuse)


def retune_and_qra(run: Runner, row: Row, reuse: bool) -> None:
    """retune (and after it qra) on FST's result; the pool columns from retune's run_info.json."""
    rec = record_dir(run.root, row.record)
    probe = ["--record", f"record/{row.record}", "--defense", "fst", *PROBE]
    fst = DefenseLayout.of(rec, "fst")
    row.cells["retune"] = run(f"{row.attack}__retune", ["retune", *probe], True, fst.retune_result, reuse)
    if not row.cells["retune"].ok:
        row.cells["qra"] = Cell("not run: retune did not run")
        return
    info = json.loads(fst.retune_info.read_text())
    pool = info["poison_pool"]
    labels, target = record_labels(rec)
    row.pool = {"pool_rule": pool["rule"], "pool_size": str(pool["size"]), "pool_flagged": str(pool["flagged"]),
                "pool_excluded": str(pool["excluded"]),
                "pool_check": check_pool(info["poisoned_train_indices"], labels, target, pool["rule"])}
    row.cells["qra"] = run(f"{row.attack}__qra", ["qra", *probe, "--reference_record", f"record/{PREFIX}{CLEAN}", *QRA],
                           True, fst.qra_result, reuse)


def export_checkout(root: Path) -> Path:
    """A copy of the checkout's code for ``fst-plugin export``, so the exported scripts never replace the launchers
    that the defense runs use; its ``record/``, ``data/`` and ``compat_logs/`` are links to the checkout's."""
    copy = root.parent / f"{root.name}_compat_export"
    linked = ("record", "data", "compat_logs")
    if not copy.exists():
        shutil.copytree(root, copy, symlinks=True, ignore=lambda d, names: linked if Path(d) == root else ())
        for name in linked:
            (copy / name).symlink_to(root / name)
    return copy


def run_exported(run: Runner, row: Row, methods: list[str]) -> None:
    """The exported scripts on the record (in the export copy; they write to the record's defense folders)."""
    cells = {m: run(f"{row.attack}__export_{m}", defense_argv(row, m)) for m in methods}
    failed = [(m, c) for m, c in cells.items() if not c.ok]
    row.cells["export"] = Cell(f"{failed[0][0]}: {failed[0][1].status}", failed[0][1].command) if failed else Cell(OK)


def defense_argv(row: Row, method: str) -> list[str]:
    return [f"defense/{method}.py", "--result_file", row.record, "--yaml_path",
            f"./config/defense/{method}/cifar10.yaml", *DEFENSE]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backdoorbench", type=Path, required=True, help="root of a BackdoorBench checkout")
    parser.add_argument("--data", type=Path, required=True, help="folder holding cifar-10-batches-py (full CIFAR-10)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/compat"))
    parser.add_argument("--attacks", nargs="+", default=[s.name for s in ATTACKS], help="subset of the attacks")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per command")
    parser.add_argument("--force", action="store_true", help="re-run what already has its result file")
    parser.add_argument("--jobs", type=int, default=1, help="records processed at once")
    parser.add_argument("--skip-export", action="store_true", help="a partial run: no export phase")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the matrix from the results and logs of earlier runs")
    parser.add_argument("--export-methods", nargs="+", default=["fst"], choices=EXPORTED,
                        help="exported scripts to run per record (export writes all of %(choices)s)")
    parser.add_argument("--commit", default="unknown", help="the checkout's BackdoorBench commit, for the README")
    parser.add_argument("--notes", type=Path, help="Markdown appended to the README as its Notes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = args.backdoorbench.resolve()
    unknown = sorted(set(args.attacks) - {s.name for s in ATTACKS})
    if unknown or not (root / "attack").is_dir():
        parser.error(f"unknown attacks {unknown}" if unknown else f"{root} has no attack/ folder")
    subset = root / DATA / "cifar10"
    if not (subset / "cifar-10-batches-py/test_batch").exists():
        log.info("subset: %s", write_cifar10_subset(args.data, subset, args.train_per_class, args.test_per_class))
    run = Runner(root, args.timeout, args.report)
    trojannn_yaml(root)
    with ThreadPoolExecutor(args.jobs) as pool:
        helpers = {PROTOTYPE.name: run_attack(run, PROTOTYPE, args.force)}
        specs = [spec for spec in ATTACKS if spec.name in args.attacks]
        rows = [Row(spec.name, PREFIX + spec.name, {"attack_run": cell})
                for spec, cell in zip(specs, pool.map(lambda spec: run_attack(run, spec, args.force), specs))]
        ready = [row for row in rows if row.cells["attack_run"].ok]
        if ready:
            helpers[CLEAN] = clean_reference(root, ready[0].record, args.force)
        install = run("install", ["install", "--backdoorbench", str(root)], True)
        if not install.ok:
            parser.error(f"fst-plugin install failed: {install.status}")
        list(pool.map(lambda job: defend(run, *job, not args.force), [(row, m) for row in ready for m in MODES]))
        list(pool.map(lambda row: retune_and_qra(run, row, not args.force), ready))
        if not args.skip_export:
            copy = Runner(export_checkout(root), args.timeout, args.report)
            export = copy("export", ["export", "--backdoorbench", str(copy.root)], True)
            if export.ok:
                list(pool.map(lambda row: run_exported(copy, row, args.export_methods), ready))
            else:
                for row in ready:
                    row.cells["export"] = export
    write_csv(rows, args.out / "results.csv")
    meta = {"commit": args.commit, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "train_per_class": str(args.train_per_class), "test_per_class": str(args.test_per_class),
            "export_methods": ", ".join(args.export_methods)}
    notes = args.notes.read_text() if args.notes and args.notes.exists() else ""
    (args.out / "README.md").write_text(render_readme(rows, helpers, meta, notes))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
