"""The paper's ablations on one record, run as extra defense variants (evaluated later by evaluate.py).

    python -m bench_scripts.defenses.ablations --protocol cpu --data data/cifar10 --record badnets_0.01_s0
        [--only alpha size projection]

* alpha sweep: FST with alpha in the protocol's list (defense/fst_alpha<a>/);
* tuning-set size: the protocol's ``size_methods`` (FST, FT-init, FE-tuning) with n seeded random clean
  training images, n in the protocol's list down to 50 (defense/<method>_n<n>/, index files under the
  record's bench_index/);
* projection off: the protocol's ``projection_methods`` with the head-norm projection off
  (defense/<method>_noproj/), and with the paper's bound ‖W‖ ≤ ‖W₀‖ instead of the official code's
  ‖W‖ = ‖W₀‖ (defense/<method>_atmost/);
* longer tuning (``--only epochs``, not in the default set): the protocol's ``long_methods`` for
  ``long_epochs`` epochs (defense/<method>_e<epochs>/), to see whether clean accuracy keeps recovering;
* larger learning rate (``--only lr``, not in the default set): the ``long_methods`` at each of the protocol's
  ``ablation_lrs`` (defense/<method>_lr<lr>/), to see whether moving the early layers more removes a trigger
  that the paper's lr 0.01 leaves in place.
The per-epoch ASR / C-Acc curves (the efficiency figure) need no extra run: every grid defense already writes
its per-epoch CSV; make_table.py draws them. Finished variants are skipped unless --force.
"""
from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from bench_scripts.common import DATASET, add_protocol_args, link_data, start
from bench_scripts.defenses.run import RunDefense
from bench_scripts.jobs.cli import add_executor_arguments, run_jobs
from bench_scripts.jobs.graph import Graph
from fst_plugin.core import get_mode
from fst_plugin.data import load_clean_split

log = logging.getLogger("bench.ablations")
# the save names of the size and longer-tuning variants, as the report finds them in results.csv
SIZE_VARIANT = r"_n\d+$"                  # <method>_n<images>
LONGER_VARIANT = r"_e\d+$|_lr[\d.e-]+$"   # <method>_e<epochs>, <method>_lr<lr>


def index_file(record_dir: Path, data_dir: Path, n: int, seed: int) -> Path:
    """``n`` clean training indices drawn like BackdoorBench's choose_index (random.sample, seeded)."""
    path = record_dir / "bench_index" / f"clean_n{n}_s{seed}.txt"
    if not path.is_file():
        total = len(load_clean_split(DATASET, data_dir, train=True))
        chosen = random.Random(seed).sample(range(total), n)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in chosen))
    return path


def variants(record_dir: Path, data_dir: Path, protocol, only: list[str], seed: int) -> list[tuple[str, str, dict]]:
    """(method, save name, config overrides) of every ablation run."""
    out: list[tuple[str, str, dict]] = []
    if "alpha" in only:
        out += [("fst", f"fst_alpha{a:g}", {"alpha": a}) for a in protocol.alphas if a != protocol.alpha]
    if "size" in only:
        for n in protocol.tuning_sizes:
            path = index_file(record_dir, data_dir, n, seed)
            out += [(m, f"{m}_n{n}", {"index": str(path.resolve())}) for m in protocol.size_methods]
    if "epochs" in only:
        out += [(m, f"{m}_e{protocol.long_epochs}", {"epochs": protocol.long_epochs})
                for m in protocol.long_methods]
    if "lr" in only:
        out += [(m, f"{m}_lr{lr:g}", {"lr": lr}) for m in protocol.long_methods for lr in protocol.ablation_lrs]
    if "projection" in only:
        out += [(m, f"{m}_noproj", {"projection": "off"}) for m in protocol.projection_methods]
        # the paper's constraint ‖W‖ ≤ ‖W₀‖ instead of the official code's ‖W‖ = ‖W₀‖; a frozen head (FE-tuning)
        # keeps its fresh, smaller norm under that bound, i.e. it is the "off" run again
        out += [(m, f"{m}_atmost", {"projection_bound": "at_most"}) for m in protocol.projection_methods
                if get_mode(m).train_head]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--record", required=True, help="record name, e.g. badnets_0.01_s0")
    parser.add_argument("--only", nargs="*", default=["alpha", "size", "projection"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    add_executor_arguments(parser, "variants side by side, each in its own process with its share of the cores")
    run = start(parser, argv)
    args, protocol, results = run.args, run.protocol, run.results
    data_root = link_data(run.root, args.data)
    record_dir = run.record_dir(args.record)
    jobs = [RunDefense(record_dir, name, protocol, data_root, results, args.seed, method, extra,
                       protocol.ablation_eval_subset, step="ablation").job()
            for method, name, extra in variants(record_dir, args.data, protocol, args.only, args.seed)]
    run_jobs(Graph(jobs), args, run.root, force=args.force)


if __name__ == "__main__":
    main()
