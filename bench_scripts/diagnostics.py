"""Feature-shift diagnostics (the paper's Figure 3): t-SNE of penultimate features of target-class clean test
images vs poisoned test images, for the backdoored model and after each defense.

    python -m bench_scripts.diagnostics --protocol cpu --data data/cifar10 --record badnets_0.01_s0

Writes bench_results/<protocol>/figures/tsne_<record>.png. Each panel's title gives the model's ASR on the
plotted poisoned images and the share of them whose feature is nearest to the target class's clean-feature
centroid (evaluate.py's ``feat_target_share``, here with centroids from ``points`` clean images per class).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from bench_scripts.common import (
    add_protocol_args,
    protocol_from_args,
    METHODS,
    REPO,
    TARGET,
    load_defended,
    load_model,
    logits_and_features,
    protocol_root,
    feature_shift_measures,
    setup,
    log_timing,
)
from bench_scripts.evaluate import TestSets

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
    models += [(m, lambda p=record_dir / "defense" / m / "defense_result.pt": load_defended(p))
               for m in methods if (record_dir / "defense" / m / "defense_result.pt").is_file()]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--record", required=True)
    parser.add_argument("--points", type=int, help="images per group (default: the protocol's tsne_points)")
    args = parser.parse_args(argv)
    setup()
    protocol = protocol_from_args(args)
    results = args.results or REPO / "bench_results" / protocol.name
    started = time.time()
    out = tsne_figure(protocol_root(args.cache, protocol.name) / "record" / args.record, args.data,
                      args.points or protocol.tsne_points, results / "figures" / f"tsne_{args.record}.png")
    log_timing(results, f"diagnostics {args.record}", time.time() - started)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
