"""Each protocol's targets (the issue that set them), checked one by one on what was measured, or said to be
unmeasured."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from bench_scripts.protocols import ALPHA_VARIANTS
from bench_scripts.report.figures import epoch_curves
from bench_scripts.report.tables import LOW_RATE, pct
from fst_plugin.record.layout import record_dir


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
    """Issue 10's paper-scale targets for the gpu protocols, issue 3's for the others."""
    return PAPER_SCALE_TARGETS if protocol_name.startswith("gpu") else CPU_TARGETS


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
    curve = epoch_curves(record_dir(root, rec), "fst") if rec else None
    at3 = curve[curve["epoch"] == 3]["test_asr"] if curve is not None else None
    if at3 is not None and len(at3):
        first = curve[(curve["epoch"] > 0) & (curve["test_asr"] <= 0.02)]["epoch"]
        lines.append(f"- FST ASR ≤ 2% by epoch 3 of 10 on BadNets 1% (per-epoch subset): epoch-3 ASR {pct(at3.iloc[0])}%, "
                     f"first epoch ≤ 2%: {int(first.iloc[0]) if len(first) else 'never'} → "
                     f"{'MET' if at3.iloc[0] <= 0.02 else 'MISSED'}")
    elif curve is not None:   # a run shorter than the target's 3 epochs
        lines.append(f"- FST ASR ≤ 2% by epoch 3 on BadNets 1%: not measured (FST ran {int(curve['epoch'].max())} "
                     "epochs)")
    else:
        lines.append("- FST ASR ≤ 2% by epoch 3 on BadNets 1%: not measured")
    return "\n".join(lines)


# issue 27, point 4: FST with alpha auto keeps C-Acc within this of FT-init's, with ASR at most ALPHA_AUTO_MAX_ASR
ALPHA_AUTO_MAX_GAP = 0.015
ALPHA_AUTO_MAX_ASR = 0.02


def alpha_auto_section(df: pd.DataFrame) -> Optional[str]:
    """FST with its α chosen per model (``ALPHA_VARIANTS``: alpha auto, a fixed strength) against FT-init (the same
    re-initialisation without the penalty) and FST at the paper's α, one row per record and choice, checked against
    issue 27's point 4; None where no such run exists."""
    chosen = df[df["variant"].isin(list(ALPHA_VARIANTS))]
    if not len(chosen):
        return None
    lines = ["| record | FT-init C-Acc / ASR | FST, paper's α: C-Acc / ASR | FST, α chosen: variant, α, C-Acc / ASR "
             "| below FT-init, points | ASR after retuning: FT-init / paper's α / chosen | QRA chosen | wall s "
             "| point 4 |", "|" + "---|" * 9]
    met: dict[str, list[bool]] = {}
    for run in chosen.sort_values(["attack", "trigger_key", "rate", "variant"], na_position="first").itertuples():
        def of(variant: str) -> Optional[pd.Series]:
            hit = df[(df["record"] == run.record) & (df["variant"] == variant)]
            return hit.iloc[0] if len(hit) else None

        init, paper, this = of("ft-init"), of("fst"), of(run.variant)
        # results.csv keeps 4 decimals: round so that a gap of exactly 1.5 points counts as within
        gap = round(init.test_acc - run.test_acc, 6) if init is not None else np.nan
        ok = bool(gap <= ALPHA_AUTO_MAX_GAP and run.test_asr <= ALPHA_AUTO_MAX_ASR) if init is not None else None
        if ok is not None:
            met.setdefault(run.variant, []).append(ok)
        pair = lambda r: f"{pct(r.test_acc)} / {pct(r.test_asr)}" if r is not None else "–"  # noqa: E731
        retuned = " / ".join(pct(r.get("retune_asr", np.nan)) if r is not None else "–" for r in (init, paper, this))
        lines.append(f"| {run.record} | {pair(init)} | {pair(paper)} | {run.variant}, {run.alpha:.4g}, {pair(run)} | "
                     f"{'–' if pd.isna(gap) else f'{100 * gap:.2f}'} | {retuned} | "
                     f"{pct(getattr(run, 'qra_asr', np.nan))} | {run.defense_wall_s:.0f} | "
                     f"{'–' if ok is None else ('MET' if ok else 'MISSED')} |")
    lines.append("")
    lines += [f"Point 4 for {variant}: C-Acc within {100 * ALPHA_AUTO_MAX_GAP:g} points of FT-init's and ASR ≤ "
              f"{100 * ALPHA_AUTO_MAX_ASR:g}% on {sum(oks)} of {len(oks)} records with both runs." for variant, oks in met.items()]
    return "\n".join(lines)
