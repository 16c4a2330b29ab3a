"""The probes' parts of ``table.md``: the retuning attack and QRA section (issue 11) with its figures, the
fresh linear head on frozen features and the per-stage trigger probe (``diagnostics.py``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from bench_scripts.evaluation.evaluate import QRA_COLUMNS, RETUNE_COLUMNS, RETUNE_VARIANTS
from bench_scripts.protocols import BB_METHODS
from bench_scripts.report.figures import pyplot, save
from bench_scripts.report.tables import LABELS, PERCENT, pct, per_record_lines

QRA_LABELS = dict(zip(QRA_COLUMNS, ("QRA ASR", "QRA clean → target", "QRA ASR, clean ref.")))
QRA_NOTE = ("\n\nQRA columns (`fst-plugin qra`, the authors' fine_tune/qra.py): a perturbation of at most eps "
            "(16/255 by default) per pixel, learned so that the model acts like its retuned version while the clean reference still classifies "
            "correctly, applied to the poisoned test images (QRA ASR) and the clean ones (share sent to the target). "
            "A reactivation is real when QRA ASR is high and the clean reference's stays low.")


def _retuned(df: pd.DataFrame) -> pd.DataFrame:
    """The grid's rows (and the clean reference's) that have a post-retuning ASR."""
    if "retune_asr" not in df:
        return df.iloc[0:0]
    return df[df["variant"].isin(RETUNE_VARIANTS) & df["retune_asr"].notna()]


def retune_section(df: pd.DataFrame) -> Optional[str]:
    """Main table with the post-retuning ASR (ASR → after the retuning attack) and every retuned model's numbers."""
    sub = _retuned(df)
    if sub.empty:
        return None
    # the built-ins' columns are the side-by-side section's (report/side_by_side.py); the long table lists them all
    methods = [m for m in RETUNE_VARIANTS if m in set(sub["variant"]) and m not in BB_METHODS]

    def cells(_rate: float, _m: str, r: Optional[pd.Series]) -> list[str]:
        return ([pct(r.test_acc) if r is not None else "–",
                 f"{pct(r.test_asr)} → **{pct(r.retune_asr)}**" if r is not None else "–"])

    lines = per_record_lines(sub, methods, lambda m: f"{LABELS[m]} C-Acc | {LABELS[m]} ASR → retuned", cells)
    retuned = dict(zip(RETUNE_COLUMNS, (f"retuned {name}" for name in PERCENT.values())))
    detail = sub[["record", "variant", *PERCENT, *RETUNE_COLUMNS]].copy()
    for c in detail.columns[2:]:
        detail[c] = (100 * detail[c]).round(2)
    detail = detail.rename(columns={**PERCENT, **retuned})
    qra = qra_detail(sub)
    if qra is not None:
        detail = pd.concat([detail, qra], axis=1)
    under = sub[sub["retune_asr"] <= 0.10]
    return ("## Does the backdoor come back? (retuning attack)\n\n"
            "Each model fine-tuned as the FST authors' follow-up does it (`fst-plugin retune`, fine_tune/ft_poison.py's "
            "protocol): its clean tuning subset with 5 images replaced by poisoned training images, 5 epochs of SGD, "
            "lr 0.01, momentum 0.9, no schedule; then re-measured on the full test sets. The clean reference is the same "
            "architecture trained on clean data only (the rate-0 record), the floor a purification should reach. "
            "C-Acc / ASR in %.\n\n" + "\n".join(lines) + "\n\n" + detail.to_markdown(index=False)
            + f"\n\nPost-retuning ASR ≤ 10% (the next target, from PAM): {len(under)} of {len(sub)} models"
            + (f" ({', '.join(f'{r.record}/{r.variant}' for r in under.itertuples())})" if len(under) else "") + "."
            + (QRA_NOTE if qra is not None else ""))



def qra_detail(sub: pd.DataFrame) -> Optional[pd.DataFrame]:
    """The QRA columns (in %) of the retuned models that have them, or None when no model has a QRA result."""
    if "qra_asr" not in sub or sub["qra_asr"].isna().all():
        return None
    return (100 * sub[list(QRA_LABELS)]).round(2).rename(columns=QRA_LABELS)


def retune_figures(df: pd.DataFrame, out: Path) -> list[str]:
    """Per record: each model's ASR before (grey) and after (red) the retuning attack, joined by an arrow."""
    plt = pyplot()
    sub, made = _retuned(df), []
    out.mkdir(parents=True, exist_ok=True)
    for record, group in sub.groupby("record"):
        group = group.set_index("variant").loc[[m for m in RETUNE_VARIANTS if m in set(group["variant"])]]
        fig, ax = plt.subplots(figsize=(1.1 * len(group) + 2, 4))
        x = np.arange(len(group))
        ax.scatter(x, 100 * group["test_asr"], color="grey", label="ASR after the defense", zorder=3)
        ax.scatter(x, 100 * group["retune_asr"], color="tab:red", label="ASR after retuning", zorder=3)
        for xi, (a, b) in enumerate(zip(group["test_asr"], group["retune_asr"])):
            ax.annotate("", xy=(xi, 100 * b), xytext=(xi, 100 * a), arrowprops=dict(arrowstyle="->", color="tab:red"))
        ax.axhline(10, color="k", linestyle=":", linewidth=1, label="10% (target)")
        ax.set_xticks(x, [LABELS[m] for m in group.index], rotation=30, ha="right")
        ax.set_ylabel("ASR (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        ax.set_title(f"{record}: ASR before → after retuning", fontsize=10)
        made.append(save(fig, out / f"retune_{record}.png"))
    return made


def fresh_head_table(results: Path) -> str:
    """diagnostics.py --fresh-head probes (one row per record), if any were run."""
    rows = [json.loads(f.read_text()) for f in sorted(results.glob("fresh_head_*.json"))]
    if not rows:
        return ""
    df = pd.DataFrame(rows)
    for c in ("original_head_acc", "fresh_head_acc", "fresh_head_cv_acc"):
        df[c] = (100 * df[c]).round(2)
    cols = {"record": "record", "original_head_acc": "C-Acc, original head", "fresh_head_acc": "C-Acc, fresh head",
            "fresh_head_cv_acc": "CV acc on tuning set", "w0_norm": "‖W₀‖", "w0_norm_sq": "‖W₀‖²",
            "feature_norm_mean": "mean ‖feature‖"}
    return ("A fresh linear head (logistic regression, C by 5-fold CV on the 1000 tuning images) on the "
            "backdoored model's frozen penultimate features, evaluated on the full clean test set "
            "(`diagnostics.py --fresh-head`); with the projection, FST's penalty reaches −α‖W₀‖² at its minimum.\n\n"
            + df[list(cols)].rename(columns=cols).round(3).to_markdown(index=False))


def layers_table(results: Path) -> str:
    """diagnostics.py --layers probes: per record, model and stage, trigger detectability and target share."""
    rows = []
    for f in sorted(results.glob("layers_*.json")):
        probe = json.loads(f.read_text())
        for model, stages in probe["models"].items():
            row = {"record": probe["record"], "model": model}
            for stage, v in stages.items():
                row[f"{stage} probe"] = round(100 * v["trigger_probe_acc"], 1)
                row[f"{stage} →target"] = round(100 * v["target_share"], 1)
            rows.append(row)
    if not rows:
        return ""
    return ("Per stage (top-level block before the head): `probe` = held-out accuracy (%) of a linear probe telling "
            "an image from the same image with the trigger (50 = the stage does not see the trigger); `→target` = "
            "share (%) of triggered non-target images whose pooled stage feature is nearest the target class's "
            "clean centroid (`diagnostics.py --layers`).\n\n" + pd.DataFrame(rows).to_markdown(index=False))
