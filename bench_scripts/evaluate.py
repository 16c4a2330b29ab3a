"""The one evaluator: every model of every record, measured the same way on the same test sets.

    python -m bench_scripts.evaluate --protocol cpu --data data/cifar10 [--records NAME ...] [--out results.csv]

For each record: the backdoored model ("none") and every ``defense/<name>/defense_result.pt`` (ours, the
ablation variants, BackdoorBench's built-ins alike) are loaded (safely, fst_plugin.record.load_untrusted) and
evaluated on the record's clean test images (the whole CIFAR-10 test split unless the protocol subsets it)
and the record's poisoned test images (its bd_test PNGs: every non-target test image with the trigger):
C-Acc, ASR, RA, DER against "none", and where the poisoned images' penultimate features sit: the share nearest
to the target class's clean-feature centroid (a head-free feature-level ASR), the share nearest to their own
class's, and the silhouette of target-class clean vs poisoned features (common.feature_shift_measures). The defense wall time comes from the
defense's run_info.json. Per-model results are cached next to the model (bench_eval.json, keyed by the
file's size and mtime), so re-running after adding defenses only evaluates the new ones.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from bench_scripts.common import (
    add_protocol_args,
    protocol_from_args,
    REPO,
    TARGET,
    bench_info,
    load_arrays,
    load_defended,
    load_model,
    log_timing,
    logits_and_features,
    protocol_root,
    read_bd_test,
    feature_shift_measures,
    setup,
)
from fst_plugin.core import defense_effectiveness_rating
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import DefenseLayout, defense_results
from fst_plugin.runtime import resolve_device

log = logging.getLogger("bench.evaluate")
EVAL_VERSION = 2


class TestSets:
    """A record's clean and poisoned test sets as arrays, read once per record."""

    def __init__(self, record_dir: Path, data_dir: Path) -> None:
        self.record = load_attack_record(record_dir)
        self.info = bench_info(self.record)
        images, labels = load_arrays(data_dir, train=False)
        keep = np.asarray(self.info.get("test_indices") or np.arange(len(labels)))
        self.clean_x, self.clean_y = images[keep], labels[keep]
        self.bd_x, self.bd_label, self.bd_orig = read_bd_test(self.record)


def measure(model: nn.Module, sets: TestSets, device: str) -> dict[str, float]:
    clean_logits, clean_feat = logits_and_features(model, sets.clean_x, device=device)
    bd_logits, bd_feat = logits_and_features(model, sets.bd_x, device=device)
    clean_pred, bd_pred = clean_logits.argmax(1), bd_logits.argmax(1)
    out = {"test_acc": float((clean_pred == sets.clean_y).mean()),
           "test_asr": float((bd_pred == sets.bd_label).mean()),
           "test_ra": float((bd_pred == sets.bd_orig).mean())}
    out.update(feature_shift_measures(clean_feat, sets.clean_y, bd_feat, sets.bd_orig, TARGET))
    return out


def cached_measure(path: Path, loader, sets: TestSets, device: str) -> dict[str, float]:
    """``measure`` with the result kept in ``bench_eval.json`` next to ``path`` (invalidated when it changes)."""
    cache = path.parent / "bench_eval.json"
    stat = path.stat()
    key = {"size": stat.st_size, "mtime": stat.st_mtime, "version": EVAL_VERSION, "n_clean": len(sets.clean_y),
           "n_bd": len(sets.bd_label)}
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return data["metrics"]
    metrics = measure(loader(), sets, device)
    cache.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1))
    return metrics


def variant_columns(defense_dir: Path) -> dict[str, Any]:
    """Method, alpha, tuning-set size, projection, epochs and wall time from the defense's run_info.json."""
    layout = DefenseLayout(defense_dir, defense_dir.name)
    info_path = layout.run_info
    if not info_path.is_file():  # a BackdoorBench built-in
        return {"method": defense_dir.name, "source": "backdoorbench"}
    info = json.loads(info_path.read_text())
    cfg = info.get("config", {})
    index = cfg.get("index")
    n_clean = (sum(1 for _ in open(index)) if index and Path(index).is_file()
               else layout.index.read_text().count("\n") if layout.index.is_file() else None)
    return {"method": info.get("method", defense_dir.name), "source": "fst_plugin", "alpha": cfg.get("alpha"),
            "n_clean": n_clean, "projection": {None: "auto", True: "on", False: "off"}.get(cfg.get("projection")),
            "projection_bound": cfg.get("projection_bound", "equal"),
            "epochs": cfg.get("epochs"), "defense_wall_s": round(float(info.get("wall_time_s", float("nan"))), 1)}


def evaluate_record(record_dir: Path, data_dir: Path, device: str) -> list[dict[str, Any]]:
    sets = TestSets(record_dir, data_dir)
    rec, info = sets.record, sets.info
    base = {"record": record_dir.name, "attack": info.get("attack"), "trigger_key": info.get("trigger_key"),
            "rate": info.get("rate"), "seed": info.get("seed"), "model": rec.model_name}
    before = cached_measure(record_dir / "attack_result.pt",
                            lambda: load_model(rec.model_name, rec.num_classes, rec.state_dict), sets, device)
    rows = [{**base, "variant": "none", "method": "none", "source": "attack", **before, "der": float("nan"),
             "defense_wall_s": 0.0, "attack_train_s": info.get("train_s")}]
    for path in defense_results(record_dir):
        metrics = cached_measure(path, lambda p=path: load_defended(p), sets, device)
        der = defense_effectiveness_rating(before["test_acc"], before["test_asr"], metrics["test_acc"], metrics["test_asr"])
        rows.append({**base, "variant": path.parent.name, **variant_columns(path.parent), **metrics, "der": der})
        log.info("%s / %s: C-Acc %.2f ASR %.2f RA %.2f", record_dir.name, path.parent.name,
                 100 * metrics["test_acc"], 100 * metrics["test_asr"], 100 * metrics["test_ra"])
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser, results=False)
    parser.add_argument("--records", nargs="*")
    parser.add_argument("--out", type=Path, help="results CSV (default bench_results/<protocol>/results.csv)")
    args = parser.parse_args(argv)
    setup()
    protocol = protocol_from_args(args)
    root = protocol_root(args.cache, protocol.name)
    names = args.records or sorted(p.name for p in (root / "record").glob("*") if (p / "attack_result.pt").is_file())
    device = resolve_device(protocol.device if protocol.device != "cuda" else "auto")
    started = time.time()
    rows = [row for name in names for row in evaluate_record(root / "record" / name, args.data, device)]
    df = pd.DataFrame(rows)
    for col in ("alpha", "n_clean", "projection", "projection_bound", "epochs"):
        if col not in df:
            df[col] = np.nan
    df.insert(0, "protocol", protocol.name)
    out = args.out or REPO / "bench_results" / protocol.name / "results.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    for col in ("test_acc", "test_asr", "test_ra", "der", "feat_target_share", "feat_true_share", "sep_silhouette"):
        df[col] = df[col].astype(float).round(5)
    df.to_csv(out, index=False)
    log_timing(out.parent, "evaluate", time.time() - started, models=len(df))
    log.info("wrote %s (%d rows)", out, len(df))
    return df


if __name__ == "__main__":
    main()
