"""Feature-shift diagnostics (the paper's Figure 3): t-SNE of penultimate features of target-class clean test
images vs poisoned test images, for the backdoored model and after each defense.

    python -m bench_scripts.diagnostics --protocol cpu --data data/cifar10 --record badnets_0.01_s0

Writes bench_results/<protocol>/figures/tsne_<record>.png. Each panel's title gives the model's ASR on the
plotted poisoned images and the share of them whose feature is nearest to the target class's clean-feature
centroid (evaluate.py's ``feat_target_share``, here with centroids from ``points`` clean images per class).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from bench_scripts.common import (
    METHODS,
    REPO,
    TARGET,
    add_protocol_args,
    feature_shift_measures,
    load_arrays,
    load_defended,
    load_model,
    log_timing,
    logits_and_features,
    protocol_from_args,
    protocol_root,
    setup,
)
from bench_scripts.evaluate import TestSets
from fst_plugin.core import find_head
from fst_plugin.io_utils import atomic_write_text
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import DefenseLayout

log = logging.getLogger("bench.diagnostics")


def tsne_figure(record_dir: Path, data_dir: Path, points: int, out: Path, methods: tuple[str, ...] = METHODS,
                seed: int = 0) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    sets = TestSets(record_dir, data_dir)
    rng = np.random.default_rng(seed)
    # `points` clean images of every class: the target class's are plotted, all give the class centroids
    clean_idx = np.concatenate([rng.choice(pool, size=min(points, len(pool)), replace=False)
                                for pool in (np.flatnonzero(sets.clean_y == c) for c in np.unique(sets.clean_y))])
    bd_idx = rng.choice(len(sets.bd_label), size=min(points, len(sets.bd_label)), replace=False)
    rec = sets.record
    models = [("no defense", lambda: load_model(rec.model_name, rec.num_classes, rec.state_dict))]
    models += [(m, lambda p=DefenseLayout.of(record_dir, m).result: load_defended(p))
               for m in methods if DefenseLayout.of(record_dir, m).finished]
    cols = 3
    rows = int(np.ceil(len(models) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    for ax, (name, build) in zip(axes.flat, models):
        model = build()
        _, f_all = logits_and_features(model, sets.clean_x[clean_idx])
        bd_logits, f_bd = logits_and_features(model, sets.bd_x[bd_idx])
        shift = feature_shift_measures(f_all, sets.clean_y[clean_idx], f_bd, sets.bd_orig[bd_idx], TARGET, seed)
        f_clean = f_all[sets.clean_y[clean_idx] == TARGET]
        asr = float((bd_logits.argmax(1) == sets.bd_label[bd_idx]).mean())
        feats = np.concatenate([f_clean, f_bd])
        perplexity = float(min(30, max(2, (len(feats) - 1) // 3)))
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
        n = len(f_clean)
        ax.scatter(emb[:n, 0], emb[:n, 1], s=4, c="tab:blue", label=f"clean, class {TARGET}")
        ax.scatter(emb[n:, 0], emb[n:, 1], s=4, c="tab:red", label="poisoned")
        ax.set_title(f"{name}: ASR {100 * asr:.1f}%, feat→target {100 * shift['feat_target_share']:.0f}%", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(loc="best", fontsize=8, markerscale=3)
    fig.suptitle(f"{record_dir.name}: penultimate features (t-SNE)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def fresh_head_probe(record_dir: Path, data_dir: Path, seed: int = 0) -> dict[str, float]:
    """How good a brand-new linear head on the backdoored model's frozen features can be, trained only on the
    defense's clean tuning set (FST's ``log/index.txt``; C of the logistic regression chosen by 5-fold
    cross-validation on that set, never on the test set), plus the scales that set FST's penalty strength:
    ``‖W₀‖`` and the mean feature norm. If the fresh head is close to the original C-Acc, the features can carry
    a re-initialised head and a large C-Acc drop comes from the tuning dynamics, not from the features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    index_file = DefenseLayout.of(record_dir, "fst").index
    if not index_file.is_file():
        raise SystemExit(f"{index_file} is missing: run the fst defense on {record_dir.name} first")
    rec = load_attack_record(record_dir)
    model = load_model(rec.model_name, rec.num_classes, rec.state_dict)
    head = find_head(model, rec.num_classes).modules[-1]
    idx = np.loadtxt(index_file, dtype=int)
    train_x, train_y = load_arrays(data_dir, train=True)
    sets = TestSets(record_dir, data_dir)
    _, tune_feat = logits_and_features(model, train_x[idx])
    test_logits, test_feat = logits_and_features(model, sets.clean_x)
    scores = {c: cross_val_score(LogisticRegression(max_iter=2000, C=c), tune_feat, train_y[idx], cv=5).mean()
              for c in (0.001, 0.01, 0.1, 1.0)}
    best_c = max(scores, key=scores.get)
    probe = LogisticRegression(max_iter=2000, C=best_c).fit(tune_feat, train_y[idx])
    w0 = float(head.weight.detach().norm())
    return {"record": record_dir.name, "tuning_images": int(len(idx)), "w0_norm": w0, "w0_norm_sq": w0 ** 2,
            "feature_norm_mean": float(np.linalg.norm(tune_feat, axis=1).mean()), "feature_dim": int(tune_feat.shape[1]),
            "original_head_acc": float((test_logits.argmax(1) == sets.clean_y).mean()),
            "fresh_head_acc": float((probe.predict(test_feat) == sets.clean_y).mean()), "fresh_head_C": best_c,
            "fresh_head_cv_acc": float(scores[best_c])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--record", required=True)
    parser.add_argument("--points", type=int, help="images per group (default: the protocol's tsne_points)")
    parser.add_argument("--fresh-head", action="store_true",
                        help="also fit a fresh linear head on the frozen features of FST's tuning set "
                             "(results/fresh_head_<record>.json; explains re-init C-Acc costs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup()
    protocol = protocol_from_args(args)
    results = args.results or REPO / "bench_results" / protocol.name
    started = time.time()
    record_dir = protocol_root(args.cache, protocol.name) / "record" / args.record
    if args.fresh_head:
        probe = fresh_head_probe(record_dir, args.data, args.seed)
        atomic_write_text(results / f"fresh_head_{args.record}.json", json.dumps(probe, indent=1))
        log.info("fresh linear head on frozen features: %s", probe)
    out = tsne_figure(record_dir, args.data, args.points or protocol.tsne_points,
                      results / "figures" / f"tsne_{args.record}.png")
    log_timing(results, f"diagnostics {args.record}", time.time() - started)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
