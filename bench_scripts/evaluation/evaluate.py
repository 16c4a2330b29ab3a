"""The one evaluator: every model of every record, measured the same way on the same test sets.

    python -m bench_scripts.evaluation --protocol cpu --data data/cifar10 [--records NAME ...] [--out results.csv]
        [--retune [--reference NAME]] [--qra]

For each record: the backdoored model ("none") and every ``defense/<name>/defense_result.pt`` (ours, the
ablation variants, BackdoorBench's built-ins alike) are loaded (safely, fst_plugin.record.load_untrusted) and
evaluated on the record's clean test images (the whole CIFAR-10 test split unless the protocol subsets it)
and the record's poisoned test images (its bd_test PNGs: every non-target test image with the trigger):
C-Acc, ASR, RA, DER against "none", and where the poisoned images' penultimate features sit: the share nearest
to the target class's clean-feature centroid (a head-free feature-level ASR), the share nearest to their own
class's, and the silhouette of target-class clean vs poisoned features (bench_scripts/evaluation/measures.py: C-Acc, ASR
and RA through fst_plugin.core.metrics, the package's one evaluator). The defense wall time comes from the
defense's run_info.json (a BackdoorBench built-in's from the runner's builtin_run.json, whose status and one-line
reason fill ``bb_status`` / ``bb_reason``; a built-in that left no model gets a row with its reason and no
numbers). Per-model results are cached next to the model (bench_eval.json, keyed by the
file's size and mtime), so re-running after adding defenses only evaluates the new ones.

Retuning attack (issue 11, fst_plugin.probes.retune): ``retune_acc``, ``retune_asr``, ``retune_ra`` are each model's
numbers after the attack, measured the same way from ``defense/<variant>/retune/retune_result.pt`` wherever it
exists; ``--retune`` runs the missing ones first (≈ 1–2 min each on the cpu protocol). The clean reference (a
record of the same protocol and seed at rate 0, ``<attack>_0_s<seed>``, or ``--reference NAME``) then gets a row
of its own, ``clean-reference``, measured on this record's test sets and retuned with its poisoned images.

Query-based reactivation attack (issue 11 part 4, fst_plugin.probes.qra): ``qra_asr`` (the model's ASR on the poisoned test
images with the learned perturbation), ``qra_clean_target`` (its rate of predicting the target on the perturbed
clean test images) and ``qra_ref_asr`` (the clean reference's ASR on the same perturbed poisoned images: a real
reactivation fools the purified model, not the clean one) come from ``defense/<variant>/retune/qra/run_info.json``
wherever QRA finished: QRA measures them itself, on the full clean test split and the record's poisoned test
images, because the perturbation is per image and lives only in that run. ``--qra`` runs the missing ones first for
the models with a retune result (QRA distils from it) when the record has a clean reference (≈ 2 min each on the
cpu protocol, 50 epochs over 1000 images).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench_scripts.common import add_protocol_args, link_data, load_defended, load_model, log_timing, start
from bench_scripts.defenses.builtins import RUN_FILE, BuiltinRun
from bench_scripts.evaluation.measures import TestSets
from bench_scripts.evaluation.per_model import (
    Probing, QraNotRun, RetuneModel, attack_with_qra, cached_measure, model_metrics,
)
from bench_scripts.protocols import GRID_VARIANTS, Protocol
from fst_plugin.core import defense_effectiveness_rating
from fst_plugin.probes.config import CLEAN_REFERENCE, NO_DEFENSE
from fst_plugin.probes.qra import read_metrics
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import (DefenseLayout, attack_result, defense_results, defenses_dir, finished_records,
                                      is_finished, record_dir)
from fst_plugin.runtime import resolve_device

log = logging.getLogger("bench.evaluate")
RETUNE_VARIANTS = (*GRID_VARIANTS, CLEAN_REFERENCE)
QRA_VARIANTS = tuple(v for v in RETUNE_VARIANTS if v != CLEAN_REFERENCE)  # QRA attacks a model against the reference
# the result columns each probe owns (filled by Retune.columns / Qra.columns, rounded by main)
RETUNE_COLUMNS = ("retune_acc", "retune_asr", "retune_ra")
QRA_COLUMNS = ("qra_asr", "qra_clean_target", "qra_ref_asr")


def variant_columns(defense_dir: Path) -> dict[str, Any]:
    """Method, alpha, tuning-set size, projection, epochs and wall time from the defense's run_info.json."""
    layout = DefenseLayout(defense_dir, defense_dir.name)
    info_path = layout.run_info
    if not info_path.is_file():  # a BackdoorBench built-in
        return builtin_columns(defense_dir)
    info = json.loads(info_path.read_text())
    cfg = info.get("config", {})
    index = cfg.get("index")
    n_clean = (sum(1 for _ in open(index)) if index and Path(index).is_file()
               else layout.index.read_text().count("\n") if layout.index.is_file() else None)
    # the alpha the tuning used (alpha auto: the one it chose; older runs: the config's)
    return {"method": info.get("method", defense_dir.name), "source": "fst_plugin",
            "alpha": info.get("alpha", cfg.get("alpha")),
            "n_clean": n_clean, "projection": {None: "auto", True: "on", False: "off"}.get(cfg.get("projection")),
            "projection_bound": cfg.get("projection_bound", "equal"),
            "epochs": cfg.get("epochs"), "defense_wall_s": round(float(info.get("wall_time_s", float("nan"))), 1),
            **pam_columns(info.get("pam_inversion"))}


def pam_columns(rounds: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What a PAM run's trigger inversion found (run_info.json's ``pam_inversion``, one row a round): the class it
    detected after round 1, the share of reversed samples the model gave that class and the mask's saturation after
    the last round, and where the features were split. Empty for a run without PAM."""
    if not rounds:
        return {}
    first, last = rounds[0], rounds[-1]
    return {"pam_detected_class": first["detected_class"], "pam_share_to_detected": last["share_to_detected"],
            "pam_mask_saturation": last["mask_saturation"], "pam_feature_split": first["feature_split"]}


def builtin_columns(defense_dir: Path) -> dict[str, Any]:
    """A BackdoorBench built-in's columns: its status, one-line reason and wall time (builtin_run.json)."""
    run = BuiltinRun.read(defense_dir)
    columns: dict[str, Any] = {"method": defense_dir.name, "source": "backdoorbench"}
    if run is not None:
        columns.update(bb_status=run.status, bb_reason=run.reason, defense_wall_s=run.wall_s)
    return columns


def unfinished_builtins(record_dir: Path, base: dict[str, Any]) -> list[dict[str, Any]]:
    """A row for each built-in that left no defense_result.pt (failed, past its cap, or cannot run), with its reason."""
    rows = []
    for run_file in sorted(defenses_dir(record_dir).glob(f"*/{RUN_FILE}")):
        if not DefenseLayout.of(record_dir, run_file.parent.name).finished:
            rows.append({**base, "variant": run_file.parent.name, **builtin_columns(run_file.parent),
                         **dict.fromkeys(("test_acc", "test_asr", "test_ra", "der"), np.nan)})
    return rows


def find_reference(record_dir: Path, seed: Any, name: str | None = None) -> Path | None:
    """The clean reference of a record: ``name``, else a record of the same seed at rate 0 (``*_0_s<seed>``)."""
    folder = record_dir.parent
    candidates = [folder / name] if name else sorted(folder.glob(f"*_0_s{seed}"))
    found = [c for c in candidates if is_finished(c) and c.resolve() != record_dir.resolve()]
    return found[0] if found else None


class Retune:
    """The retuning-attack columns: measure each model's retuned result, running missing retunes if asked."""

    def __init__(self, run_missing: bool, probing: Probing, reference: str | None,
                 variants: set[str] | None = None) -> None:
        self.run_missing, self.probing, self.reference = run_missing, probing, reference  # probing: how a retune runs
        self.variants = variants  # which ones --retune runs (None: all)

    def columns(self, record_dir: Path, variant: str, sets: TestSets,
                reference: Path | None = None) -> dict[str, float]:
        empty = dict.fromkeys(RETUNE_COLUMNS, np.nan)
        bd_train = sets.record.bd_train
        if bd_train is None or not bd_train.images:  # a clean record (rate 0) has nothing to retune with
            return empty
        path = DefenseLayout.of(record_dir, variant).retune_result
        if not path.is_file() and self.run_missing and (self.variants is None or variant in self.variants):
            RetuneModel(record_dir, variant, self.probing, reference)()
        if not path.is_file():
            return empty
        metrics = cached_measure(path, lambda: load_defended(path), sets, self.probing.device)
        return dict(zip(RETUNE_COLUMNS, (metrics["test_acc"], metrics["test_asr"], metrics["test_ra"])))


class Qra:
    """The QRA columns: read each model's finished QRA run, running missing ones (after its retune) if asked."""

    def __init__(self, run_missing: bool, probing: Probing, variants: set[str] | None = None,
                 max_asr: float | None = None) -> None:
        self.run_missing, self.probing = run_missing, probing  # probing: as Retune's
        self.variants = variants  # which ones --qra runs (None: all)
        self.max_asr = max_asr  # --qra runs only on models purified to this ASR (None: on every model)

    def columns(self, record_dir: Path, variant: str, reference: Path | None, asr: float) -> dict[str, float]:
        """``asr``: the model's ASR after its defense; QRA reactivates a purified model, so a model left above
        ``max_asr`` is not attacked (its columns stay empty unless a QRA result exists)."""
        empty = dict.fromkeys(QRA_COLUMNS, np.nan)
        if variant == CLEAN_REFERENCE or reference is None:
            return empty
        layout = DefenseLayout.of(record_dir, variant)
        wanted = (self.variants is None or variant in self.variants) and (self.max_asr is None or asr <= self.max_asr)
        metrics = read_metrics(layout.qra_dir)
        if metrics is None and self.run_missing and wanted and layout.retune_result.is_file():
            try:
                metrics = attack_with_qra(record_dir, variant, reference, self.probing)
            except QraNotRun as error:  # e.g. fewer poisoned images than the script's 500: the columns stay empty
                log.warning("qra %s %s not run: %s (run `fst-plugin qra` with other settings; evaluate reads "
                            "its result)", variant, record_dir.name, error)
                return empty
        if metrics is None:
            return empty
        model, ref = metrics["purified"], metrics["clean_reference"]
        return dict(zip(QRA_COLUMNS, (model["asr_qra"], model["clean_target_qra"], ref["asr_qra"])))


def evaluate_record(record_dir: Path, data_dir: Path, device: str, retune: Retune | None = None,
                    qra: Qra | None = None) -> list[dict[str, Any]]:
    sets = TestSets(record_dir, data_dir)
    rec, info = sets.record, sets.info
    base = {"record": record_dir.name, "attack": info.get("attack"), "trigger_key": info.get("trigger_key"),
            "rate": info.get("rate"), "seed": info.get("seed"), "model": rec.model_name}
    before = model_metrics(record_dir, NO_DEFENSE, sets, device)
    rows = [{**base, "variant": "none", "method": "none", "source": "attack", **before, "der": float("nan"),
             "defense_wall_s": 0.0, "attack_train_s": info.get("train_s")}]
    for path in defense_results(record_dir):
        metrics = model_metrics(record_dir, path.parent.name, sets, device)
        der = defense_effectiveness_rating(before["test_acc"], before["test_asr"], metrics["test_acc"], metrics["test_asr"])
        row = {**base, "variant": path.parent.name, **variant_columns(path.parent), **metrics, "der": der}
        if "pam_detected_class" in row:  # the defense cannot know the target; the evaluator, holding the record, can
            row["pam_target_found"] = row["pam_detected_class"] == info.get("target")
        rows.append(row)
        log.info("%s / %s: C-Acc %.2f ASR %.2f RA %.2f", record_dir.name, path.parent.name,
                 100 * metrics["test_acc"], 100 * metrics["test_asr"], 100 * metrics["test_ra"])
    if retune is not None:
        rows += retune_rows(record_dir, rows, sets, before, retune, qra)
    return rows + unfinished_builtins(record_dir, base)


def retune_rows(record_dir: Path, rows: list[dict[str, Any]], sets: TestSets, before: dict[str, float],
                retune: Retune, qra: Qra | None = None) -> list[dict[str, Any]]:
    """Fill the retune (and QRA) columns of ``rows`` (in place) and return the clean reference's row, if it has one."""
    reference = find_reference(record_dir, sets.info.get("seed"), retune.reference)
    for row in rows:
        row.update(retune.columns(record_dir, row["variant"], sets))
        if qra is not None:
            row.update(qra.columns(record_dir, row["variant"], reference, row["test_asr"]))
    has_bd_train = sets.record.bd_train is not None and bool(sets.record.bd_train.images)
    ref_layout = DefenseLayout.of(record_dir, CLEAN_REFERENCE)
    if reference is None or not has_bd_train or not (retune.run_missing or ref_layout.retune_result.is_file()):
        return []
    ref = load_attack_record(reference, check_files=False)
    metrics = cached_measure(attack_result(reference),
                             lambda: load_model(ref.model_name, ref.num_classes, ref.state_dict), sets,
                             retune.probing.device, cache=ref_layout.folder / "bench_eval.json")
    der = defense_effectiveness_rating(before["test_acc"], before["test_asr"], metrics["test_acc"], metrics["test_asr"])
    row = {**{k: rows[0][k] for k in ("record", "attack", "trigger_key", "rate", "seed", "model")},
           "variant": CLEAN_REFERENCE, "method": CLEAN_REFERENCE, "source": f"reference {reference.name}", **metrics,
           "der": der, **retune.columns(record_dir, CLEAN_REFERENCE, sets, reference)}
    log.info("%s / clean reference %s: C-Acc %.2f ASR %.2f, retuned ASR %.2f", record_dir.name, reference.name,
             100 * row["test_acc"], 100 * row["test_asr"], 100 * row["retune_asr"])
    return [row]


def eval_device(protocol: Protocol) -> str:
    """The device the evaluator measures on: the protocol's, or the CPU where a cuda protocol finds no GPU."""
    return resolve_device(protocol.device if protocol.device != "cuda" else "auto")


def probing_of(protocol: Protocol, data_root: Path, results: Path) -> Probing:
    """How the probes of a run on ``protocol`` run: its evaluation device, its defenses' ratio, its probe_subset."""
    return Probing(data_root, eval_device(protocol), protocol.defense_ratio, results, protocol.probe_subset)


def write_results(protocol: Protocol, root: Path, data_dir: Path, out: Path, names: list[str],
                  retune: Retune | None = None, qra: Qra | None = None) -> pd.DataFrame:
    """Every model of the records ``names`` measured the same way -> ``out`` (results.csv); the table."""
    started = time.time()
    device = eval_device(protocol)
    rows = [row for name in names for row in evaluate_record(record_dir(root, name), data_dir, device, retune, qra)]
    df = pd.DataFrame(rows)
    for col in ("alpha", "n_clean", "projection", "projection_bound", "epochs", "bb_status", "bb_reason"):
        if col not in df:
            df[col] = np.nan
    df.insert(0, "protocol", protocol.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    for col in ("test_acc", "test_asr", "test_ra", "der", "feat_target_share", "feat_true_share", "sep_silhouette",
                *RETUNE_COLUMNS, *QRA_COLUMNS):
        df[col] = df[col].astype(float).round(5)
    df.to_csv(out, index=False)
    log_timing(out.parent, "evaluate", time.time() - started, models=len(df))
    log.info("wrote %s (%d rows)", out, len(df))
    return df


@dataclass(frozen=True)
class WriteResults:
    """results.csv of the grid's records, as a job's work: it runs no probe, it reads the retune and QRA results
    that exist (their own jobs ran them)."""

    protocol: Protocol
    root: Path
    data_dir: Path
    out: Path
    names: tuple[str, ...]

    def __call__(self) -> str:
        probing = probing_of(self.protocol, self.root / "data", self.out.parent)
        names = [n for n in self.names if is_finished(record_dir(self.root, n))]
        write_results(self.protocol, self.root, self.data_dir, self.out, names, Retune(False, probing, None),
                      Qra(False, probing))
        missing = len(self.names) - len(names)
        return f"{len(names)} records" + (f" ({missing} missing: their record failed)" if missing else "")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser, results=False)
    parser.add_argument("--records", nargs="*")
    parser.add_argument("--out", type=Path, help="results CSV (default bench_results/<protocol>/results.csv)")
    parser.add_argument("--retune", action="store_true", help="run the retuning attack where its result is missing "
                        "(slow); without it the retune columns come from the results that exist")
    parser.add_argument("--qra", action="store_true", help="run the query-based reactivation attack where its result "
                        "is missing and the model's retune exists (slow); without it the qra columns come from the "
                        "results that exist")
    parser.add_argument("--qra-variants", nargs="*", default=list(QRA_VARIANTS),
                        help="which models --qra attacks (default: as --retune-variants, without the clean reference)")
    parser.add_argument("--qra-max-asr", type=float, metavar="FRACTION",
                        help="--qra attacks only models whose ASR after the defense is at most this (e.g. 0.1: QRA "
                             "asks whether a purified model can be reactivated; default: every model)")
    parser.add_argument("--reference", help="clean reference record (default: <attack>_0_s<seed> of the protocol)")
    parser.add_argument("--retune-variants", nargs="*", default=list(RETUNE_VARIANTS),
                        help="which models --retune attacks (default: none, the five modes, BackdoorBench's built-ins "
                             "and the clean reference; 'all' adds the ablation variants)")
    run = start(parser, argv)
    args, protocol, root = run.args, run.protocol, run.root
    out = args.out or run.results / "results.csv"
    data_root = link_data(root, args.data) if args.retune or args.qra else root / "data"
    probing = probing_of(protocol, data_root, out.parent)
    retune = Retune(args.retune, probing, args.reference,
                    None if "all" in args.retune_variants else set(args.retune_variants))
    qra = Qra(args.qra, probing, None if "all" in args.qra_variants else set(args.qra_variants), args.qra_max_asr)
    names = args.records or [p.name for p in finished_records(root)]
    return write_results(protocol, root, args.data, out, names, retune, qra)


if __name__ == "__main__":
    main()
