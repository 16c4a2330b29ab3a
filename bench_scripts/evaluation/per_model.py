"""One model of a record, as the grid's evaluation jobs see it: measured (the result kept beside the model),
retuned (the retuning attack, ``fst_plugin.probes.retune``) and attacked with QRA (``fst_plugin.probes.qra``),
each run written last so that its presence marks the job finished. evaluate.py reads what they leave."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bench_scripts.common import load_defended, load_model, log_timing
from bench_scripts.evaluation.measures import TestSets, measure
from bench_scripts.jobs.job import Job, Resources
from fst_plugin.errors import ConfigError, RecordError
from fst_plugin.probes.config import CLEAN_REFERENCE, NO_DEFENSE, OWN_SUBSET, QraConfig, RetuneConfig
from fst_plugin.probes.qra import run_qra
from fst_plugin.probes.retune import run_retune
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import DefenseLayout, attack_result

log = logging.getLogger("bench.evaluate")
EVAL_VERSION = 2


def cached_measure(path: Path, loader, sets: TestSets, device: str, cache: Path | None = None) -> dict[str, float]:
    """``measure`` with the result kept in ``bench_eval.json`` next to ``path`` (or in ``cache``; invalidated
    when ``path`` changes)."""
    cache = cache or path.parent / "bench_eval.json"
    stat = path.stat()
    key = {"size": stat.st_size, "mtime": stat.st_mtime, "version": EVAL_VERSION, "n_clean": len(sets.clean_y),
           "n_bd": len(sets.bd_label)}
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return data["metrics"]
    metrics = measure(loader(), sets, device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1))
    return metrics


@dataclass(frozen=True)
class Probing:
    """How every probe of a run is run: the data root (``<cache>/<protocol>/data``), the device, the clean fraction
    drawn for a model without an index file (the defenses'), where the timings go, and which clean subset the
    probes take (the protocol's ``probe_subset``: their ``--clean_subset``)."""

    data_root: Path
    device: str
    ratio: float
    results: Path
    clean_subset: str = OWN_SUBSET

    def job(self, work: "RetuneModel | QraModel", kind: str, output: Path, inputs: tuple[Path, ...],
            resources: Resources, needs: tuple[str, ...]) -> Job:
        return Job(f"{work.record_dir.name}/{work.variant}/{kind}", kind, work, inputs=inputs, outputs=(output,),
                   needs=needs, resources=resources)


@dataclass(frozen=True)
class RetuneModel:
    """The retuning attack on one model of one record (``variant``: a defense, ``none`` or the clean reference,
    which takes ``reference``), as a job's work: writes ``defense/<variant>/retune/retune_result.pt`` last."""

    record_dir: Path
    variant: str
    probing: Probing
    reference: Optional[Path] = None

    def __call__(self) -> str:
        layout = DefenseLayout.of(self.record_dir, self.variant)
        if self.variant not in (NO_DEFENSE, CLEAN_REFERENCE) and not layout.finished:
            return "no model to retune (its defense left none)"
        bd_train = load_attack_record(self.record_dir, check_files=False).bd_train
        if bd_train is None or not bd_train.images:
            return "a clean record: nothing to retune with"
        started, how = time.time(), self.probing
        result = run_retune(RetuneConfig(record=self.record_dir, defense=self.variant, reference_record=self.reference,
                                         dataset_path=how.data_root, device=how.device, ratio=how.ratio,
                                         clean_subset=how.clean_subset))
        log_timing(how.results, f"retune {self.variant} {self.record_dir.name}", time.time() - started,
                   retune_wall_s=round(result.wall_time_s, 1))
        return ""

    def job(self, resources: Resources, needs: tuple[str, ...] = ()) -> Job:
        return self.probing.job(self, "retune", DefenseLayout.of(self.record_dir, self.variant).retune_result,
                                (attack_result(self.record_dir),), resources, needs)


class QraNotRun(Exception):
    """QRA cannot attack this model with the bench's settings (its record is not all-to-one, or holds fewer poisoned
    images than QRA's set needs): the model's QRA columns stay empty, and neither the evaluator nor the grid fails."""


def attack_with_qra(record_dir: Path, variant: str, reference: Path, how: Probing) -> dict[str, Any]:
    """QRA on one retuned model against the clean ``reference``; its metrics (``run_info.json`` written last).
    ``QraNotRun`` when the record cannot give QRA its data; every other failure propagates."""
    started = time.time()
    config = QraConfig(record=record_dir, defense=variant, reference_record=reference, dataset_path=how.data_root,
                       device=how.device, ratio=how.ratio, clean_subset=how.clean_subset)
    try:
        result = run_qra(config)
    except (ConfigError, RecordError) as error:   # raised by its checks, before it trains anything
        raise QraNotRun(str(error)) from error
    log_timing(how.results, f"qra {variant} {record_dir.name}", time.time() - started,
               qra_wall_s=round(result.wall_time_s, 1))
    return result.metrics


@dataclass(frozen=True)
class QraModel:
    """QRA on one model of one record, as a job's work, after its retune; with ``max_asr``, only on a model its
    defense purified to that ASR (measured as the results table measures it, on the full test sets of ``data_dir``)."""

    record_dir: Path
    variant: str
    probing: Probing
    reference: Path
    data_dir: Path
    max_asr: Optional[float] = None

    def __call__(self) -> str:
        if not DefenseLayout.of(self.record_dir, self.variant).retune_result.is_file():
            return "no retuned model to attack"
        if self.max_asr is not None:
            sets = TestSets(self.record_dir, self.data_dir)
            asr = model_metrics(self.record_dir, self.variant, sets, self.probing.device)["test_asr"]
            if asr > self.max_asr:
                return f"not purified: ASR {asr:.3f} > {self.max_asr:g}"
        try:
            attack_with_qra(self.record_dir, self.variant, self.reference, self.probing)
        except QraNotRun as reason:
            return f"not run: {reason}"
        return ""

    def job(self, resources: Resources, needs: tuple[str, ...] = ()) -> Job:
        return self.probing.job(self, "qra", DefenseLayout.of(self.record_dir, self.variant).qra_result,
                                (attack_result(self.record_dir), attack_result(self.reference)),
                                resources, needs)


def model_metrics(record_dir: Path, variant: str, sets: TestSets, device: str) -> dict[str, float]:
    """C-Acc, ASR, RA, ... of the record's model ``variant`` (``none``: the attacked model), cached beside it."""
    if variant == NO_DEFENSE:
        rec = sets.record
        return cached_measure(attack_result(record_dir),
                              lambda: load_model(rec.model_name, rec.num_classes, rec.state_dict), sets, device)
    path = DefenseLayout.of(record_dir, variant).result
    return cached_measure(path, lambda: load_defended(path), sets, device)
