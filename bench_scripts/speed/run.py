"""How close a defense runs to the compute it needs, measured side by side on one record and one device.

Measures, interleaved in one process and repeated (``--repeats``), for one defense (``--method``):

* (a) ``limit``: the compute limit. The record's model, in the defense's precision, with every tensor already on
  the device: per epoch, fwd+bwd+SGD step over the (augmented, normalised) tuning batches, then a forward pass
  over the clean and poisoned test batches. No data loading at all.
* (b) ``tensor``: the defense on ``input_pipeline: tensor``;
* (c) ``backdoorbench``: the defense on ``input_pipeline: backdoorbench`` (the per-image DataLoader path);
* (d) ``bb_ft``: BackdoorBench's own ``defense/ft.py`` on the same record, run as a subprocess of
  ``--bb-python`` in ``--backdoorbench DIR`` (when given; (b) and (c) then run inside that checkout too, so all
  three use BackdoorBench's loaders and clean split);
* (e) ``attack`` against ``attack_limit``: ``fst_plugin.attacks.train_classifier`` for one epoch on
  ``--attack-images`` clean training images vs fwd+bwd+step over the same batches already on the device.

Per epoch means: from the end of the defense's "before" evaluation to the end of its last epoch (training and
the per-epoch evaluation: the runner's ``DefenseResult.tuning_time_s``), divided by the epochs; for BackdoorBench's ft, from its "All setting done" log line
to its last epoch's log line (its log has 1 s resolution). Setup (record loading, decoding) is reported apart.
Peak RSS is sampled every 20 ms during each measurement (a measurement's peak includes what the process holds
from earlier ones); Peak GPU memory on CUDA. BackdoorBench's ft: not measured (a forked child's RSS counts the parent's pages).

Defense outputs never land in the given record: the record is mirrored (symbolic links) into a temporary
folder, whose ``defense/speed_<path>/`` receives them; BackdoorBench's ft runs on a mirrored record
``<name>__speed`` inside the checkout, removed afterwards.

Writes ``<out>/<device>.csv`` (one row per measurement) and prints the ratio table for the README.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from bench_scripts.speed.measures import (Setup, measure_attack, measure_bb_ft, measure_defense, measure_limit,
                                          mirror_record)
from bench_scripts.speed.report import Row, device_name, load_average, ratio_table, read_csv, write_csv
from fst_plugin.core.modes import MODES
from fst_plugin.defense.config import INPUT_PIPELINES
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import records_dir
from fst_plugin.runtime import resolve_device

log = logging.getLogger("speed")


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--report"]:  # the ratio table of CSVs already written
        for path in argv[1:]:
            print(f"{path}\n\n{ratio_table(read_csv(Path(path)))}\n")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, required=True, help="attack record folder (never written to)")
    parser.add_argument("--dataset_path", type=Path, required=True, help="folder holding <dataset>/")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--method", default="fst", choices=sorted(MODES))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.02)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--eval_subset", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["limit", "tensor", "backdoorbench", "attack"])
    parser.add_argument("--attack-images", type=int, default=2000, help="(e): clean training images, one epoch")
    parser.add_argument("--backdoorbench", type=Path, default=None,
                        help="a BackdoorBench checkout: (b), (c) run inside it and (d) runs its defense/ft.py")
    parser.add_argument("--bb-python", default=sys.executable, help="the python of the BackdoorBench checkout's venv")
    parser.add_argument("--out", type=Path, default=Path("bench_results/speed"))
    parser.add_argument("--csv-name", default=None, help="CSV file name (default: <device>.csv)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("fst_plugin", "fst_plugin.core.tuning"):
        logging.getLogger(noisy).setLevel(logging.INFO)

    command = "python " + " ".join(shlex.quote(a) for a in ["bench_scripts/speed/run.py", *argv])
    device = resolve_device(args.device)
    record = args.record.resolve()
    dataset_path = args.dataset_path.resolve()
    bb_root = args.backdoorbench.resolve() if args.backdoorbench else None
    settings = {"dataset_path": str(dataset_path), "dataset": args.dataset, "epochs": args.epochs, "ratio": args.ratio,
                "batch_size": args.batch_size, "device": device, "num_workers": 0, "random_seed": args.seed,
                "amp": args.amp}
    if args.eval_subset:
        settings["eval_subset"] = args.eval_subset
    rows: list[Row] = []
    name = device_name(device)
    csv_path = (args.out / (args.csv_name or f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')}.csv")).resolve()
    with tempfile.TemporaryDirectory(prefix="fst_speed_") as tmp:
        mirror = mirror_record(record, records_dir(Path(tmp)))
        setup = Setup(record=mirror, source=record, method=args.method, settings=settings, device=device)
        model_name = load_attack_record(mirror).model_name
        setup.info = {"device": name, "record": str(record), "model": model_name, "method": args.method}
        cwd = os.getcwd()
        if bb_root is not None:
            os.chdir(bb_root)  # the defenses then use BackdoorBench's loaders (make_backend looks at the cwd)
        try:
            for repeat in range(args.repeats):
                measures = []
                if "limit" not in args.skip:
                    measures.append(lambda: [measure_limit(setup, repeat)])
                for pipeline in INPUT_PIPELINES:
                    if pipeline not in args.skip:
                        measures.append(lambda pipeline=pipeline: [measure_defense(setup, pipeline, repeat)])
                if bb_root is not None:
                    measures.append(lambda: [measure_bb_ft(setup, bb_root, args.bb_python, repeat)])
                if "attack" not in args.skip:
                    measures.append(lambda: measure_attack(setup, dataset_path / args.dataset, args.dataset,
                                                           args.attack_images, repeat))
                for measure in measures:
                    for row in measure():
                        log.info("speed: %s", row)
                        rows.append(row)
                    write_csv(csv_path, rows)  # after every measurement: a cut-off run keeps its rows
        finally:
            os.chdir(cwd)
    write_csv(csv_path, rows)
    table = ratio_table(rows)
    print(f"\n{name}, torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_average()}")
    print(f"command: {command}\n")
    print(table)
    print(f"\nwrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
