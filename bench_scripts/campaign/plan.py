"""The campaign's one plan: its stages in order, each with the commands it runs, its estimate and the measured
figure the estimate rests on, and the reason when it is skipped. Printed before a run starts and by --dry-run.

Every command is an existing script run through its CLI (``python -m bench_scripts.<script>``, ``fst-plugin``,
``torchrun``); the plan only chooses their arguments. ``{stop_after_s}`` in a records command is filled in at
run time with the seconds the budget leaves.
"""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from bench_scripts.campaign.profiles import CLEAN_REFERENCE, HELLO_KITTY, RECORDS, Estimate, Profile, RecordSpec
from bench_scripts.protocols import ALPHA_VARIANTS, BB_METHODS, PAM_VARIANTS, QRA_MAX_ASR
from fst_plugin.record.layout import record_dir

STOP_AFTER = "{stop_after_s}"
SMOKE_RECORD, SMOKE_REFERENCE = "badnets_0.1_s0", "badnets_0_s0"
SPEED_RECORD = "badnets_0.01_s0"
ANY_RECORD = "*"


@dataclass(frozen=True)
class Step:
    """One command of a stage; ``needs`` names a record that must be finished for it to run (``ANY_RECORD``: any
    record), ``makes`` the record it makes. The runner runs it as a job of the grid (bench_scripts/jobs)."""

    argv: tuple[str, ...]
    needs: Optional[str] = None
    makes: Optional[str] = None

    def shell(self) -> str:
        """The command as one would type it (``python`` for this interpreter)."""
        return " ".join(shlex.quote("python" if a == sys.executable else a) for a in self.argv)


@dataclass(frozen=True)
class Stage:
    name: str
    issue: int
    what: str
    seconds: float
    basis: str
    steps: tuple[Step, ...] = ()
    min_s: float = 0.0                # the least time worth starting it with
    parallel: int = 1                 # steps at once
    skip: Optional[str] = None        # why the stage does not run
    must_pass: bool = False           # a failure stops the campaign (the smoke)


@dataclass(frozen=True)
class Paths:
    """The campaign's folders: ``work`` (cache, results, logs, state; kept between calls) and ``out`` (what
    comes back: at most 8 files)."""

    data: Path
    work: Path
    out: Path

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def results(self) -> Path:
        return self.work / "results"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def root(self, folder: str) -> Path:
        """The cache folder ``folder`` (``Profile.records_folder``): a root shaped like BackdoorBench's checkout."""
        return self.cache / folder

    def record(self, folder: str, name: str) -> Path:
        """Record ``name`` under the cache folder ``folder``."""
        return record_dir(self.root(folder), name)


@dataclass(frozen=True)
class Plan:
    profile: Profile
    paths: Paths
    budget_s: float
    stages: tuple[Stage, ...]
    backdoorbench: Optional[Path] = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def bench(script: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", f"bench_scripts.{script}", *args)


def registered_defenses() -> set[str]:
    """The names ``fst-plugin list`` prints (the defenses registered under backdoorbench.defenses)."""
    out = subprocess.run([sys.executable, "-m", "fst_plugin", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _records_stage(p: Profile, estimates: dict[str, Estimate], paths: Paths, common: tuple[str, ...], bb: Optional[Path],
                   specs: tuple[RecordSpec, ...], name: str, issue: int, what: str) -> Stage:
    steps, missing_key = [], False
    for spec in specs:
        key: tuple[str, ...] = ()
        if spec.hello_kitty:
            if bb is None:
                missing_key = True
                continue
            key = ("--blend-pattern", str(bb / HELLO_KITTY))
        steps.append(Step(bench("records", *common, "--attacks", spec.item, *key, "--epochs", str(p.epochs),
                              "--checkpoint-every", str(p.checkpoint_every), "--stop-after-s", STOP_AFTER,
                              *(("--compile",) if p.compile else ())), makes=spec.name()))
    stage = _stage(estimates, name, issue, what, steps, parallel=p.jobs)
    if missing_key:
        stage = dataclasses.replace(stage, basis=stage.basis + "; the Hello-Kitty record needs --backdoorbench")
    return stage


def _stage(estimates: dict[str, Estimate], name: str, issue: int, what: str, steps: Iterable[Step] = (),
           **kwargs: Any) -> Stage:
    """A stage with the profile's estimate for ``name`` (seconds, basis, least starting time)."""
    est = estimates[name]
    return Stage(name, issue, what, est.seconds, est.basis, tuple(steps),
                 min_s=est.seconds if est.min_s is None else est.min_s, **kwargs)


def build_plan(p: Profile, paths: Paths, budget_s: float, backdoorbench: Optional[Path] = None,
               commit: Optional[str] = None) -> Plan:
    data = ("--data", str(paths.data))
    protocol = ("--protocol", p.protocol, "--set", *p.protocol_set,
                "--cache", str(paths.cache))
    common = (*protocol, "--results", str(paths.results), *data)
    smoke_cache, speed_cache = paths.work / "smoke", paths.work / "speed"
    smoke_root = smoke_cache / p.smoke_folder
    smoke_common = ("--protocol", p.protocol, "--cache", str(smoke_cache), "--results",
                    str(paths.work / "smoke_results"))
    smoke_args = ("--record", str(record_dir(smoke_root, SMOKE_RECORD)), "--reference",
                  str(record_dir(smoke_root, SMOKE_REFERENCE)), "--dataset_path", str(smoke_root / "data"),
                  "--device", p.device)
    names = [s.name() for s in RECORDS if not s.hello_kitty or backdoorbench is not None]
    registered = registered_defenses()
    estimates = p.estimates(p, backdoorbench is not None)   # the built-ins' models are retuned too when they run

    smoke = _stage(estimates, "smoke", 20, "every mode 1 epoch on a tiny record, tensor and per-image path, AMP; retune and qra "
                   f"one step; torchrun --nproc_per_node 1 ({'nccl' if p.device == 'cuda' else 'gloo'})", (
                      Step(bench("records", *smoke_common, *data, "--attacks", "badnets:0.1", "badnets:0",
                                "--set", *p.smoke_set)),
                      Step((sys.executable, "-m", "bench_scripts.campaign.smoke", *smoke_args,
                           *(("--compile-check",) if p.compile else ()))),
                      Step((sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "bench_scripts.campaign.smoke", *smoke_args, "--distributed"))),
                  must_pass=True)
    speed_record = record_dir(speed_cache / p.speed_folder, SPEED_RECORD)
    speed = _stage(estimates, "speed", 20, "bench_scripts.speed: the compute limit, FST on the tensor and the per-image path, "
                   "one attack epoch", (
                      Step(bench("records", "--protocol", p.protocol, "--cache", str(speed_cache), "--results",
                                str(paths.work / "speed_results"), *data, "--attacks", "badnets:0.01",
                                "--set", *p.speed_set)),
                      Step(bench("speed", "--record", str(speed_record), "--dataset_path",
                                str(speed_cache / p.speed_folder / "data"), "--device", p.device, *p.speed_args,
                                "--out", str(paths.results), "--csv-name", "speed.csv"))))
    records = _records_stage(p, estimates, paths, common, backdoorbench, RECORDS, "records", 20,
                             f"{', '.join(s.label for s in RECORDS)}: {p.epochs} epochs of the {p.protocol} protocol's "
                             f"schedule, side by side, a checkpoint every {p.checkpoint_every} epochs")
    defenses = _stage(estimates, "defenses", 20, "the five modes (run_defenses) and FST at lr 0.05 (ablations --only lr)",
                     tuple(job for n in names for job in (
                         Step(bench("defenses", *common, "--records", n), needs=n),
                         Step(bench("defenses.ablations", *common, "--record", n, "--only", "lr"), needs=n))),
                     parallel=p.jobs)
    # BackdoorBench's built-ins (protocols.BUILTINS) through run_defenses' runner, each under the profile's cap
    builtin_common = ("--protocol", p.protocol, "--set", *p.protocol_set, f"bb_cap_s={p.builtin_cap_s}", "--cache",
                      str(paths.cache), "--results", str(paths.results), *data)
    builtins = _stage(estimates, "builtins", 21, f"BackdoorBench's {', '.join(BB_METHODS)} (run_defenses --backdoorbench), "
                     f"their cifar10.yaml, each capped at {p.builtin_cap_s} s",
                     tuple(Step(bench("defenses", *builtin_common, "--records", n, "--methods", "--backdoorbench",
                                     str(backdoorbench or "BACKDOORBENCH"), "--bb-defenses", d), needs=n)
                           for n in names for d in BB_METHODS), parallel=p.jobs,
                     skip=None if backdoorbench is not None else "no BackdoorBench checkout (--backdoorbench)")
    reference = _records_stage(p, estimates, paths, common, backdoorbench, (CLEAN_REFERENCE,), "reference", 21,
                               "the clean reference (rate 0) that retune and QRA compare against")
    retune = _stage(estimates, "retune", 21, "evaluate --retune --qra: the retuning attack on every model, ours and the "
                   f"built-ins, with the clean reference; QRA on those purified to ASR <= {QRA_MAX_ASR:g}",
                   tuple(Step(bench("evaluation", *protocol, *data, "--records", n, "--retune", "--qra",
                                   "--qra-max-asr", f"{QRA_MAX_ASR:g}", "--out", str(paths.work / "retune" / f"{n}.csv")),
                             needs=n) for n in names), parallel=p.jobs)
    pam = _stage(estimates, "pam", 22, f"PAM and FST + PAM ({', '.join(PAM_VARIANTS)}), and FST with its alpha chosen per "
                 f"model ({', '.join(ALPHA_VARIANTS)}, issue 27), on every record, before the retune",
                tuple(Step(bench("defenses", *common, "--records", n, "--methods", *PAM_VARIANTS, *ALPHA_VARIANTS),
                           needs=n)
                      for n in names),
                parallel=p.jobs, skip=None if "pam" in registered else "pam not registered (fst-plugin list)")
    evaluate = _stage(estimates, "evaluate", 20, "the one evaluator on every model -> results.csv",
                      (Step(bench("evaluation", *protocol, *data, "--out",
                                 str(paths.results / "results.csv")), needs=ANY_RECORD),))
    table = _stage(estimates, "table", 20, "make_table -> table.md",
                  (Step(bench("report", *protocol, "--results",
                             str(paths.results)), needs=ANY_RECORD),))
    collect = _stage(estimates, "collect", 20, f"at most 8 files of at most 16 MB into {paths.out}")
    notes = (f"commit {commit or 'unknown'}; records trained side by side as {p.jobs} processes sharing the device",)
    return Plan(p, paths, budget_s, (smoke, speed, records, defenses, builtins, reference, pam, retune, evaluate,
                                     table, collect), backdoorbench, notes)


FINISH = ("evaluate", "table", "collect")  # always run at the end, in the time reserved for them


def format_plan(plan: Plan, progress: Optional[dict[str, str]] = None) -> str:
    """The plan as text: one line per stage (estimate, cumulative, fits or not), its basis and its commands."""
    progress = progress or {}
    reserve = sum(plan.stage(n).seconds for n in FINISH)
    lines = [f"campaign plan: profile {plan.profile.name} (protocol {plan.profile.protocol}, device "
             f"{plan.profile.device}), budget {plan.budget_s:.0f} s = {plan.budget_s / 60:.1f} min, "
             f"{reserve:.0f} s reserved for {', '.join(FINISH)}", *(f"  {n}" for n in plan.notes), ""]
    used = 0.0
    for stage in plan.stages:
        room = plan.budget_s - reserve - used
        if stage.skip:
            state = f"skipped: {stage.skip}"
        elif stage.name in FINISH:
            state = "time reserved, runs at the end of every call"
        else:
            used += stage.seconds
            state = (f"cumulative {used / 60:.1f} min, fits" if stage.seconds <= room else
                     f"this call: {max(room, 0) / 60:.1f} min of it ({100 * max(room, 0) / stage.seconds:.0f}%), "
                     "the rest in a later call" if room >= stage.min_s else "a later call")
        done = f" [{progress[stage.name]}]" if stage.name in progress else ""
        lines.append(f"{stage.name:9s} (issue {stage.issue}) est {stage.seconds / 60:5.1f} min  {state}{done}")
        lines.append(f"          {stage.what}")
        lines.append(f"          estimate rests on: {stage.basis}")
        lines += [f"          $ {step.shell()}" for step in stage.steps]
    main = sum(s.seconds for s in plan.stages if s.issue == 20 and not s.skip)
    lines.append(f"\nissue 20's stages: {main / 60:.1f} min in all at the measured rates; a call that runs out of budget "
                 "stops cleanly (records pause at an epoch's end with a checkpoint) and the next call continues")
    return "\n".join(lines)
