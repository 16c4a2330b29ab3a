"""The figures (``figures/``): per record, the per-epoch ASR / C-Acc of each tuning mode (efficiency), the α
sweep and the tuning-set size; and the per-epoch curve one defense run wrote, which the targets read too."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from fst_plugin.record.layout import DefenseLayout, record_dir

from bench_scripts.defenses.ablations import LONGER_VARIANT
from bench_scripts.protocols import METHODS, REINIT_METHODS
from bench_scripts.report.tables import LABELS, alpha_sweep


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def epoch_curves(record_dir: Path, variant: str) -> Optional[pd.DataFrame]:
    """Per-epoch C-Acc / ASR of one defense run, epoch 0 = before tuning (on the protocol's eval subset)."""
    layout = DefenseLayout.of(record_dir, variant)  # a variant's method is unknown here: any *_df.csv
    csvs = list(layout.folder.glob("*_df.csv"))
    info = layout.run_info
    if not csvs or not info.is_file():
        return None
    df = pd.read_csv(csvs[0])
    before = json.loads(info.read_text())["before"]
    df["epoch"] = df["epoch"] + 1
    first = pd.DataFrame([{"epoch": 0, "test_acc": before["test_acc"], "test_asr": before["test_asr"]}])
    return pd.concat([first, df[["epoch", "test_acc", "test_asr"]]], ignore_index=True)


def asr_acc_figure(series: dict[str, pd.DataFrame], x: str, x_label: str, title: str, path: Path,
                   log_x: bool = False) -> str:
    """ASR (left) and C-Acc (right) against column ``x``, one line per labelled frame; returns the file name."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, frame in series.items():
        axes[0].plot(frame[x], 100 * frame["test_asr"], marker="o", label=label)
        axes[1].plot(frame[x], 100 * frame["test_acc"], marker="o", label=label)
    for ax, name in zip(axes, ("ASR (%)", "C-Acc (%)")):
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    return save(fig, path)


def save(fig, path: Path) -> str:
    """Lay out, write (dpi 90) and close ``fig``; returns the file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path.name


def alpha_figure(alpha: pd.DataFrame, record: str, path: Path) -> str:
    """FST's ASR and C-Acc against α (symlog axis: α = 0 is FT-init)."""
    fig, ax = pyplot().subplots(figsize=(5.5, 4))
    ax.plot(alpha["alpha"], 100 * alpha["test_asr"], marker="o", label="ASR")
    ax.plot(alpha["alpha"], 100 * alpha["test_acc"], marker="s", label="C-Acc")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("α")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{record}: FST α sweep")
    return save(fig, path)


def figures(df: pd.DataFrame, root: Path, out: Path) -> list[str]:
    made = []
    out.mkdir(parents=True, exist_ok=True)
    for record in sorted(df["record"].unique()):
        curves = {m: epoch_curves(record_dir(root, record), m) for m in METHODS}
        curves = {m: c for m, c in curves.items() if c is not None}
        if curves:
            made.append(asr_acc_figure({LABELS[m]: c for m, c in curves.items()}, "epoch", "tuning epoch",
                                       f"{record}: per-epoch ASR / C-Acc (per-epoch evaluation subset)",
                                       out / f"efficiency_{record}.png"))
        sub = df[df["record"] == record]
        alpha = alpha_sweep(sub).sort_values("alpha")
        if len(alpha) > 2:
            made.append(alpha_figure(alpha, record, out / f"alpha_{record}.png"))
        size = sub[sub["n_clean"].notna() & sub["method"].isin(REINIT_METHODS)
                   & ~sub["variant"].str.contains(r"alpha|noproj|atmost|" + LONGER_VARIANT)]
        if size["n_clean"].nunique() > 1:
            made.append(asr_acc_figure({LABELS[m]: g.sort_values("n_clean") for m, g in size.groupby("method")},
                                       "n_clean", "clean tuning images", f"{record}: tuning-set size",
                                       out / f"size_{record}.png", log_x=True))
    return made
