"""What every benchmark script shares: data arrays, triggers by name, the cache layout, running one of the
package's defenses (with the optional per-epoch test subset), penultimate features and where poisoned features sit.

Cache layout (outside git): ``<cache>/<protocol>/record/<attack>[-<key>]_<rate>_s<seed>/`` are BackdoorBench records
(``attack_result.pt`` + PNGs, ``defense/<name>/defense_result.pt`` after the defenses), and
``<cache>/<protocol>/data/cifar10`` is a link to the user's data folder, so the records' relative
``./data/cifar10`` and ``./record/...`` paths resolve from ``<cache>/<protocol>`` as from a BackdoorBench root.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from fst_plugin.attacks import (
    Trigger,
    badnets_trigger,
    blend_pattern,
    blended_trigger,
    sig_trigger,
    to_tensor_batch,
    wanet_trigger,
)
from fst_plugin import api
from fst_plugin.adapter.defenses import DefenseResult
from fst_plugin.core import find_head
from fst_plugin.data import load_clean_split
from fst_plugin.data.tensor_transforms import normalize_for
from fst_plugin.models import build_model
from fst_plugin.models.factory import load_weights
from fst_plugin.record import AttackRecord, load_untrusted

log = logging.getLogger("bench")
DATASET = "cifar10"
TARGET = 0
ATTACKS = ("badnets", "blended", "sig", "wanet")
CLEAN_LABEL = {"sig"}                       # poison target-class images and keep their labels
METHODS = ("lp", "vanilla-ft", "fe-tuning", "ft-init", "fst")
REPO = Path(__file__).resolve().parent.parent


def setup(threads: Optional[int] = None) -> None:
    """Logging, and torch threads = the machine's cores (2 here) unless told otherwise."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads or os.cpu_count() or 1)


def load_arrays(data_dir: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """A clean split as (uint8 NHWC images, int64 labels), in the order the defenses' loader reads it."""
    ds = load_clean_split(DATASET, data_dir, train)
    if hasattr(ds, "data") and isinstance(ds.data, np.ndarray):
        return ds.data, np.asarray(ds.targets, dtype=np.int64)
    images = np.stack([np.asarray(ds[i][0].convert("RGB")) for i in range(len(ds))])
    return images, np.asarray(ds.targets, dtype=np.int64)


def add_protocol_args(parser: argparse.ArgumentParser, data: bool = True, results: bool = True) -> None:
    """The arguments every bench script shares: ``--protocol NAME``, ``--set KEY=VALUE ...`` (overrides of
    protocol fields, e.g. to try the gpu protocol on a tiny subset on a CPU: ``--set device=cpu epochs=1
    train_per_class=20 test_per_class=5``), ``--data`` (when the script reads images), ``--cache`` and
    ``--results`` (when the script writes results)."""
    parser.add_argument("--protocol", default="cpu", help="cpu, gpu or tiny (bench_scripts/protocols.py)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override protocol fields (values parsed as YAML)")
    if data:
        parser.add_argument("--data", type=Path, required=True,
                            help="CIFAR-10 folder (cifar-10-batches-py or train/ test/)")
    parser.add_argument("--cache", type=Path, default=REPO / "bench_cache", help="where records are kept (not in git)")
    if results:
        parser.add_argument("--results", type=Path, help="where results go (default bench_results/<protocol>)")


def protocol_from_args(args: argparse.Namespace, **more: Any) -> Any:
    import yaml

    from bench_scripts.protocols import get_protocol

    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE items, got {item!r}")
        parsed = yaml.safe_load(value)
        overrides[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    overrides.update({k: v for k, v in more.items() if v is not None})
    return get_protocol(args.protocol, **overrides)


def record_name(attack: str, rate: float, seed: int, key: Optional[str] = None) -> str:
    """``<attack>_<rate>_s<seed>``; a Blended record keyed by an image file is ``blended-<file stem>_...`` so it
    never collides with (or is served from the cache of) the seeded-noise record."""
    return f"{attack}{'-' + key if key else ''}_{rate:g}_s{seed}"


def trigger_key(attack: str, pattern_image: Optional[str]) -> Optional[str]:
    """The name of Blended's key image when one is given (its file stem), else None (seeded noise / no key)."""
    return Path(pattern_image).stem if attack == "blended" and pattern_image else None


def protocol_root(cache: Path, protocol: str) -> Path:
    return Path(cache) / protocol


def link_data(root: Path, data_dir: Path) -> Path:
    """``root/data/cifar10`` → the user's data folder (whatever it is called); returns ``root/data``."""
    link = root / "data" / DATASET
    link.parent.mkdir(parents=True, exist_ok=True)
    target = Path(data_dir).resolve()
    if link.is_symlink() and link.resolve() != target:
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    return link.parent


def make_trigger(attack: str, seed: int, pattern_image: Optional[str] = None, blend_alpha: float = 0.2) -> Trigger:
    """The attack's trigger; Blended's key image and WaNet's warp are drawn from ``seed``."""
    if attack == "badnets":
        return badnets_trigger(3)
    if attack == "blended":
        return blended_trigger(blend_pattern(32, 32, 3, seed=seed, image_path=pattern_image), blend_alpha)
    if attack == "sig":
        return sig_trigger(40.0, 6.0)
    if attack == "wanet":
        return wanet_trigger(32, 32, k=4, strength=0.5, seed=seed)
    raise SystemExit(f"unknown attack {attack!r}; use one of {', '.join(ATTACKS)}")


def bench_info(record: AttackRecord) -> dict[str, Any]:
    """The benchmark's own metadata stored in the record (attack, rate, seed, test indices, timings)."""
    return json.loads(record.extra.get("bench_json", "{}"))


def log_timing(results_dir: Path, step: str, wall_s: float, **details: Any) -> None:
    """Append one line to ``results_dir/timings.jsonl``: the step, its wall time and the exact command."""
    results_dir.mkdir(parents=True, exist_ok=True)
    row = {"step": step, "wall_s": round(wall_s, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join(["python -m bench_scripts." + Path(sys.argv[0]).stem] + sys.argv[1:]), **details}
    with open(results_dir / "timings.jsonl", "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


# ----- running the package's defenses -----------------------------------------------------------------
def run_defense(record_dir: Path, method: str, protocol: Any, data_root: Path, save_name: Optional[str] = None,
                extra: Optional[dict[str, Any]] = None, seed: int = 0,
                eval_subset: Optional[int] = None) -> DefenseResult:
    """Run one defense on one record with the protocol's settings (``extra``: more config overrides).

    ``save_name`` writes to ``defense/<save_name>/`` (ablation variants must not overwrite the grid's results);
    ``eval_subset`` (default: the protocol's) computes the per-epoch curve on a seeded subset of the clean and
    poisoned test sets (that evaluation otherwise dominates CPU time; final numbers come from evaluate.py on the
    full sets)."""
    overrides: dict[str, Any] = dict(
        dataset_path=str(data_root), dataset=DATASET, device=protocol.device, num_workers=protocol.num_workers,
        epochs=protocol.defense_epochs, ratio=protocol.defense_ratio, lr=protocol.defense_lr,
        batch_size=protocol.defense_batch_size, random_seed=seed, amp=protocol.amp, save_name=save_name,
        eval_subset=eval_subset or protocol.eval_subset)
    if method == "fst":
        overrides["alpha"] = protocol.alpha
    return api.run_defense(method, record_dir, **{**overrides, **(extra or {})})


# ----- evaluation helpers ----------------------------------------------------------------------------
def load_model(model_name: str, num_classes: int, state_dict: dict) -> nn.Module:
    model = build_model(model_name, num_classes)
    load_weights(model, state_dict, model_name)
    return model.eval()


def load_defended(path: Path) -> nn.Module:
    """A ``defense_result.pt`` (anyone's: ours or BackdoorBench's built-ins) as an eval-mode model."""
    data = load_untrusted(path, "defense result")
    return load_model(data["model_name"], int(data["num_classes"]), data["model"])


def read_bd_test(record: AttackRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The record's poisoned test images (uint8 NHWC), backdoor labels and original labels."""
    images = []
    for entry in record.bd_test.images:
        with Image.open(entry.path) as img:
            images.append(np.asarray(img.convert("RGB")))
    return (np.stack(images), np.array([e.bd_label for e in record.bd_test.images]),
            np.array([e.original_label for e in record.bd_test.images]))


@torch.no_grad()
def logits_and_features(model: nn.Module, images: np.ndarray, num_classes: int = 10, device: str = "cpu",
                        batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Logits and penultimate features (the head's input, captured by a hook, so any architecture works)."""
    head = find_head(model, num_classes).modules[-1]
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0].detach().float().cpu()))
    model.eval().to(device)
    data = to_tensor_batch(images)
    logits = []
    try:
        for i in range(0, len(data), batch_size):
            logits.append(model(normalize_for(data[i:i + batch_size].to(device), DATASET)).float().cpu())
    finally:
        hook.remove()
    return torch.cat(logits).numpy(), torch.cat(captured).numpy()


def feature_shift_measures(clean_features: np.ndarray, clean_labels: np.ndarray, poisoned_features: np.ndarray,
                           poisoned_true_labels: np.ndarray, target: int = TARGET, seed: int = 0) -> dict[str, float]:
    """Where the poisoned images' penultimate features sit relative to the clean classes (the paper's Figure 3
    question, as numbers that do not depend on the head):

    * ``feat_target_share``: share of poisoned images whose feature is nearest (cosine) to the target class's
      centroid of clean test features — a head-free "feature-level ASR". High while the trigger maps into the
      target cluster; low once the feature extractor has moved the poisoned features out of it.
    * ``feat_true_share``: share nearest to the centroid of their own true class (a feature-level RA).
    * ``sep_silhouette``: cosine silhouette of target-class clean features vs poisoned features (> 0: two
      distinct clusters).

    A linear probe separating target-class clean from poisoned features was tried first and dropped: it scored
    ≈ 0.98 for every model, because the poisoned images come from the nine other classes and stay
    distinguishable from class-``target`` images whatever the defense does.
    """
    from sklearn.metrics import silhouette_score

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    classes = np.unique(clean_labels)
    centroids = unit(np.stack([clean_features[clean_labels == c].mean(0) for c in classes]))
    nearest = classes[(unit(poisoned_features) @ centroids.T).argmax(1)]

    target_feats = clean_features[clean_labels == target]
    n = min(len(target_feats), len(poisoned_features))
    rng = np.random.default_rng(seed)
    a = target_feats[rng.choice(len(target_feats), n, replace=False)]
    b = poisoned_features[rng.choice(len(poisoned_features), n, replace=False)]
    silhouette = silhouette_score(np.concatenate([a, b]), np.r_[np.zeros(n), np.ones(n)], metric="cosine")
    return {"feat_target_share": float((nearest == target).mean()),
            "feat_true_share": float((nearest == poisoned_true_labels).mean()),
            "sep_silhouette": float(silhouette)}
