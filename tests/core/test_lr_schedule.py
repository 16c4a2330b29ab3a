"""The tuning loop's learning-rate schedule: cosine (the defenses') or constant (the retuning attack's protocol)."""
from __future__ import annotations

import pytest

from fst_plugin.core import TuningConfig, TuningRun, find_head, get_mode
from tests.core.test_core import TinyNet, batches


@pytest.mark.parametrize("schedule, stays", [("constant", True), ("cosine", False)])
def test_the_constant_schedule_keeps_the_learning_rate_and_cosine_anneals_it(schedule: str, stays: bool) -> None:
    model = TinyNet()
    run = TuningRun(model, find_head(model, 4), get_mode("vanilla-ft"),
                    TuningConfig(epochs=3, lr=0.05, lr_schedule=schedule, show_progress=False))
    run.restore(None)
    for epoch in range(2):
        run.train_epoch(batches(1), epoch)
    assert (run.optimizer.param_groups[0]["lr"] == 0.05) == stays


def test_an_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        TuningConfig(lr_schedule="step")
