"""FST, FE-tuning, FT-init, LP, vanilla FT and PAM as BackdoorBench defenses: BackdoorBench's face, nothing else.

Laid out as BackdoorBench's own ``defense/ft.py``: ``add_arguments(parser)``, ``__init__(args)`` (the yaml merged
with the command line, the command line wins), ``set_result(result_file)``, ``set_logger()``, ``mitigation()`` and
``defense(result_file)``; a subclass of BackdoorBench's ``defense.base.defense`` when imported inside a checkout
(a stand-in with the same method names otherwise). The settings become a typed
:class:`~fst_plugin.defense.config.DefenseConfig` once, in ``__init__``: without ``--yaml_path`` from the yaml this
package ships for the method on the record's dataset (:func:`~fst_plugin.defense.shipped.resolve_settings`), so a
run is never silently on the generic defaults; the work is the runner's
(:mod:`fst_plugin.defense.runner`). All six share :class:`TuningDefense`; a subclass only names its tuning mode.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.handlers
import sys
import time
from pathlib import Path
from pprint import pformat
from typing import Any, ClassVar, Mapping, Optional

from fst_plugin.defense.backend import backdoorbench_root
from fst_plugin.defense.config import DefenseConfig, add_arguments, load_config, overrides_from
from fst_plugin.defense.runner import DefenseResult, prepare, record_folder, run
from fst_plugin.defense.shipped import Settings, resolve_settings
from fst_plugin.distributed import world_from_env
from fst_plugin.record import AttackRecord, load_attack_record

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s [%(levelname)-8s] [%(filename)s:%(lineno)d] %(message)s"
LOG_DATEFMT = "%Y-%m-%d:%H:%M:%S"


class DefenseBase:
    """Stand-in for BackdoorBench's ``defense.base.defense`` (same method names) outside a checkout."""

    def set_result(self, result_file: str) -> None: ...
    def set_trainer(self, *args: Any) -> None: ...
    def set_logger(self) -> None: ...
    def denoising(self) -> None: ...
    def mitigation(self) -> Any: ...
    def inhibition(self) -> None: ...
    def defense(self, result_file: str) -> Any: ...
    def detect(self) -> None: ...


def _defense_base() -> type:
    """BackdoorBench's base class when running inside a checkout, else the stand-in."""
    root = backdoorbench_root()
    if root is not None:
        if str(root) not in sys.path:
            sys.path.append(str(root))
        try:
            from defense.base import defense as backdoorbench_defense  # type: ignore
            return backdoorbench_defense
        except ImportError:
            pass
    return DefenseBase


class BufferedLog:
    """BackdoorBench's log: its format on the console, and a timestamped file in the run's log folder. The file
    opens only once outputs may be written; until then the records wait in memory, so a rejected run leaves no
    log file (nor anything else) behind."""

    def __init__(self) -> None:
        self.buffer: Optional[logging.handlers.MemoryHandler] = None
        self.file: Optional[logging.FileHandler] = None

    def start(self) -> None:
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        formatter = logging.Formatter(fmt=LOG_FORMAT, datefmt=LOG_DATEFMT)
        if not any(type(h) is logging.StreamHandler for h in root.handlers):
            console = logging.StreamHandler()
            console.setFormatter(formatter)
            if not world_from_env().is_main:  # under torchrun only rank 0 tells the story (warnings still show)
                console.setLevel(logging.WARNING)
            root.addHandler(console)
        if self.buffer is None:
            self.buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
            self.buffer.setFormatter(formatter)
            root.addHandler(self.buffer)

    def to_file(self, log_dir: Path) -> None:
        """From now on into ``log_dir/<timestamp>.log``, the buffered records first."""
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_dir / (time.strftime("%Y_%m_%d_%H_%M_%S", time.localtime()) + ".log"))
        handler.setFormatter(logging.Formatter(fmt=LOG_FORMAT, datefmt=LOG_DATEFMT))
        if self.buffer is not None:
            self.buffer.setTarget(handler)
            self.buffer.flush()
            logging.getLogger().removeHandler(self.buffer)
            self.buffer = None
        logging.getLogger().addHandler(handler)
        self.file = handler

    def close(self) -> None:
        """Detach this run's handlers (a rejected run's buffer is dropped: nothing was written)."""
        root = logging.getLogger()
        for handler in (self.buffer, self.file):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
        self.buffer = self.file = None


class TuningDefense(_defense_base()):  # type: ignore[misc]
    """One BackdoorBench defense per tuning mode; subclasses set ``method``."""

    method: ClassVar[str] = "fst"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """BackdoorBench ft's arguments (same names) plus FST's, one per config key (see fst_plugin.defense.config)."""
        add_arguments(parser)

    def __init__(self, args: argparse.Namespace | Mapping[str, Any] | DefenseConfig) -> None:
        """``args``: what BackdoorBench's parser read (with :meth:`add_arguments`), a mapping of config keys (the
        Python API), or a config built elsewhere. The first two are overrides: on ``--yaml_path``, else on the
        yaml shipped for this method on the record's dataset (the record is read here, once, to know it). Either
        way the settings are a validated :class:`DefenseConfig` from here on."""
        self.result: Optional[AttackRecord] = None
        self.logs = BufferedLog()
        if isinstance(args, DefenseConfig):
            settings = Settings(args, f"settings: {args.yaml_path or 'the DefenseConfig defaults'} (a "
                                      f"DefenseConfig built by the caller)")
        else:
            overrides = overrides_from(args) if isinstance(args, argparse.Namespace) else dict(args)
            settings = resolve_settings(self.method, overrides, self._record_dataset(overrides))
        self.config = dataclasses.replace(settings.config, terminal_info=list(sys.argv))
        self.settings_origin = settings.origin
        if self.config.result_file or self.config.record:
            self.set_result(self.config.result_file)

    def _record_dataset(self, overrides: Mapping[str, Any]) -> Optional[str]:
        """The record's dataset when no yaml is given (its shipped yaml depends on it), else None; the record
        read stays in ``self.result`` for the run."""
        if overrides.get("yaml_path"):
            return None
        where = load_config({key: overrides.get(key) for key in ("record", "result_file", "trust_record")})
        if not (where.record or where.result_file):
            return None  # refused by resolve_settings: nothing names the record
        self.result = load_attack_record(record_folder(where).resolve(), trust=where.trust_record)
        return self.result.clean_data

    def set_result(self, result_file: Optional[str]) -> None:
        """Load and validate the attack record (writes nothing)."""
        folder = record_folder(self.config, result_file).resolve()
        if self.result is None or self.result.record_dir != folder:
            self.result = load_attack_record(folder, trust=self.config.trust_record)

    def set_logger(self) -> None:
        """BackdoorBench's log format on the console; the log file opens once outputs may be written."""
        self.logs.start()
        log.info(self.settings_origin)
        log.info(pformat(self.config.to_dict()))
        if self.config.trust_record:
            log.warning("--trust-record is ON: records and checkpoints are fully unpickled and can run code")

    def mitigation(self) -> DefenseResult:
        """Plan (every check, nothing written), open the log file on the rank that writes, run."""
        try:
            if self.result is None:
                self.set_result(None)
            plan = prepare(self.config, self.result, self.method)
            if plan.world.is_main:
                self.logs.to_file(plan.log_dir)
            else:
                self.logs.close()  # the buffered log of a rank that writes nothing
            return run(plan)
        finally:
            self.logs.close()

    def defense(self, result_file: Optional[str] = None) -> DefenseResult:
        self.set_result(result_file)
        self.set_logger()
        return self.mitigation()


class FST(TuningDefense):
    """Feature Shift Tuning: re-init head, α·⟨W, W₀⟩ penalty, head-norm projection."""
    method = "fst"


class FETuning(TuningDefense):
    """FE-tuning: re-initialised, frozen head; tune the feature extractor."""
    method = "fe-tuning"


class FTInit(TuningDefense):
    """FT-init: re-initialise the head, then fine-tune everything."""
    method = "ft-init"


class LP(TuningDefense):
    """Linear probing: tune the head only."""
    method = "lp"


class VanillaFT(TuningDefense):
    """Vanilla fine-tuning of all parameters."""
    method = "vanilla-ft"


class PAM(TuningDefense):
    """Path-aware minimisation (Min et al., NeurIPS 2024): unlearn reversed backdoor samples along the path away
    from the backdoored model."""
    method = "pam"
