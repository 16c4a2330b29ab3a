"""The tables of ``table.md`` built from results.csv: the paper-style main table (rows attack × rate, columns
C-Acc / ASR per method, average and std rows), every grid run's RA / DER / feature shift, the ablations, the
timings of every step, and what the tables could not show."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from bench_scripts.common import KEYED_ATTACKS
from bench_scripts.defenses.ablations import LONGER_VARIANT, SIZE_VARIANT
from bench_scripts.protocols import BB_METHODS, METHODS, PAM_VARIANTS, REINIT_METHODS
from fst_plugin.record.layout import record_dir

LABELS = {"none": "No defense", "lp": "LP", "vanilla-ft": "Vanilla FT", "fe-tuning": "FE-tuning",
          "ft-init": "FT-init", "fst": "FST", "pam": "PAM", "fst-pam": "FST + PAM",
          **{m: f"BB {m}" for m in BB_METHODS}, "clean-reference": "Clean reference"}
OURS = ("none", *METHODS, *PAM_VARIANTS)  # the main table's columns; the built-ins have their side-by-side section
LOW_RATE = 0.01  # the paper's claims are about the low-rate records (rate <= 1%)
PERCENT = {"test_acc": "C-Acc", "test_asr": "ASR", "test_ra": "RA"}  # results.csv column -> table column (in %)


def pct(x: float) -> str:
    return "–" if pd.isna(x) else f"{100 * x:.2f}"


def attack_label(attack: str, key: Optional[str] = None, noise_key: bool = False) -> str:
    """``blended``, or ``blended (flower key)`` for a Blended record keyed by an image file; with ``noise_key`` a
    Blended record without an image key is ``blended (noise key)`` (where the two kinds are told apart)."""
    if isinstance(key, str) and key:
        return f"{attack} ({key} key)"
    return f"{attack} (noise key)" if noise_key and attack in KEYED_ATTACKS else attack


def row_label(attack: str, rate: float, key: Optional[str] = None) -> str:
    """``blended 1%``, or ``blended (flower key) 1%`` for a Blended record keyed by an image file."""
    return f"{attack_label(attack, key)} {100 * rate:g}%"


def per_record_lines(grid: pd.DataFrame, methods: list[str], heads: Callable[[str], str],
                     cells: Callable[[float, str, Optional[pd.Series]], list[str]]) -> list[str]:
    """A record × method table: the header (``heads(method)`` names a method's two columns), the rule and one
    row per record, sorted by attack, trigger key and rate; ``cells(rate, method, run)`` gives a method's two
    cells (``run``: the record's results.csv row of that method, None where it was not run)."""
    if "trigger_key" not in grid:  # results.csv written before image-keyed Blended records existed
        grid = grid.assign(trigger_key=None)
    records = (grid.drop_duplicates("record").sort_values(["attack", "trigger_key", "rate"], na_position="first")
               [["record", "attack", "trigger_key", "rate"]])
    lines = ["| attack, rate | " + " | ".join(heads(m) for m in methods) + " |", "|" + "---|" * (1 + 2 * len(methods))]
    for rec in records.itertuples():
        row = []
        for m in methods:
            hit = grid[(grid["record"] == rec.record) & (grid["variant"] == m)]
            row += cells(rec.rate, m, hit.iloc[0] if len(hit) else None)
        lines.append(f"| {row_label(rec.attack, rec.rate, rec.trigger_key)} | " + " | ".join(row) + " |")
    return lines


def main_table(df: pd.DataFrame) -> str:
    """Records × our modes (C-Acc / ASR), with the average and std rows over the low-rate records and all."""
    methods = [m for m in OURS if m in set(df["variant"])]
    values: dict[str, list[list[float]]] = {m: [] for m in methods}

    def cells(rate: float, m: str, run: Optional[pd.Series]) -> list[str]:
        acc, asr = (run["test_acc"], run["test_asr"]) if run is not None else (np.nan, np.nan)
        values[m].append([acc, asr, rate])
        return [pct(acc), pct(asr)]

    lines = per_record_lines(df[df["variant"].isin(methods)], methods,
                             lambda m: f"{LABELS[m]} C-Acc | {LABELS[m]} ASR", cells)
    for name, keep in ((f"average, rate ≤ {100 * LOW_RATE:g}%", lambda r: r <= LOW_RATE), ("average, all", lambda r: True)):
        for stat in ("mean", "std"):
            row = []
            for m in methods:
                arr = np.array([v for v in values[m] if keep(v[2])], dtype=float).reshape(-1, 3)
                for col in (0, 1):
                    col_vals = arr[:, col][~np.isnan(arr[:, col])]
                    ok = len(col_vals) > (1 if stat == "std" else 0)
                    val = (col_vals.mean() if stat == "mean" else col_vals.std(ddof=1)) if ok else np.nan
                    row.append(pct(val))
            label = name if stat == "mean" else name.replace("average", "std")
            lines.append(f"| **{label}** | " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail_table(df: pd.DataFrame, variants: list[str]) -> str:
    cols = ["record", "variant", "test_acc", "test_asr", "test_ra", "der", "feat_target_share", "feat_true_share",
            "sep_silhouette", "defense_wall_s"]
    sub = df[df["variant"].isin(variants)][cols].copy()
    for c in PERCENT:
        sub[c] = (100 * sub[c]).round(2)
    for c in ("der", "feat_target_share", "feat_true_share", "sep_silhouette"):
        sub[c] = sub[c].round(3)
    sub = sub.rename(columns={**PERCENT, "der": "DER", "feat_target_share": "feat→target",
                              "feat_true_share": "feat→true", "sep_silhouette": "silhouette",
                              "defense_wall_s": "wall s"})
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
        alpha = alpha.sort_values(["record", "alpha"])[["record", "alpha", *PERCENT]].copy()
        alpha[list(PERCENT)] = (100 * alpha[list(PERCENT)]).round(2)
        parts.append("### α sweep (FST)\n\n" + alpha.rename(columns=PERCENT).to_markdown(index=False))
    size = df[df["variant"].str.contains(SIZE_VARIANT) | df["variant"].isin(REINIT_METHODS)].copy()
    if size["variant"].str.contains(SIZE_VARIANT).any():
        size = size[size["record"].isin(size[size["variant"].str.contains(SIZE_VARIANT)]["record"])]
        table = size.pivot_table(index=["record", "n_clean"], columns="method", values=["test_acc", "test_asr"])
        table = (100 * table).round(2)
        table.columns = [f"{m} {PERCENT[v]}" for v, m in table.columns]
        parts.append("### Tuning-set size (clean images)\n\n" + table.reset_index().to_markdown(index=False))
    longer = df[df["variant"].str.contains(LONGER_VARIANT)]
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


def timings_table(path: Path) -> str:
    if not path.is_file():
        return "(no timings.jsonl)"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    keep = [c for c in ("finished", "step", "wall_s", "train_s", "defense_wall_s", "test_acc", "test_asr", "command") if c in df]
    return df[keep].to_markdown(index=False)


def missing_inputs(df: pd.DataFrame, root: Path, results: Path) -> str:
    """What the tables and figures could not show, and why: absent record folders (efficiency curves, the
    epoch-3 target, t-SNE) and BackdoorBench built-ins that were not run."""
    lines = []
    records = sorted(df["record"].unique())
    absent = [r for r in records if not record_dir(root, r).is_dir()]
    if absent:
        lines.append(f"- Record folders absent (`<cache>/{root.name}/record/`: {', '.join(absent)}): no per-epoch "
                     "efficiency figures and no epoch-3 check for them (they read the defenses' per-epoch CSVs).")
    no_tsne = [r for r in records if not (results / "figures" / f"tsne_{r}.png").is_file()]
    if no_tsne:
        lines.append(f"- No t-SNE figure for {', '.join(no_tsne)} (`diagnostics.py` needs the record folder).")
    not_run = [LABELS[m] for m in BB_METHODS if m not in set(df["variant"])]
    if not_run:
        lines.append(f"- {', '.join(not_run)}: not run on these records (`run_defenses --backdoorbench`).")
    return "\n".join(lines)
