"""Our modes and BackdoorBench's built-ins side by side on the low-rate records (issue 21): C-Acc, ASR, ASR after
the retuning attack and each defense's wall time, a built-in that could not run shown with its reason, and the
figure of ASR before → after retuning for every defense."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from bench_scripts.protocols import BB_METHODS, METHODS, PAM_VARIANTS
from bench_scripts.report.figures import pyplot, save
from bench_scripts.report.tables import LABELS, LOW_RATE, attack_label, pct, row_label

DEFENSES = (*METHODS, *PAM_VARIANTS, *BB_METHODS)
FIGURE = "side_by_side_retune.png"


def _low_rate(df: pd.DataFrame) -> pd.DataFrame:
    """The low-rate poisoned records' rows (the clean reference's record, rate 0, is not one)."""
    rate = pd.to_numeric(df["rate"], errors="coerce")
    return df[(rate > 0) & (rate <= LOW_RATE)]


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs else pd.Series(np.nan, index=runs.index)


def _why(status: str, reason: object) -> str:
    """``status: reason``, or the reason alone where it says the status already ("exceeded the 30-min cap")."""
    if not isinstance(reason, str) or not reason:
        return status
    return reason if reason.startswith(status.split()[0]) else f"{status}: {reason}"


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per defense (ours, then every built-in, run or not): over the low-rate records it ran on, the mean
    C-Acc, ASR, retuned ASR (fractions) and wall time (s), how many records it ran on, and why it did not on the
    others (its runner's reasons, and on how many records it was never attempted)."""
    low = _low_rate(df)
    n_records = low["record"].nunique()
    rows = []
    for defense in DEFENSES:
        runs = low[low["variant"] == defense]
        ran = runs[runs["test_acc"].notna()]
        reasons = sorted({_why(status, reason) for status, reason in
                          zip(_column(runs, "bb_status"), _column(runs, "bb_reason"))
                          if isinstance(status, str) and status != "ok"})
        unattempted = n_records - runs["record"].nunique()   # records without a row: never started, not refused
        if unattempted and (reasons or len(ran)):
            reasons.append(f"not attempted on {unattempted} record{'s' * (unattempted > 1)}")
        rows.append({"defense": defense, "source": "BackdoorBench" if defense in BB_METHODS else "fst_plugin",
                     "records": f"{ran['record'].nunique()}/{n_records}", "test_acc": ran["test_acc"].mean(),
                     "test_asr": ran["test_asr"].mean(), "retune_asr": _column(ran, "retune_asr").mean(),
                     "wall_s": _column(ran, "defense_wall_s").mean(),
                     "not_run": "; ".join(reasons) if reasons else ("" if len(ran) else "not run")})
    return pd.DataFrame(rows)


def leaders(df: pd.DataFrame) -> list[dict]:
    """Over all low-rate records, then per attack (and Blended key): the defense with the lowest mean ASR and the
    one with the lowest mean ASR after retuning, each with its mean C-Acc and its cost against no defense (points).
    Only defenses that ran on every record of the group compete, so each mean is over the same records."""
    low = _low_rate(df)
    ran = low[low["variant"].isin(DEFENSES) & low["test_acc"].notna()]
    baseline = low[low["variant"] == "none"].drop_duplicates("record").set_index("record")["test_acc"]
    keys = _column(low, "trigger_key")
    groups = [("every low-rate record", sorted(low["record"].unique()))]
    groups += [(attack_label(attack, key, noise_key=True), sorted(part["record"].unique()))
               for (attack, key), part in low.assign(key=keys.fillna("")).groupby(["attack", "key"], sort=True)]
    rows = []
    for name, records in groups:
        part = ran[ran["record"].isin(records)]
        complete = part.groupby("variant").filter(lambda runs: runs["record"].nunique() == len(records))
        if complete.empty:
            continue
        means = (complete.assign(retune_asr=_column(complete, "retune_asr"))
                 .groupby("variant")[["test_acc", "test_asr", "retune_asr"]].mean())
        reference = baseline.reindex(records).mean()
        row = {"group": name, "records": len(records)}
        for column in ("test_asr", "retune_asr"):
            scored = means[means[column].notna()]
            if scored.empty:
                continue
            best = scored[column].idxmin()
            row[column] = (best, scored.loc[best, column], scored.loc[best, "test_acc"],
                           reference - scored.loc[best, "test_acc"])
        rows.append(row)
    return rows


def _leader_cell(entry: Optional[tuple]) -> str:
    if entry is None:
        return "–"
    defense, asr, acc, cost = entry
    return f"{LABELS[defense]}: ASR {pct(asr)}, C-Acc {pct(acc)} ({-100 * cost:+.2f})"


def side_by_side_section(df: pd.DataFrame) -> Optional[str]:
    """The section's Markdown, or None when the results hold no low-rate record."""
    low = _low_rate(df)
    if low.empty:
        return None
    table = summary(df)
    lines = ["| defense | source | low-rate records | C-Acc | ASR | ASR after retuning | wall s | not run: why |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        wall = "–" if pd.isna(r.wall_s) else f"{r.wall_s:.0f}"
        lines.append(f"| {LABELS[r.defense]} | {r.source} | {r.records} | {pct(r.test_acc)} | {pct(r.test_asr)} | "
                     f"{pct(r.retune_asr)} | {wall} | {r.not_run or ''} |")
    records = low.drop_duplicates("record").sort_values(["attack", "rate"])
    per_record = ["| defense | " + " | ".join(row_label(r.attack, r.rate, r.trigger_key if "trigger_key" in low
                                                           else None) for r in records.itertuples()) + " |",
                  "|---|" + "---|" * len(records)]
    for defense in ("none", *DEFENSES):
        cells = []
        for record in records["record"]:
            hit = low[(low["record"] == record) & (low["variant"] == defense) & low["test_acc"].notna()]
            run = hit.iloc[0] if len(hit) else None
            cells.append("–" if run is None else
                         f"{pct(run.test_acc)} / {pct(run.test_asr)} → {pct(run.get('retune_asr', np.nan))}")
        per_record.append(f"| {LABELS[defense]} | " + " | ".join(cells) + " |")
    best = ["| records | lowest ASR | lowest ASR after retuning |", "|---|---|---|"]
    best += [f"| {row['group']} ({row['records']}) | {_leader_cell(row.get('test_asr'))} | "
             f"{_leader_cell(row.get('retune_asr'))} |" for row in leaders(df)]
    return ("## Side by side with BackdoorBench's built-ins (low-rate records)\n\n"
            "Every defense on the same records, measured by the same evaluator; BackdoorBench's built-ins ran with "
            "its own scripts and cifar10.yaml (`run_defenses --backdoorbench`; clean ratio, epoch caps and time "
            "caps in bench_scripts/protocols.py BUILTINS). ASR after retuning: the same retuning attack, poisoned "
            "images and clean reference for every model (`evaluate --retune`). Means over the low-rate records "
            f"each defense ran on (C-Acc / ASR in %, wall time of the defense in s). Figure: [figures/{FIGURE}]"
            f"(figures/{FIGURE}).\n\n" + "\n".join(lines)
            + "\n\nWhich defense leads (means over the records, among the defenses that ran on all of them; in "
            "brackets the C-Acc change against the backdoored model, in points):\n\n" + "\n".join(best)
            + "\n\nPer record: C-Acc / ASR → ASR after retuning (%).\n\n" + "\n".join(per_record))


def side_by_side_figure(df: pd.DataFrame, out: Path) -> Optional[str]:
    """Mean low-rate ASR before (grey) → after retuning (red) for every defense that ran, its wall time beside its
    name."""
    table = summary(df)
    table = table[table["test_asr"].notna()]
    if table.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(0.9 * len(table) + 2.5, 4.5))
    x = np.arange(len(table))
    ax.scatter(x, 100 * table["test_asr"], color="grey", label="ASR after the defense", zorder=3)
    ax.scatter(x, 100 * table["retune_asr"], color="tab:red", label="ASR after retuning", zorder=3)
    for xi, (a, b) in enumerate(zip(table["test_asr"], table["retune_asr"])):
        if not pd.isna(b):
            ax.annotate("", xy=(xi, 100 * b), xytext=(xi, 100 * a), arrowprops=dict(arrowstyle="->", color="tab:red"))
    names = [f"{LABELS[d]}\n{'' if pd.isna(w) else f'{w:.0f} s'}" for d, w in zip(table["defense"], table["wall_s"])]
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean ASR over the low-rate records (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("ASR before → after retuning, ours and BackdoorBench's (wall time under each name)", fontsize=10)
    out.mkdir(parents=True, exist_ok=True)
    return save(fig, out / FIGURE)
