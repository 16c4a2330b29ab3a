"""``python -m bench_scripts.campaign``: print the plan, then run as much of it as the budget allows (see
docs/campaign.md). Safe to re-run: finished stages are skipped and records resume from their checkpoints."""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from bench_scripts.campaign.collect import collect
from bench_scripts.campaign.plan import Paths, build_plan, format_plan
from bench_scripts.campaign.profiles import PROFILES
from bench_scripts.campaign.runner import Runner, State
from bench_scripts.common import REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench_scripts.campaign", description=__doc__)
    parser.add_argument("--protocol", choices=sorted(PROFILES), default="gpu",
                        help="gpu: the paper-scale campaign on one GPU; tiny: all of it on the CPU in a few minutes")
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 folder (cifar-10-batches-py or train/ test/)")
    parser.add_argument("--out", type=Path, required=True, help="what comes back: at most 8 files of at most 16 MB")
    parser.add_argument("--work", type=Path, help="records, results, logs and state, kept between calls "
                                                  "(default bench_cache/campaign-<protocol>)")
    parser.add_argument("--budget-s", type=float, help="seconds this call may take (default: the profile's)")
    parser.add_argument("--stage", nargs="+", metavar="STAGE", help="run only these stages (collect always runs)")
    parser.add_argument("--backdoorbench", type=Path, help="a BackdoorBench checkout: its Hello-Kitty key "
                        "(read there, never copied) and its built-in defenses")
    parser.add_argument("--commit", help="the commit to record when the tree has no .git (e.g. an installed copy)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    profile = PROFILES[args.protocol]
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder. Fix: pass the CIFAR-10 folder", file=sys.stderr)
        return 2
    if args.backdoorbench is not None and not (args.backdoorbench / "defense").is_dir():
        print(f"error: --backdoorbench {args.backdoorbench} has no defense/ folder. Fix: pass the root of a "
              "BackdoorBench checkout", file=sys.stderr)
        return 2
    work = (args.work or REPO / "bench_cache" / f"campaign-{profile.name}").resolve()
    paths = Paths(args.data.resolve(), work, args.out.resolve())
    plan = build_plan(profile, paths, args.budget_s or profile.budget_s,
                      args.backdoorbench.resolve() if args.backdoorbench else None, args.commit)
    unknown = set(args.stage or ()) - {s.name for s in plan.stages}
    if unknown:
        print(f"error: unknown stage(s) {', '.join(sorted(unknown))}. Fix: use "
              f"{', '.join(s.name for s in plan.stages)}", file=sys.stderr)
        return 2
    state = State(work / "state.json")
    print(format_plan(plan, {k: v["status"] + (f": {v['note']}" if v["note"] else "")
                             for k, v in state.data["stages"].items()}), flush=True)
    if args.dry_run:
        return 0
    runner = Runner(plan, set(args.stage) if args.stage else None)
    return runner.run(functools.partial(collect, commit=args.commit))


if __name__ == "__main__":
    sys.exit(main())
