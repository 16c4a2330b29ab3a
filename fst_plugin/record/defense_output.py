"""What a defense leaves in ``record/<name>/defense/<method>/`` (paths: :mod:`fst_plugin.record.layout`), in
BackdoorBench's names and formats.

* ``defense_result.pt``: {'model_name', 'num_classes', 'model': CPU state_dict} (BackdoorBench's
  ``save_defense_result``), loadable with ``generate_cls_model`` + ``load_state_dict``;
* ``<method>_df.csv`` (one row per epoch) and ``<method>_df_summary.csv`` (rows last / valid_max /
  exist_nan_value) with BackdoorBench ``ft``'s columns;
* ``loss_metric_plots.png`` and ``acc_like_metric_plots.png``;
* ``log/index.txt`` (clean training indices used) and the timestamped ``log/*.log``;
* ``run_info.json``: seed, package versions, the full resolved config and the before/after metrics.

Every file is written atomically; ``defense_result.pt`` last, so its presence means the run finished.
"""
from __future__ import annotations

import io
import json
import platform
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from fst_plugin.io_utils import atomic_torch_save, atomic_write, atomic_write_text
from fst_plugin.record.layout import PLOT_NAMES, DefenseLayout

CSV_COLUMNS = ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc",
               "clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """BackdoorBench's summary: per column the last value, the max valid value and whether NaN occurred."""
    def column(col: pd.Series) -> pd.Series:
        valid = col[~col.isna()]
        return pd.Series(index=["last", "valid_max", "exist_nan_value"],
                         data=[valid.iloc[-1] if len(valid) else np.nan,
                               pd.to_numeric(col, errors="coerce").max(), bool(col.isna().any())])
    return df.apply(column)


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    with atomic_write(path) as fh:
        fh.write(buffer.getvalue())


def save_plots(df: pd.DataFrame, layout: DefenseLayout, title: str) -> None:
    """BackdoorBench's two figures: losses per epoch, and train acc / C-Acc / ASR / RA per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, columns, ylabel in (
        (PLOT_NAMES[0], {"train_epoch_loss_avg_over_batch": "Train Loss",
                               "clean_test_loss_avg_over_batch": "Test Clean Loss",
                               "bd_test_loss_avg_over_batch": "Test Backdoor Loss"}, "Loss"),
        (PLOT_NAMES[1], {"train_acc": "Train Acc", "test_acc": "Test C-Acc",
                                   "test_asr": "Test ASR", "test_ra": "Test RA"}, "Rate"),
    ):
        fig, ax = plt.subplots(figsize=(8, 6))
        for column, label in columns.items():
            if column in df:
                ax.plot(df["epoch"], df[column], marker="o", linewidth=2, label=label)
        ax.set_xlabel("Epochs")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        _save_figure(fig, layout.plot(name))
        plt.close(fig)


def environment_versions() -> dict[str, str]:
    import torchvision

    from fst_plugin import __version__
    return {"backdoorbench-fst": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "python": platform.python_version()}


def write_defense_outputs(
    layout: DefenseLayout,
    model_name: str,
    num_classes: int,
    state_dict: Mapping[str, torch.Tensor],
    history: Sequence[Mapping[str, Any]],
    run_info: Mapping[str, Any],
    trigger_generator: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write every result file of a finished defense run (``defense_result.pt`` last); ``trigger_generator``:
    the reversed-sample generator's state of a run that unlearned (PAM), as ``trigger_generator.pt``."""
    layout.folder.mkdir(parents=True, exist_ok=True)
    if trigger_generator is not None:
        atomic_torch_save(dict(trigger_generator), layout.trigger_generator)
    df = pd.DataFrame(list(history))
    ordered = [c for c in CSV_COLUMNS if c in df] + [c for c in df if c not in CSV_COLUMNS]
    df = df[ordered]
    atomic_write_text(layout.csv, df.to_csv())  # with the index column, as BackdoorBench
    atomic_write_text(layout.summary_csv, summarise(df).to_csv())
    save_plots(df, layout, f"{layout.method} on {layout.folder.parent.parent.name}")
    atomic_write_text(layout.run_info, json.dumps(
        {**run_info, "versions": environment_versions()}, indent=2, default=str))
    atomic_torch_save({"model_name": model_name, "num_classes": int(num_classes),
                       "model": {k: v.detach().cpu() for k, v in state_dict.items()}},
                      layout.result)
