"""Where records and a defense's outputs live below a BackdoorBench root: the one module that spells these paths.

A root holds its records as ``record/<record>/`` (``record_dir``), each finished when its ``attack_result.pt``
exists. ``record/<record>/defense/<name>/`` holds, in BackdoorBench's names, ``defense_result.pt``,
``<method>_df.csv``, ``<method>_df_summary.csv``, the two plots, ``run_info.json``, ``checkpoint/last.pt`` (while a run is
unfinished), ``log/<timestamp>.log`` and ``log/index.txt``; ``retune/`` is kept for re-tuning runs and ``retune/qra/`` for the
query-based reactivation attack that needs the retuned model (fst_plugin.probes.qra). ``<name>`` is
the method, or a variant's own name (an ablation) so variants never overwrite each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RECORDS_FOLDER = "record"
ATTACK_RESULT_NAME = "attack_result.pt"  # BackdoorBench's attack record: the model, its data and its poisoning
DEFENSE_FOLDER = "defense"
RESULT_NAME = "defense_result.pt"
RUN_INFO_NAME = "run_info.json"
GENERATOR_NAME = "trigger_generator.pt"  # PAM's reversed-sample generator, saved with the result
CHECKPOINT_FOLDER, CHECKPOINT_NAME = "checkpoint", "last.pt"
INVERSION_CHECKPOINT_NAME = "inversion.pt"  # PAM's trigger inversion part-way (beside last.pt)
LOG_FOLDER, INDEX_NAME = "log", "index.txt"
RETUNE_FOLDER, RETUNE_RESULT_NAME = "retune", "retune_result.pt"
QRA_FOLDER, QRA_RESULT_NAME = "qra", "qra_result.pt"  # inside RETUNE_FOLDER: QRA reads the retuned model
PLOT_NAMES = ("loss_metric_plots", "acc_like_metric_plots")


def records_dir(root: Path) -> Path:
    """``<root>/record/``: the records below a BackdoorBench root (its own checkout, or any folder shaped like it)."""
    return Path(root) / RECORDS_FOLDER


def record_dir(root: Path, name: str) -> Path:
    """``<root>/record/<name>/``: record ``name``'s folder, which BackdoorBench's ``--result_file name`` reads."""
    return records_dir(root) / name


def attack_result(record_dir: Path) -> Path:
    """``<record>/attack_result.pt``, written last, so a record is finished when it exists."""
    return Path(record_dir) / ATTACK_RESULT_NAME


def is_finished(record_dir: Path) -> bool:
    """Whether the record in ``record_dir`` is finished: its ``attack_result.pt`` exists."""
    return attack_result(record_dir).is_file()


def finished_records(root: Path) -> list[Path]:
    """Every finished record below a root (``<root>/record/*``), sorted by name."""
    return sorted(p for p in records_dir(root).glob("*") if is_finished(p))


def is_defense_name(name: str) -> bool:
    """Whether ``name`` can only name a folder directly under ``defense/`` (no separator, no '.', '..' or NUL)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in ("/", "\\", "\x00"))


def defenses_dir(record_dir: Path) -> Path:
    """``record/<record>/defense/``: every defense's outputs, ours and BackdoorBench's built-ins."""
    return Path(record_dir) / DEFENSE_FOLDER


def defense_results(record_dir: Path) -> list[Path]:
    """Every finished defense's ``defense_result.pt`` in the record, sorted by defense name."""
    return sorted(defenses_dir(record_dir).glob(f"*/{RESULT_NAME}"))


@dataclass(frozen=True)
class DefenseLayout:
    """The files of one defense run: ``folder`` = ``record/<record>/defense/<name>/``; ``method`` names the CSVs."""

    folder: Path
    method: str

    @classmethod
    def of(cls, record_dir: Path, name: str, method: Optional[str] = None) -> "DefenseLayout":
        """The layout of defense ``name`` in ``record_dir`` (``method``, when a variant's name differs from it)."""
        return cls(defenses_dir(record_dir) / name, method or name)

    @property
    def result(self) -> Path:
        return self.folder / RESULT_NAME

    @property
    def trigger_generator(self) -> Path:
        return self.folder / GENERATOR_NAME

    @property
    def finished(self) -> bool:
        """``defense_result.pt`` is written last, so its presence means the run finished."""
        return self.result.is_file()

    @property
    def csv(self) -> Path:
        return self.folder / f"{self.method}_df.csv"

    @property
    def summary_csv(self) -> Path:
        return self.folder / f"{self.method}_df_summary.csv"

    def plot(self, name: str) -> Path:
        return self.folder / f"{name}.png"

    @property
    def run_info(self) -> Path:
        return self.folder / RUN_INFO_NAME

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / CHECKPOINT_FOLDER

    @property
    def log_dir(self) -> Path:
        return self.folder / LOG_FOLDER

    @property
    def index(self) -> Path:
        return index_file(self.log_dir)

    @property
    def retune_dir(self) -> Path:
        return self.folder / RETUNE_FOLDER

    @property
    def retune_result(self) -> Path:
        """The retuned model, written last (its presence means the retune finished)."""
        return self.retune_dir / RETUNE_RESULT_NAME

    @property
    def retune_info(self) -> Path:
        """The retuning run's ``run_info.json`` (its settings and the poisoned images it used)."""
        return self.retune_dir / RUN_INFO_NAME

    @property
    def qra_dir(self) -> Path:
        """The query-based reactivation attack's outputs, next to the retuned model it distils from."""
        return self.retune_dir / QRA_FOLDER

    @property
    def qra_result(self) -> Path:
        """QRA's generator weights, written last (its presence means the attack finished)."""
        return self.qra_dir / QRA_RESULT_NAME


def checkpoint_file(checkpoint_dir: Path) -> Path:
    """The resumable state in a checkpoint folder (the default one, or ``--checkpoint_save``)."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def inversion_checkpoint_file(checkpoint: Path) -> Path:
    """PAM's trigger-inversion round under way, beside the epoch checkpoint ``checkpoint`` (hours on a CPU, so it is
    saved within the round, not only at epoch ends)."""
    return Path(checkpoint).parent / INVERSION_CHECKPOINT_NAME


def index_file(log_dir: Path) -> Path:
    """The clean training indices a run used, in its log folder (the default one, or ``--log``)."""
    return Path(log_dir) / INDEX_NAME
