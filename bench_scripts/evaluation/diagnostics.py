"""Feature-shift diagnostics (the paper's Figure 3): t-SNE of penultimate features of target-class clean test
images vs poisoned test images, for the backdoored model and after each defense.

    python -m bench_scripts.evaluation.diagnostics --protocol cpu --data data/cifar10 --record badnets_0.01_s0

Writes bench_results/<protocol>/figures/tsne_<record>.png. Each panel's title gives the model's ASR on the
plotted poisoned images and the share of them whose feature is nearest to the target class's clean-feature
centroid (evaluate.py's ``feat_target_share``, here with centroids from ``points`` clean images per class).

``--layers`` asks where in the network the trigger lives: for every stage (each top-level block before the head)
of the backdoored model and of each defended one, how linearly detectable the trigger is (a probe telling an
image from the same image with the trigger) and whether triggered images already sit in the target class's
cluster (nearest clean-class centroid). Writes results/layers_<record>.json.

``--inversion-split`` asks why PAM's trigger inversion finds the record's target or not: it fits the inversion's
benign-feature mask on the backdoored model as the first round does and scores the record's trigger, PAM's saved
generator and Gaussian noise by the inversion's own objective. Writes results/inversion_split_<record>.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bench_scripts.common import (
    DATASET,
    TARGET,
    add_protocol_args,
    bench_info,
    load_defended,
    load_model,
    log_timing,
    make_trigger,
    start,
)
from bench_scripts.evaluation.measures import (
    TestSets,
    feature_shift_measures,
    features_of,
    measure_with_features,
    model_input,
    nearest_class,
    unit_rows,
)
from bench_scripts.protocols import METHODS, Protocol
from fst_plugin.attacks import to_tensor_batch
from fst_plugin.core import find_head
from fst_plugin.core.trigger_inversion import FeatureView, Inversion, decouple, head_of_copy
from fst_plugin.core.unlearning import generator_from_state
from fst_plugin.data.arrays import load_split_arrays
from fst_plugin.defense.config import DefenseConfig, unlearning_config
from fst_plugin.io_utils import atomic_write_text
from fst_plugin.record.clean_subset import choose_clean_indices
from fst_plugin.record.layout import DefenseLayout
from fst_plugin.record.safe_load import load_untrusted

log = logging.getLogger("bench.diagnostics")


def draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``pool``'s entries (all of them where it holds fewer), drawn without replacement."""
    return rng.choice(pool, size=min(n, len(pool)), replace=False)


def draw_non_target(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` images whose label is not the target: the images a trigger is scored on."""
    return draw(np.flatnonzero(labels != TARGET), n, rng)


def draw_per_class(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` images of every class, class by class: what class centroids are taken from."""
    return np.concatenate([draw(np.flatnonzero(labels == c), n, rng) for c in np.unique(labels)])


def record_models(record_dir: Path, sets: TestSets, methods: tuple[str, ...],
                  attacked_label: str) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The backdoored model (named ``attacked_label``) and each of ``methods``' finished defense results, as
    (name, loader) pairs: a model is loaded only when its turn comes."""
    rec = sets.record
    models = [(attacked_label, lambda: load_model(rec.model_name, rec.num_classes, rec.state_dict))]
    return models + [(m, lambda p=DefenseLayout.of(record_dir, m).result: load_defended(p))
                     for m in methods if DefenseLayout.of(record_dir, m).finished]


def tsne_figure(record_dir: Path, data_dir: Path, points: int, out: Path, methods: tuple[str, ...] = METHODS,
                seed: int = 0) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    sets = TestSets(record_dir, data_dir)
    rng = np.random.default_rng(seed)
    # `points` clean images of every class: the target class's are plotted, all give the class centroids
    clean_idx = draw_per_class(sets.clean_y, points, rng)
    bd_idx = draw(np.arange(len(sets.bd_label)), points, rng)
    models = record_models(record_dir, sets, methods, "no defense")
    cols = 3
    rows = int(np.ceil(len(models) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    for ax, (name, build) in zip(axes.flat, models):
        metrics, f_all, f_bd = measure_with_features(
            build(), (sets.clean_x[clean_idx], sets.clean_y[clean_idx]),
            (sets.bd_x[bd_idx], sets.bd_label[bd_idx], sets.bd_orig[bd_idx]))
        shift = feature_shift_measures(f_all, sets.clean_y[clean_idx], f_bd, sets.bd_orig[bd_idx], TARGET, seed)
        f_clean = f_all[sets.clean_y[clean_idx] == TARGET]
        asr = metrics.test_asr
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
    sets = TestSets(record_dir, data_dir)
    rec = sets.record
    model = load_model(rec.model_name, rec.num_classes, rec.state_dict)
    head = find_head(model, rec.num_classes).modules[-1]
    idx = np.loadtxt(index_file, dtype=int)
    train_x, train_y = load_split_arrays(DATASET, data_dir, train=True)
    tune_feat = features_of(model, train_x[idx], rec.num_classes)
    no_poisoned = (sets.bd_x[:0], sets.bd_label[:0], sets.bd_orig[:0])  # only the clean test set is asked about
    metrics, test_feat, _ = measure_with_features(model, (sets.clean_x, sets.clean_y), no_poisoned,
                                                  num_classes=rec.num_classes)
    scores = {c: cross_val_score(LogisticRegression(max_iter=2000, C=c), tune_feat, train_y[idx], cv=5).mean()
              for c in (0.001, 0.01, 0.1, 1.0)}
    best_c = max(scores, key=scores.get)
    probe = LogisticRegression(max_iter=2000, C=best_c).fit(tune_feat, train_y[idx])
    w0 = float(head.weight.detach().norm())
    return {"record": record_dir.name, "tuning_images": int(len(idx)), "w0_norm": w0, "w0_norm_sq": w0 ** 2,
            "feature_norm_mean": float(np.linalg.norm(tune_feat, axis=1).mean()), "feature_dim": int(tune_feat.shape[1]),
            "original_head_acc": metrics.test_acc,
            "fresh_head_acc": float((probe.predict(test_feat) == sets.clean_y).mean()), "fresh_head_C": best_c,
            "fresh_head_cv_acc": float(scores[best_c])}


@torch.no_grad()
def stage_features(model: nn.Module, images: np.ndarray, num_classes: int, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Outputs of every top-level block before the head (the network's stages), average-pooled to 2×2 cells
    (N, C, 4): a global average alone cancels a periodic trigger such as SIG's whole-period sinusoid."""
    head = find_head(model, num_classes).modules[-1]
    stages = [(n, m) for n, m in model.named_children() if m is not head and not isinstance(m, nn.AdaptiveAvgPool2d)]
    captured: dict[str, list[np.ndarray]] = {n: [] for n, _ in stages}

    def hook(name: str):
        def grab(_m, _inp, out):
            out = out.float()
            pooled = nn.functional.adaptive_avg_pool2d(out, 2).flatten(2) if out.dim() == 4 else out[:, :, None]
            captured[name].append(pooled.cpu().numpy())
        return grab

    handles = [m.register_forward_hook(hook(n)) for n, m in stages]
    model.eval()
    data = to_tensor_batch(images)
    try:
        for i in range(0, len(data), batch_size):
            model(model_input(data[i:i + batch_size]))
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(v) for n, v in captured.items()}


def layer_probe(record_dir: Path, data_dir: Path, methods: tuple[str, ...], n_images: int = 1000,
                per_class: int = 200, seed: int = 0) -> dict:
    """Per stage and per model: ``trigger_probe_acc`` (held-out accuracy of a logistic regression on the 2×2-pooled
    stage output telling ``n_images`` non-target test images from the same images with the record's trigger;
    trained on one half of the images, scored on the other, so it measures the trigger, not the image),
    ``shift_over_spread`` (the mean trigger-induced change of the globally pooled feature over the clean
    features' spread) and ``target_share`` (share of triggered images whose globally pooled feature is nearest,
    by cosine, to the target class's centroid of ``per_class`` clean images per class; at the last stage this is
    evaluate.py's feat→target)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sets = TestSets(record_dir, data_dir)
    info = bench_info(sets.record)
    trigger = make_trigger(info["attack"], int(info.get("seed", 0)), info.get("blend_pattern"))
    rng = np.random.default_rng(seed)
    chosen = draw_non_target(sets.clean_y, n_images, rng)
    clean, triggered = sets.clean_x[chosen], trigger(sets.clean_x[chosen])
    ref = draw_per_class(sets.clean_y, per_class, rng)
    half = len(chosen) // 2
    rec = sets.record
    models = record_models(record_dir, sets, methods, "none")

    out: dict = {"record": record_dir.name, "attack": info["attack"], "n_images": int(len(chosen)), "models": {}}
    for name, build in models:
        model = build()
        cells_clean, cells_trig = (stage_features(model, x, rec.num_classes) for x in (clean, triggered))
        f_ref = {k: v.mean(2) for k, v in stage_features(model, sets.clean_x[ref], rec.num_classes).items()}
        rows = {}
        for stage in cells_clean:
            a, b = cells_clean[stage].mean(2), cells_trig[stage].mean(2)
            ca, cb = cells_clean[stage].reshape(len(a), -1), cells_trig[stage].reshape(len(b), -1)
            x_fit = np.concatenate([ca[:half], cb[:half]])
            x_test = np.concatenate([ca[half:], cb[half:]])
            y = np.r_[np.zeros(half), np.ones(half)]
            y_test = np.r_[np.zeros(len(a) - half), np.ones(len(a) - half)]
            scaler = StandardScaler().fit(x_fit)
            probe = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(x_fit), y)
            labels = sets.clean_y[ref]
            classes = np.unique(labels)
            centroids = unit_rows(np.stack([f_ref[stage][labels == c].mean(0) for c in classes]))
            nearest = nearest_class(b, centroids, classes)
            spread = float(np.sqrt(a.var(0).sum()))
            rows[stage] = {"trigger_probe_acc": float(probe.score(scaler.transform(x_test), y_test)),
                           "shift_over_spread": float(np.linalg.norm((b - a).mean(0)) / max(spread, 1e-12)),
                           "target_share": float((nearest == TARGET).mean()),
                           "clean_target_share": float((nearest_class(a, centroids, classes) == TARGET).mean())}
        out["models"][name] = rows
        log.info("%s %s: %s", record_dir.name, name, {k: round(v["target_share"], 3) for k, v in rows.items()})
    return out


def inversion_split(record_dir: Path, data_dir: Path, protocol: Protocol, n_images: int = 500, seed: int = 0) -> dict:
    """Why PAM's inversion finds the record's target or not, from its own objective. The benign-feature mask m is
    fitted afresh on the backdoored model as the first round fits it (``decouple``, the protocol's PAM settings, on a
    seeded draw of the protocol's clean tuning share). The generator maximises how far an image's masked-out features
    (1 − m)·f move while its pixels stay within ``norm_bound``; so each direction is scored, as it is and scaled to
    that bound, on ``n_images`` non-target test images: ``backdoor_mse`` and ``benign_mse`` (the feature moves the
    objective pushes and holds; the features come from the model's copy that fitted the mask, as in the inversion),
    ``backdoor_share`` (the share of the feature shift's energy in (1 − m); compare ``mask_backdoor_area``) and where
    the backdoored model sends the images (``top_class``, ``top_share``). The directions: the
    record's trigger, PAM's saved generator (``defense/pam/trigger_generator.pt``, its last round) and Gaussian
    noise."""
    sets = TestSets(record_dir, data_dir)
    rec, info = sets.record, sets.info
    trigger = make_trigger(info["attack"], int(info.get("seed", 0)), info.get("blend_pattern"))
    config = unlearning_config(dataclasses.replace(DefenseConfig(), **protocol.pam_settings)).inversion
    chosen = draw_non_target(sets.clean_y, n_images, np.random.default_rng(seed))
    clean = model_input(to_tensor_batch(sets.clean_x[chosen]))
    directions = {"trigger": model_input(to_tensor_batch(trigger(sets.clean_x[chosen]))) - clean,
                  "gaussian noise": torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))}
    saved = DefenseLayout.of(record_dir, "pam").trigger_generator
    if saved.is_file():
        generator = generator_from_state(load_untrusted(saved, "PAM's trigger generator"))
        with torch.no_grad():
            directions["PAM's generator"] = generator(clean) - clean

    train_x, train_y = load_split_arrays(DATASET, data_dir, train=True)
    random.seed(seed)
    tuning = choose_clean_indices(len(train_y), protocol.defense_ratio, None)
    tuning_x, tuning_y = model_input(to_tensor_batch(train_x[tuning])), torch.as_tensor(train_y[tuning]).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tuning_x, tuning_y),
                                         batch_size=protocol.defense_batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model = load_model(rec.model_name, rec.num_classes, rec.state_dict).eval().requires_grad_(False)
    copied = copy.deepcopy(model)
    view = FeatureView(copied, head_of_copy(model, copied, find_head(model, rec.num_classes)), tuning_x[:64])
    inversion = Inversion.new(clean.shape[1], config, "cpu")
    inversion.phase = "mask"
    copied.train()
    mask = decouple(view, inversion, loader, config, "cpu", torch.Generator().manual_seed(seed))
    copied.eval()

    @torch.no_grad()
    def score(shift: torch.Tensor) -> dict:
        made = clean + shift
        before, after = view.features(clean), view.features(made)
        moved = after - before
        counts = torch.bincount(model(made).argmax(1), minlength=rec.num_classes)   # as detect_target counts
        return {"pixel_mse": float(shift.pow(2).mean()),
                "backdoor_mse": float(((1 - mask) * moved).pow(2).mean()),
                "benign_mse": float((mask * moved).pow(2).mean()),
                "backdoor_share": float(((1 - mask) * moved).pow(2).sum() / moved.pow(2).sum().clamp_min(1e-12)),
                "top_class": int(counts.argmax()), "top_share": float(counts.max() / len(made))}

    bound = 0.999 * config.norm_bound   # just inside: the generator's loss switches to the pixel term above it
    scores = {}
    for name, shift in directions.items():
        scores[name] = score(shift)
        scores[f"{name} at the bound"] = score(shift * (bound / shift.pow(2).mean().clamp_min(1e-12)) ** 0.5)
    out = {"record": record_dir.name, "attack": info["attack"], "target": TARGET, "split": view.split,
           "mask_saturation": float((2 * mask - 1).abs().mean()), "mask_backdoor_area": float((1 - mask).mean()),
           "norm_bound": config.norm_bound, "n_images": int(len(chosen)), "directions": scores}
    log.info("%s: mask backdoor area %.3f; %s", record_dir.name, out["mask_backdoor_area"],
             {k: (round(v["backdoor_mse"], 4), round(v["backdoor_share"], 3), v["top_class"]) for k, v in scores.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser)
    parser.add_argument("--record", required=True)
    parser.add_argument("--points", type=int, help="images per group (default: the protocol's tsne_points)")
    parser.add_argument("--fresh-head", action="store_true",
                        help="also fit a fresh linear head on the frozen features of FST's tuning set "
                             "(results/fresh_head_<record>.json; explains re-init C-Acc costs)")
    parser.add_argument("--layers", nargs="*", metavar="METHOD",
                        help="also run the per-stage trigger probe on the backdoored model and these defenses' models "
                             "(results/layers_<record>.json; default: the five modes)")
    parser.add_argument("--inversion-split", action="store_true",
                        help="also score the record's trigger, PAM's saved generator and noise by PAM's inversion "
                             "objective on a freshly fitted mask (results/inversion_split_<record>.json)")
    parser.add_argument("--no-tsne", action="store_true", help="skip the t-SNE figure")
    parser.add_argument("--seed", type=int, default=0)
    run = start(parser, argv)
    args, protocol, results = run.args, run.protocol, run.results
    started = time.time()
    record_dir = run.record_dir(args.record)
    if args.fresh_head:
        probe = fresh_head_probe(record_dir, args.data, args.seed)
        atomic_write_text(results / f"fresh_head_{args.record}.json", json.dumps(probe, indent=1))
        log.info("fresh linear head on frozen features: %s", probe)
    if args.layers is not None:
        layers = layer_probe(record_dir, args.data, tuple(args.layers) or METHODS, seed=args.seed)
        atomic_write_text(results / f"layers_{args.record}.json", json.dumps(layers, indent=1))
    if args.inversion_split:
        split = inversion_split(record_dir, args.data, protocol, seed=args.seed)
        atomic_write_text(results / f"inversion_split_{args.record}.json", json.dumps(split, indent=1))
    if not args.no_tsne:
        out = tsne_figure(record_dir, args.data, args.points or protocol.tsne_points,
                          results / "figures" / f"tsne_{args.record}.png")
        log.info("wrote %s", out)
    log_timing(results, f"diagnostics {args.record}", time.time() - started)


if __name__ == "__main__":
    main()
