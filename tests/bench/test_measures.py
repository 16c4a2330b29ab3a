"""The benchmark's feature-shift numbers (bench_scripts.common.feature_shift_measures) on features whose answer is
known: poisoned features inside the target cluster, then moved to their own classes."""

import numpy as np
import pytest

pytest.importorskip("sklearn")

from bench_scripts.common import feature_shift_measures


def _clusters(seed: int = 0, classes: int = 4, per_class: int = 50, dim: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 5
    labels = np.repeat(np.arange(classes), per_class)
    feats = centres[labels] + rng.normal(size=(len(labels), dim))
    return rng, centres, feats, labels


def test_poisoned_features_in_the_target_cluster_count_as_target():
    rng, centres, clean, labels = _clusters()
    true = rng.integers(1, 4, size=60)
    poisoned = centres[0] + rng.normal(size=(60, 16))          # a working backdoor: all map to class 0
    m = feature_shift_measures(clean, labels, poisoned, true, target=0)
    assert m["feat_target_share"] == 1.0
    assert m["feat_true_share"] == 0.0
    assert m["sep_silhouette"] < 0.1                              # mixed with the target class's clean features


def test_poisoned_features_back_at_their_own_classes_count_as_true():
    rng, centres, clean, labels = _clusters()
    true = rng.integers(1, 4, size=60)
    poisoned = centres[true] + rng.normal(size=(60, 16))        # purified: the trigger no longer moves features
    m = feature_shift_measures(clean, labels, poisoned, true, target=0)
    assert m["feat_target_share"] == 0.0
    assert m["feat_true_share"] == 1.0
    assert m["sep_silhouette"] > 0.5                              # two distinct groups
