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

# --- the tiny campaign on the shared 2-core CPU (docs/campaign.md) -------------------------------------------
TINY = "tiny campaign, 2-core CPU, 2026-12-04"
TINY_SMOKE = Figure(40.0, f"{TINY}: smoke stage wall")
TINY_SPEED = Figure(20.0, f"{TINY}: speed stage wall")
TINY_RECORD_EPOCH = Figure(2.0, f"{TINY}: make_records epoch of 400 images, preactresnet_small")
TINY_RECORD_OVERHEAD = Figure(8.0, f"{TINY}: make_records process start and record writing")
TINY_DEFENSE = Figure(5.0, f"{TINY}: one defense run (2 epochs, 100 images)")
TINY_EVALUATE_PER_MODEL = Figure(0.5, f"{TINY}: evaluate per model")
TINY_TABLE = Figure(10.0, f"{TINY}: make_table wall")
