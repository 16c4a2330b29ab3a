"""The measured figures the campaign's estimates rest on, each with where it was measured.

GPU: the H100 run of 2026-11-25 (``../shared/measurements/h100-2026-11-25/``: README.md and timings.jsonl; the
gpu-fast protocol, PreActResNet18, 5 records and then 5 defenses side by side on one card). The campaign's card
is an H200 (the same GH100 compute, more memory bandwidth), so these are taken as they are, not scaled.
Tiny: the tiny campaign on this project's shared 2-core CPU (``docs/campaign.md``).
"""
from __future__ import annotations

from dataclasses import dataclass

H100 = "h100-2026-11-25"


@dataclass(frozen=True)
class Figure:
    """A measured duration (seconds) and its source."""

    seconds: float
    source: str


# --- H100, 2026-11-25 ---------------------------------------------------------------------------------------
ATTACK_EPOCH_FIVE_SIDE_BY_SIDE = Figure(
    13.2, f"{H100} timings.jsonl: make_record *_0.01_s0 train_s 393.2-396.5 s / 30 epochs, 5 records side by side")
ATTACK_EPOCH_THREE_SIDE_BY_SIDE = Figure(9.0, f"{H100} README: 9 s/epoch each with three records side by side")
ATTACK_EPOCH_ALONE = Figure(8.0, f"{H100} README: 8 s/epoch when one record trains alone")
RECORD_OVERHEAD = Figure(6.9, f"{H100} timings.jsonl: make_record blended-flower wall_s 400.1 - train_s 393.2")
FIVE_MODES = Figure(265.3, f"{H100} timings.jsonl: defense lp/vanilla-ft/fe-tuning/ft-init/fst badnets_0.01_s0 wall_s "
                           "49.0+53.0+53.1+54.9+55.3, 5 records side by side")
FST_DEFENSE = Figure(55.3, f"{H100} timings.jsonl: defense fst badnets_0.01_s0 wall_s 55.3 (10 epochs, 1000 images, "
                           "full test sets every epoch)")
FST_EPOCH_IN_DEFENSE = Figure(3.2, f"{H100} README: FST 31.7 s inside the defense / 10 epochs")
COMPUTE_LIMIT_10_EPOCHS = Figure(2.69, f"{H100} README: compute limit 0.86 s fwd+bwd + 1.82 s eval for 10 epochs")
EVALUATE_PER_MODEL = Figure(0.91, f"{H100} timings.jsonl: evaluate wall_s 27.3 for 30 models")

# --- the CPU grid of issue 21 (ours and 6 built-ins on 6 records, then retune and QRA), 2-core CPU: QRA's cost
# against a retune's and the share of models it attacks (those purified to ASR <= 0.1); QRA never ran on a GPU
CPU_GRID = "bench_results/cpu/builtins/timings.jsonl"
RETUNE_ON_CPU = Figure(38.7, f"{CPU_GRID}: retune wall_s, mean of its 83 retunes")
QRA_ON_CPU = Figure(173.6, f"{CPU_GRID}: qra wall_s, mean of its 11 QRA runs")
QRA_SHARE = 11 / 83   # of the retuned models, those QRA attacked (the same file's runs)

# --- the tiny campaign on the shared 2-core CPU (load average about 12), 2026-12-04: stage walls --------------
TINY = "tiny campaign, 2-core CPU at load 12, 2026-12-04 (state.json wall_s)"
TINY_SMOKE = Figure(47.7, f"{TINY}: smoke 47.7 s")
TINY_SPEED = Figure(34.1, f"{TINY}: speed 34.1 s")
TINY_RECORDS = Figure(60.0, f"{TINY}: records 60.0 s (4 records x 3 epochs, 2 side by side)")
TINY_DEFENSES = Figure(169.2, f"{TINY}: defenses 169.2 s (4 records x 6 runs, 2 side by side)")
TINY_REFERENCE = Figure(29.9, f"{TINY}: reference 29.9 s")
TINY_RETUNE = Figure(56.0, f"{TINY}: retune 56.0 s")
TINY_EVALUATE = Figure(18.6, f"{TINY}: evaluate 18.6 s (29 models)")
TINY_TABLE = Figure(14.1, f"{TINY}: make_table 14.1 s")
