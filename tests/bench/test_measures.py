"""The benchmark's feature-shift numbers (bench_scripts.evaluation.measures.feature_shift_measures) on features whose answer is
known: poisoned features inside the target cluster, then moved to their own classes."""

import numpy as np
import pytest

pytest.importorskip("sklearn")

from bench_scripts.evaluation.measures import feature_shift_measures


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


def test_the_retune_table_shows_the_qra_columns_only_where_a_qra_result_exists():
    """make_table's retune section: QRA columns (in %) appear once one model has them, NaN for the others."""
    import pandas as pd

    from bench_scripts.evaluation.evaluate import QRA_COLUMNS
    from bench_scripts.report.probes import QRA_LABELS, retune_section

    assert tuple(QRA_LABELS) == QRA_COLUMNS  # one owner of the CSV columns (evaluate), the table labels follow
    row = dict(record="r", attack="badnets", trigger_key=None, rate=0.01, test_acc=0.7, test_asr=0.01, test_ra=0.6,
               retune_acc=0.7, retune_asr=0.03, retune_ra=0.6)
    df = pd.DataFrame([{**row, "variant": "fst", "qra_asr": 0.2, "qra_clean_target": 0.15, "qra_ref_asr": 0.05},
                       {**row, "variant": "lp", "qra_asr": np.nan, "qra_clean_target": np.nan, "qra_ref_asr": np.nan}])
    text = retune_section(df)
    fst_line = next(line for line in text.splitlines() if line.startswith("| r ") and " fst " in line)
    assert [cell.strip() for cell in fst_line.split("|")[-4:-1]] == ["20", "15", "5"]
    assert [cell.strip() for cell in next(line for line in text.splitlines() if " lp " in line).split("|")[-4:-1]] \
        == ["nan"] * 3
    assert "QRA" not in retune_section(df.drop(columns=list(QRA_COLUMNS)))


def test_measure_with_features_is_the_core_evaluator_plus_the_heads_input_in_order(monkeypatch):
    """evaluate.py's numbers come from fst_plugin.core.metrics on in-memory test sets: the same C-Acc / ASR / RA
    as a plain forward pass, and features that the head maps back to the same logits, image by image, over
    several batches."""
    import torch

    from bench_scripts.evaluation import measures
    from fst_plugin.attacks import to_tensor_batch
    from fst_plugin.core import find_head
    from fst_plugin.models import build_model

    monkeypatch.setattr(measures, "BATCH_SIZE", 8)  # three clean and three poisoned batches, the last ones short
    torch.manual_seed(0)
    model = build_model("preactresnet_small", 10).eval()
    rng = np.random.default_rng(0)
    clean_x, clean_y = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 23)
    bd_x, bd_orig = rng.integers(0, 256, (19, 32, 32, 3), dtype=np.uint8), rng.integers(1, 10, 19)
    with torch.no_grad():
        clean_logits = model(measures.model_input(to_tensor_batch(clean_x)))
        bd_logits = model(measures.model_input(to_tensor_batch(bd_x)))
    bd_label = bd_logits.argmax(1).numpy().copy()
    bd_label[::2] = (bd_label[::2] + 1) % 10  # half the poisoned images "hit" the backdoor label
    metrics, clean_feat, bd_feat = measures.measure_with_features(model, (clean_x, clean_y), (bd_x, bd_label, bd_orig))
    assert metrics.test_acc == float((clean_logits.argmax(1).numpy() == clean_y).mean())
    assert metrics.test_asr == float((bd_logits.argmax(1).numpy() == bd_label).mean()) == 9 / 19
    assert metrics.test_ra == float((bd_logits.argmax(1).numpy() == bd_orig).mean())
    head = find_head(model, 10).modules[-1]
    with torch.no_grad():
        assert torch.allclose(head(torch.from_numpy(clean_feat)), clean_logits, atol=1e-5)
        assert torch.allclose(head(torch.from_numpy(bd_feat)), bd_logits, atol=1e-5)
