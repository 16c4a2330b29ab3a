"""Tables and figures from evaluate.py's results.csv (+ the defenses' per-epoch CSVs for the efficiency figure).

    python -m bench_scripts.make_table --protocol cpu

Writes bench_results/<protocol>/table.md: the paper-style table (rows attack × rate, columns C-Acc / ASR per
method, average and std rows over the low-rate records and over all), RA / DER / separability / wall time per
run, the ablations (alpha, tuning-set size, projection), the issue's targets checked one by one, and the
timings of every step (timings.jsonl). Figures go to figures/: efficiency_<record>.png (ASR and C-Acc per
epoch for each tuning mode), alpha_<record>.png, size_<record>.png.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from dataclasses import dataclass

from fst_plugin.record.layout import DefenseLayout

from bench_scripts.common import (
    METHODS,
    REPO,
    add_protocol_args,
    protocol_from_args,
    protocol_root,
    setup,
)

log = logging.getLogger("bench.make_table")
BB_METHODS = ("ft", "ft-sam", "anp", "i-bau", "nad")
LABELS = {"none": "No defense", "lp": "LP", "vanilla-ft": "Vanilla FT", "fe-tuning": "FE-tuning",
          "ft-init": "FT-init", "fst": "FST", "ft": "BB ft", "ft-sam": "BB ft-sam", "anp": "BB anp",
          "i-bau": "BB i-bau", "nad": "BB nad"}
LOW_RATE = 0.01


@dataclass(frozen=True)
class Targets:
    """The targets a protocol's table is checked against (each issue set its own)."""
    issue: str
    max_drop: float                  # FST's average C-Acc drop over the low-rate records
    asr_only_vs_baselines: bool      # "FST's ASR below FE-tuning's / FT-init's" without a C-Acc condition
    n50_max_drop: Optional[float]    # the 50-image target also bounds the C-Acc drop (None: ASR only)


CPU_TARGETS = Targets("issue #3, CPU protocol", max_drop=0.03, asr_only_vs_baselines=False, n50_max_drop=None)
PAPER_SCALE_TARGETS = Targets("issue #10, paper scale", max_drop=0.02, asr_only_vs_baselines=True, n50_max_drop=0.10)


def targets_for(protocol_name: str) -> Targets:
    return PAPER_SCALE_TARGETS if protocol_name.startswith("gpu") else CPU_TARGETS


def pct(x: float) -> str:
    return "–" if pd.isna(x) else f"{100 * x:.2f}"


def row_label(attack: str, rate: float, key: Optional[str] = None) -> str:
    """``blended 1%``, or ``blended (flower key) 1%`` for a Blended record keyed by an image file."""
    return f"{attack}{f' ({key} key)' if isinstance(key, str) and key else ''} {100 * rate:g}%"


def main_table(df: pd.DataFrame, always: tuple[str, ...] = ()) -> str:
    """``always``: methods given a column even where no record has a run of them (their cells stay "–")."""
    methods = [m for m in ("none",) + METHODS + BB_METHODS if m in set(df["variant"]) or m in always]
    grid = df[df["variant"].isin(methods)]
    if "trigger_key" not in grid:  # results.csv written before image-keyed Blended records existed
        grid = grid.assign(trigger_key=None)
    records = (grid.drop_duplicates("record").sort_values(["attack", "trigger_key", "rate"], na_position="first")
               [["record", "attack", "trigger_key", "rate"]])
    header = "| attack, rate | " + " | ".join(f"{LABELS[m]} C-Acc | {LABELS[m]} ASR" for m in methods) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(methods))]
    values: dict[str, list[list[float]]] = {m: [] for m in methods}
    for rec in records.itertuples():
        cells = []
        for m in methods:
            hit = grid[(grid["record"] == rec.record) & (grid["variant"] == m)]
            acc, asr = (hit.iloc[0]["test_acc"], hit.iloc[0]["test_asr"]) if len(hit) else (np.nan, np.nan)
            values[m].append([acc, asr, rec.rate])
            cells += [pct(acc), pct(asr)]
        lines.append(f"| {row_label(rec.attack, rec.rate, rec.trigger_key)} | " + " | ".join(cells) + " |")
    for name, keep in ((f"average, rate ≤ {100 * LOW_RATE:g}%", lambda r: r <= LOW_RATE), ("average, all", lambda r: True)):
        for stat in ("mean", "std"):
            cells = []
            for m in methods:
                arr = np.array([v for v in values[m] if keep(v[2])], dtype=float).reshape(-1, 3)
                for col in (0, 1):
                    col_vals = arr[:, col][~np.isnan(arr[:, col])]
                    ok = len(col_vals) > (1 if stat == "std" else 0)
                    val = (col_vals.mean() if stat == "mean" else col_vals.std(ddof=1)) if ok else np.nan
                    cells.append(pct(val))
            label = name if stat == "mean" else name.replace("average", "std")
            lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(df: pd.DataFrame, variants: list[str]) -> str:
    cols = ["record", "variant", "test_acc", "test_asr", "test_ra", "der", "feat_target_share", "feat_true_share",
            "sep_silhouette", "defense_wall_s"]
    sub = df[df["variant"].isin(variants)][cols].copy()
    for c in ("test_acc", "test_asr", "test_ra"):
        sub[c] = (100 * sub[c]).round(2)
    for c in ("der", "feat_target_share", "feat_true_share", "sep_silhouette"):
        sub[c] = sub[c].round(3)
    sub = sub.rename(columns={"test_acc": "C-Acc", "test_asr": "ASR", "test_ra": "RA", "der": "DER",
                              "feat_target_share": "feat→target", "feat_true_share": "feat→true",
                              "sep_silhouette": "silhouette", "defense_wall_s": "wall s"})
    return sub.to_markdown(index=False)


def alpha_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """FST runs that differ only in alpha; FT-init stands in for alpha = 0 when no fst_alpha0 run exists
    (same mode settings: re-initialised head, everything trained, projection on — only the penalty differs)."""
    runs = df[(df["method"] == "fst") & df["variant"].str.match(r"^fst(_alpha.*)?$")].copy()
    if not (runs["alpha"] == 0).any():
        zero = df[df["variant"] == "ft-init"].copy()
        zero["alpha"] = 0.0
        runs = pd.concat([runs, zero], ignore_index=True)
    return runs


def ablation_tables(df: pd.DataFrame) -> str:
    parts = []
    alpha = alpha_sweep(df)
    if alpha["variant"].nunique() > 1:
        alpha = alpha.sort_values(["record", "alpha"])
        parts.append("### α sweep (FST)\n\n" + alpha[["record", "alpha", "test_acc", "test_asr", "test_ra"]]
                     .assign(test_acc=lambda d: (100 * d.test_acc).round(2), test_asr=lambda d: (100 * d.test_asr).round(2),
                             test_ra=lambda d: (100 * d.test_ra).round(2))
                     .rename(columns={"test_acc": "C-Acc", "test_asr": "ASR", "test_ra": "RA"}).to_markdown(index=False))
    size = df[df["variant"].str.contains(r"_n\d+$") | df["variant"].isin(["fst", "ft-init", "fe-tuning"])].copy()
    if size["variant"].str.contains(r"_n\d+$").any():
        size = size[size["record"].isin(size[size["variant"].str.contains(r"_n\d+$")]["record"])]
        table = size.pivot_table(index=["record", "n_clean"], columns="method", values=["test_acc", "test_asr"])
        table = (100 * table).round(2)
        table.columns = [f"{m} {'C-Acc' if v == 'test_acc' else 'ASR'}" for v, m in table.columns]
        parts.append("### Tuning-set size (clean images)\n\n" + table.reset_index().to_markdown(index=False))
    longer = df[df["variant"].str.contains(r"_e\d+$|_lr[\d.e-]+$")]
    if len(longer):
        rows = []
        for r in longer.itertuples():
            base = df[(df["record"] == r.record) & (df["variant"] == r.method)]
            lr = r.variant.rpartition("_lr")[2] if "_lr" in r.variant else "0.01 (paper)"
            rows.append({"record": r.record, "method": r.method, "epochs": int(r.epochs), "lr": lr,
                         "C-Acc (paper settings)": pct(base.iloc[0].test_acc) if len(base) else "–",
                         "ASR (paper settings)": pct(base.iloc[0].test_asr) if len(base) else "–",
                         "C-Acc": pct(r.test_acc), "ASR": pct(r.test_asr)})
        parts.append("### Longer tuning, larger lr\n\n" + pd.DataFrame(rows).to_markdown(index=False))
    proj = df[df["variant"].str.endswith("_noproj") | df["variant"].str.endswith("_atmost")]
    if len(proj):
        rows = []
        for (record, method), _ in proj.groupby(["record", "method"], sort=False):
            row = {"record": record, "method": method}
            for label, variant in (("‖W‖ = ‖W₀‖ (default)", method), ("‖W‖ ≤ ‖W₀‖", f"{method}_atmost"),
                                   ("off", f"{method}_noproj")):
                hit = df[(df["record"] == record) & (df["variant"] == variant)]
                row[f"C-Acc, {label}"] = pct(hit.iloc[0].test_acc) if len(hit) else "–"
                row[f"ASR, {label}"] = pct(hit.iloc[0].test_asr) if len(hit) else "–"
            rows.append(row)
        parts.append("### Head-norm projection: exact (official code), bound (paper), off\n\n"
                     + pd.DataFrame(rows).to_markdown(index=False))
    return "\n\n".join(parts)


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
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def figures(df: pd.DataFrame, root: Path, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    out.mkdir(parents=True, exist_ok=True)
    for record in sorted(df["record"].unique()):
        curves = {m: epoch_curves(root / "record" / record, m) for m in METHODS}
        curves = {m: c for m, c in curves.items() if c is not None}
        if curves:
            made.append(asr_acc_figure({LABELS[m]: c for m, c in curves.items()}, "epoch", "tuning epoch",
                                       f"{record}: per-epoch ASR / C-Acc (per-epoch evaluation subset)",
                                       out / f"efficiency_{record}.png"))
        sub = df[df["record"] == record]
        alpha = alpha_sweep(sub).sort_values("alpha")
        if len(alpha) > 2:
            fig, ax = plt.subplots(figsize=(5.5, 4))
            ax.plot(alpha["alpha"], 100 * alpha["test_asr"], marker="o", label="ASR")
            ax.plot(alpha["alpha"], 100 * alpha["test_acc"], marker="s", label="C-Acc")
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlabel("α")
            ax.set_ylabel("%")
            ax.grid(alpha=0.3)
            ax.legend()
            ax.set_title(f"{record}: FST α sweep")
            fig.tight_layout()
            fig.savefig(out / f"alpha_{record}.png", dpi=90)
            plt.close(fig)
            made.append(f"alpha_{record}.png")
        size = sub[sub["n_clean"].notna() & sub["method"].isin(["fst", "ft-init", "fe-tuning"])
                   & ~sub["variant"].str.contains(r"alpha|noproj|atmost|_e\d+$|_lr[\d.e-]+$")]
        if size["n_clean"].nunique() > 1:
            made.append(asr_acc_figure({LABELS[m]: g.sort_values("n_clean") for m, g in size.groupby("method")},
                                       "n_clean", "clean tuning images", f"{record}: tuning-set size",
                                       out / f"size_{record}.png", log_x=True))
    return made


def targets(df: pd.DataFrame, root: Path, spec: Targets = CPU_TARGETS) -> str:
    """The protocol's targets (``spec``), each checked on what was measured (or said to be unmeasured)."""
    lines = []

    def get(record_prefix: str, variant: str) -> Optional[pd.Series]:
        hit = df[df["record"].str.startswith(record_prefix) & (df["variant"] == variant)]
        return hit.iloc[0] if len(hit) else None

    low = df[df["rate"] <= LOW_RATE]
    fst, none = low[low["variant"] == "fst"], low[low["variant"] == "none"]
    if len(fst):
        recs = sorted(set(fst["record"]))
        asr = fst["test_asr"].mean()
        drop = none.set_index("record").loc[recs, "test_acc"].mean() - fst.set_index("record").loc[recs, "test_acc"].mean()
        lines.append(f"- FST average ASR ≤ 2% over the low-rate records ({len(recs)}: {', '.join(recs)}): "
                     f"{100 * asr:.2f}% → {'MET' if asr <= 0.02 else 'MISSED'}")
        lines.append(f"- FST average C-Acc drop ≤ {100 * spec.max_drop:g} points vs no defense: {100 * drop:.2f} points → "
                     f"{'MET' if drop <= spec.max_drop else 'MISSED'}")
        for other in ("fe-tuning", "ft-init"):
            o = low[(low["variant"] == other) & low["record"].isin(recs)]
            if len(o) == len(recs):
                ok = fst["test_asr"].mean() < o["test_asr"].mean() and (
                    spec.asr_only_vs_baselines or fst["test_acc"].mean() >= o["test_acc"].mean())
                condition = "" if spec.asr_only_vs_baselines else " at equal or better C-Acc"
                lines.append(f"- FST average ASR below {other}'s{condition}: FST {100 * fst['test_asr'].mean():.2f}% / "
                             f"{100 * fst['test_acc'].mean():.2f}% vs {other} {100 * o['test_asr'].mean():.2f}% / "
                             f"{100 * o['test_acc'].mean():.2f}% → {'MET' if ok else 'MISSED'}")
    for prefix in ("badnets_0.005_", "badnets_0.01_"):
        for m in ("lp", "vanilla-ft"):
            r = get(prefix, m)
            lines.append(f"- {m} keeps ASR ≥ 50% on {prefix.rstrip('_')}: "
                         + (f"{pct(r.test_asr)}% → {'MET' if r.test_asr >= 0.5 else 'MISSED'}" if r is not None else "not measured"))
    r, base = get("badnets_0.01_", "fst_n50"), get("badnets_0.01_", "none")
    verdict = "not measured"
    if r is not None and spec.n50_max_drop is not None and base is not None:
        drop = base.test_acc - r.test_acc
        ok = r.test_asr <= 0.05 and drop <= spec.n50_max_drop
        verdict = (f"{pct(r.test_asr)}% at a C-Acc drop of {100 * drop:.1f} points (bound {100 * spec.n50_max_drop:g}) → "
                   f"{'MET' if ok else 'MISSED'}")
    elif r is not None:
        verdict = f"{pct(r.test_asr)}% (C-Acc {pct(r.test_acc)}%) → {'MET' if r.test_asr <= 0.05 else 'MISSED'}"
        if base is not None and base.test_acc - r.test_acc > 0.10:
            verdict += (f" on ASR only: C-Acc fell {100 * (base.test_acc - r.test_acc):.1f} points, so the backdoor"
                        " went with the model's accuracy — not the paper's claim")
    bound = f" at a C-Acc drop ≤ {100 * spec.n50_max_drop:g} points" if spec.n50_max_drop is not None else ""
    lines.append(f"- FST with 50 clean images brings BadNets-1% ASR ≤ 5%{bound}: " + verdict)
    rec = next(iter(sorted(df[df["record"].str.startswith("badnets_0.01_")]["record"].unique())), None)
    curve = epoch_curves(root / "record" / rec, "fst") if rec else None
    if curve is not None:
        at3 = curve[curve["epoch"] == 3]["test_asr"]
        first = curve[(curve["epoch"] > 0) & (curve["test_asr"] <= 0.02)]["epoch"]
        lines.append(f"- FST ASR ≤ 2% by epoch 3 of 10 on BadNets 1% (per-epoch subset): epoch-3 ASR {pct(at3.iloc[0])}%, "
                     f"first epoch ≤ 2%: {int(first.iloc[0]) if len(first) else 'never'} → "
                     f"{'MET' if len(at3) and at3.iloc[0] <= 0.02 else 'MISSED'}")
    else:
        lines.append("- FST ASR ≤ 2% by epoch 3 on BadNets 1%: not measured")
    return "\n".join(lines)


# ----- the retuning attack (issue 11): its own functions, hooked into main() by two lines ------------------
RETUNE_ORDER = ("none", *METHODS, *BB_METHODS, "clean-reference")
LABELS_RETUNE = {**LABELS, "clean-reference": "Clean reference"}


def _retuned(df: pd.DataFrame) -> pd.DataFrame:
    """The grid's rows (and the clean reference's) that have a post-retuning ASR."""
    if "retune_asr" not in df:
        return df.iloc[0:0]
    return df[df["variant"].isin(RETUNE_ORDER) & df["retune_asr"].notna()]


def retune_section(df: pd.DataFrame) -> Optional[str]:
    """Main table with the post-retuning ASR (ASR → after the retuning attack) and every retuned model's numbers."""
    sub = _retuned(df)
    if sub.empty:
        return None
    methods = [m for m in RETUNE_ORDER if m in set(sub["variant"])]
    if "trigger_key" not in sub:
        sub = sub.assign(trigger_key=None)
    records = sub.drop_duplicates("record").sort_values(["attack", "trigger_key", "rate"], na_position="first")
    lines = ["| attack, rate | " + " | ".join(f"{LABELS_RETUNE[m]} C-Acc | {LABELS_RETUNE[m]} ASR → retuned"
                                                for m in methods) + " |",
             "|" + "---|" * (1 + 2 * len(methods))]
    for rec in records.itertuples():
        cells = []
        for m in methods:
            hit = sub[(sub["record"] == rec.record) & (sub["variant"] == m)]
            r = hit.iloc[0] if len(hit) else None
            cells += [pct(r.test_acc) if r is not None else "–",
                      f"{pct(r.test_asr)} → **{pct(r.retune_asr)}**" if r is not None else "–"]
        lines.append(f"| {row_label(rec.attack, rec.rate, rec.trigger_key)} | " + " | ".join(cells) + " |")
    detail = sub[["record", "variant", "test_acc", "test_asr", "test_ra", "retune_acc", "retune_asr", "retune_ra"]].copy()
    for c in detail.columns[2:]:
        detail[c] = (100 * detail[c]).round(2)
    detail = detail.rename(columns={"test_acc": "C-Acc", "test_asr": "ASR", "test_ra": "RA", "retune_acc": "retuned C-Acc",
                                    "retune_asr": "retuned ASR", "retune_ra": "retuned RA"})
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


QRA_LABELS = {"qra_asr": "QRA ASR", "qra_clean_target": "QRA clean → target", "qra_ref_asr": "QRA ASR, clean ref."}
QRA_NOTE = ("\n\nQRA columns (`fst-plugin qra`, the authors' fine_tune/qra.py): a perturbation of at most eps "
            "(16/255 by default) per pixel, learned so that the model acts like its retuned version while the clean reference still classifies "
            "correctly, applied to the poisoned test images (QRA ASR) and the clean ones (share sent to the target). "
            "A reactivation is real when QRA ASR is high and the clean reference's stays low.")


def qra_detail(sub: pd.DataFrame) -> Optional[pd.DataFrame]:
    """The QRA columns (in %) of the retuned models that have them, or None when no model has a QRA result."""
    if "qra_asr" not in sub or sub["qra_asr"].isna().all():
        return None
    return (100 * sub[list(QRA_LABELS)]).round(2).rename(columns=QRA_LABELS)


def retune_figures(df: pd.DataFrame, out: Path) -> list[str]:
    """Per record: each model's ASR before (grey) and after (red) the retuning attack, joined by an arrow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub, made = _retuned(df), []
    out.mkdir(parents=True, exist_ok=True)
    for record, group in sub.groupby("record"):
        group = group.set_index("variant").loc[[m for m in RETUNE_ORDER if m in set(group["variant"])]]
        fig, ax = plt.subplots(figsize=(1.1 * len(group) + 2, 4))
        x = np.arange(len(group))
        ax.scatter(x, 100 * group["test_asr"], color="grey", label="ASR after the defense", zorder=3)
        ax.scatter(x, 100 * group["retune_asr"], color="tab:red", label="ASR after retuning", zorder=3)
        for xi, (a, b) in enumerate(zip(group["test_asr"], group["retune_asr"])):
            ax.annotate("", xy=(xi, 100 * b), xytext=(xi, 100 * a), arrowprops=dict(arrowstyle="->", color="tab:red"))
        ax.axhline(10, color="k", linestyle=":", linewidth=1, label="10% (target)")
        ax.set_xticks(x, [LABELS_RETUNE[m] for m in group.index], rotation=30, ha="right")
        ax.set_ylabel("ASR (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        ax.set_title(f"{record}: ASR before → after retuning", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"retune_{record}.png", dpi=90)
        plt.close(fig)
        made.append(f"retune_{record}.png")
    return made


def timings_table(path: Path) -> str:
    if not path.is_file():
        return "(no timings.jsonl)"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    keep = [c for c in ("finished", "step", "wall_s", "train_s", "defense_wall_s", "test_acc", "test_asr", "command") if c in df]
    return df[keep].to_markdown(index=False)


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


def missing_inputs(df: pd.DataFrame, root: Path, results: Path, builtins_shown: bool) -> str:
    """What the tables and figures could not show, and why: absent record folders (efficiency curves, the
    epoch-3 target, t-SNE) and BackdoorBench built-ins that were not run."""
    lines = []
    records = sorted(df["record"].unique())
    absent = [r for r in records if not (root / "record" / r).is_dir()]
    if absent:
        lines.append(f"- Record folders absent (`<cache>/{root.name}/record/`: {', '.join(absent)}): no per-epoch "
                     "efficiency figures and no epoch-3 check for them (they read the defenses' per-epoch CSVs).")
    no_tsne = [r for r in records if not (results / "figures" / f"tsne_{r}.png").is_file()]
    if no_tsne:
        lines.append(f"- No t-SNE figure for {', '.join(no_tsne)} (`diagnostics.py` needs the record folder).")
    if builtins_shown:
        not_run = [LABELS[m] for m in BB_METHODS if m not in set(df["variant"])]
        if not_run:
            lines.append(f"- {', '.join(not_run)}: not run on these records; their columns are empty on purpose.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser, data=False)
    args = parser.parse_args(argv)
    setup()
    protocol = protocol_from_args(args)
    results = args.results or REPO / "bench_results" / protocol.name
    root = protocol_root(args.cache, protocol.name)
    df = pd.read_csv(results / "results.csv")
    df["variant"] = df["variant"].astype(str)
    figures(df, root, results / "figures")
    retune_figures(df, results / "figures")
    grid_variants = ["none", *METHODS, *BB_METHODS]
    # BackdoorBench's scripts can build the model: its built-ins belong in the table, run or not
    builtins = BB_METHODS if protocol.model == "preactresnet18" else ()
    spec = targets_for(protocol.name)
    missing = missing_inputs(df, root, results, bool(builtins))
    text = "\n\n".join([
        f"# Results: {protocol.name} protocol (model {protocol.model})",
        f"Generated by `python -m bench_scripts.make_table --protocol {protocol.name}"
        + (f" --results {args.results}" if args.results else "") + "` from results.csv "
        "(every number re-measured by evaluate.py on the full clean test set and the record's full poisoned "
        "test set). C-Acc / ASR in %.",
        "## Main table\n\n" + main_table(df, builtins),
        *([section] if (section := retune_section(df)) else []),
        *(["## Not shown\n\n" + missing] if missing else []),
        f"## Targets ({spec.issue})\n\n" + targets(df, root, spec),
        "## Every grid run: RA, DER, feature shift, defense wall time\n\n"
        "feat→target: share of poisoned test images whose penultimate feature is nearest (cosine) to the target "
        "class's centroid of clean test features (a head-free feature-level ASR); feat→true: share nearest to their "
        "own class's centroid; silhouette: cosine silhouette of target-class clean vs poisoned features (> 0: two "
        "clusters).\n\n"
        + detail_table(df, grid_variants),
        "## Ablations\n\n" + (ablation_tables(df) or "(none run)"),
        *(["## Fresh head on frozen features\n\n" + probe] if (probe := fresh_head_table(results)) else []),
        *(["## Where the trigger lives (per stage)\n\n" + stages] if (stages := layers_table(results)) else []),
        "## Figures\n\n" + "\n".join(f"- [figures/{p.name}](figures/{p.name})"
                                       for p in sorted((results / "figures").glob("*.png"))),
        "## Timings and exact commands\n\n" + timings_table(results / "timings.jsonl"),
    ]) + "\n"
    (results / "table.md").write_text(text)
    log.info("wrote %s", results / "table.md")
    return text


if __name__ == "__main__":
    main()
