"""Measuring a model on a record's test sets: C-Acc / ASR / RA through the package's one evaluator
(``fst_plugin.core.metrics``), the penultimate features captured on the same forward passes, and where the
poisoned images' features sit relative to the clean classes."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from fst_plugin.attacks import to_tensor_batch
from fst_plugin.core import BackdoorMetrics, find_head
from fst_plugin.core.metrics import evaluate_backdoor_tensors
from fst_plugin.data.arrays import load_split_arrays
from fst_plugin.data.tensor_transforms import normalize_for
from fst_plugin.record import AttackRecord, load_attack_record

from bench_scripts.common import DATASET, TARGET, bench_info

BATCH_SIZE = 500


class TestSets:
    """A record's clean and poisoned test sets as arrays, read once per record."""

    def __init__(self, record_dir: Path, data_dir: Path) -> None:
        self.record = load_attack_record(record_dir)
        self.info = bench_info(self.record)
        images, labels = load_split_arrays(DATASET, data_dir, train=False)
        keep = np.asarray(self.info.get("test_indices") or np.arange(len(labels)))
        self.clean_x, self.clean_y = images[keep], labels[keep]
        self.bd_x, self.bd_label, self.bd_orig = read_bd_test(self.record)


def read_bd_test(record: AttackRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The record's poisoned test images (uint8 NHWC), backdoor labels and original labels."""
    images = []
    for entry in record.bd_test.images:
        with Image.open(entry.path) as img:
            images.append(np.asarray(img.convert("RGB")))
    return (np.stack(images), np.array([e.bd_label for e in record.bd_test.images]),
            np.array([e.original_label for e in record.bd_test.images]))


def model_input(images: torch.Tensor) -> torch.Tensor:
    """A uint8 (N, C, H, W) batch as the model reads it: float, normalised with the dataset's mean and std."""
    return normalize_for(images, DATASET)


@contextmanager
def penultimate_features(model: nn.Module, num_classes: int = 10) -> Iterator[list[torch.Tensor]]:
    """Collect the head's input (the penultimate features) of every forward pass inside the block, batch by
    batch, as float32 on the CPU; a hook on the head, so any architecture works."""
    head = find_head(model, num_classes).modules[-1]
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0].detach().float().cpu()))
    try:
        yield captured
    finally:
        hook.remove()


def measure_with_features(model: nn.Module, clean: tuple[np.ndarray, np.ndarray],
                          poisoned: tuple[np.ndarray, np.ndarray, np.ndarray], device: str = "cpu",
                          num_classes: int = 10) -> tuple[BackdoorMetrics, np.ndarray, np.ndarray]:
    """C-Acc on ``clean`` = (images, labels), ASR and RA on ``poisoned`` = (images, backdoor labels, original
    labels), and the penultimate features of both sets (in their order), from one pass over the images."""
    model.eval().to(device)
    as_tensors = (lambda images, *labels: (to_tensor_batch(images), *(torch.as_tensor(y) for y in labels)))
    with penultimate_features(model, num_classes) as captured:
        metrics = evaluate_backdoor_tensors(model, as_tensors(*clean), as_tensors(*poisoned), model_input,
                                            BATCH_SIZE, device)
    features = torch.cat(captured).numpy()
    return metrics, features[:len(clean[1])], features[len(clean[1]):]


@torch.no_grad()
def features_of(model: nn.Module, images: np.ndarray, num_classes: int = 10, device: str = "cpu") -> np.ndarray:
    """The penultimate features of ``images`` (uint8 NHWC), for probes that need no labels."""
    model.eval().to(device)
    data = to_tensor_batch(images)
    with penultimate_features(model, num_classes) as captured:
        for start in range(0, len(data), BATCH_SIZE):
            model(model_input(data[start:start + BATCH_SIZE].to(device)))
    return torch.cat(captured).numpy()


def measure(model: nn.Module, sets: TestSets, device: str) -> dict[str, float]:
    """evaluate.py's numbers of one model: C-Acc, ASR, RA and the feature-shift measures."""
    metrics, clean_feat, bd_feat = measure_with_features(
        model, (sets.clean_x, sets.clean_y), (sets.bd_x, sets.bd_label, sets.bd_orig), device)
    out = {"test_acc": metrics.test_acc, "test_asr": metrics.test_asr, "test_ra": metrics.test_ra}
    out.update(feature_shift_measures(clean_feat, sets.clean_y, bd_feat, sets.bd_orig, TARGET))
    return out


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

    classes = np.unique(clean_labels)
    centroids = unit_rows(np.stack([clean_features[clean_labels == c].mean(0) for c in classes]))
    nearest = nearest_class(poisoned_features, centroids, classes)

    target_feats = clean_features[clean_labels == target]
    n = min(len(target_feats), len(poisoned_features))
    rng = np.random.default_rng(seed)
    a = target_feats[rng.choice(len(target_feats), n, replace=False)]
    b = poisoned_features[rng.choice(len(poisoned_features), n, replace=False)]
    silhouette = silhouette_score(np.concatenate([a, b]), np.r_[np.zeros(n), np.ones(n)], metric="cosine")
    return {"feat_target_share": float((nearest == target).mean()),
            "feat_true_share": float((nearest == poisoned_true_labels).mean()),
            "sep_silhouette": float(silhouette)}


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (cosine nearest-centroid comparisons)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_class(features: np.ndarray, centroids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The class whose (unit) centroid is nearest by cosine to each feature row."""
    return classes[(unit_rows(features) @ centroids.T).argmax(1)]
