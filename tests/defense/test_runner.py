"""fst_plugin.defense.runner used directly, as the benchmark does: a typed config in, prepare (nothing written),
run (the outputs), and no empty checkpoint/ folder left behind by a finished run."""
from __future__ import annotations

from pathlib import Path

from fst_plugin.defense.config import build_config
from fst_plugin.defense.runner import prepare, run
from fst_plugin.record import load_attack_record
from fst_plugin.record.layout import DefenseLayout
from tests.builders import TinyBB


def _config(ws: TinyBB, **more: object):
    return build_config({"record": str(ws.record), "dataset_path": str(ws.data), "device": "cpu",
                         "num_workers": 0, "epochs": 2, "ratio": 0.25, **more})


def test_prepare_writes_nothing_and_run_leaves_no_checkpoint_folder(fresh_bb: TinyBB) -> None:
    plan = prepare(_config(fresh_bb), load_attack_record(fresh_bb.record), "lp")
    layout = DefenseLayout.of(fresh_bb.record.resolve(), "lp")
    assert plan.layout == layout and plan.checkpoint.parent == layout.checkpoint_dir
    assert not (fresh_bb.record / "defense").exists()
    epochs_seen = []
    result = run(plan, on_epoch_end=lambda state: epochs_seen.append(state.epochs_done))
    assert epochs_seen == [1, 2] and [row["epoch"] for row in result.history] == [0, 1]
    assert layout.finished and layout.index.is_file()
    assert not layout.checkpoint_dir.exists(), "a finished run leaves no (empty) checkpoint/ folder"
    assert 0 < result.tuning_time_s <= result.wall_time_s


def test_a_checkpoint_folder_of_the_users_stays(fresh_bb: TinyBB, tmp_path: Path) -> None:
    mine = tmp_path / "my_checkpoints"
    config = _config(fresh_bb, epochs=1, checkpoint_save=str(mine))
    run(prepare(config, load_attack_record(fresh_bb.record), "lp"))
    assert mine.is_dir() and not any(mine.iterdir())  # the checkpoint is gone, the folder the user named is not
    assert not DefenseLayout.of(fresh_bb.record, "lp").checkpoint_dir.exists()
