"""Runtime helpers every layer needs (core, adapter, attacks, demo, benchmarks): the device, seeding, the
random-generator state a resumed run restores, progress bars, and :func:`phase` (a bar on a terminal, log lines in a
log). It sits low in the house (it imports only torch, NumPy, tqdm and fst_plugin.errors), so no caller has to
import upward to reach it."""
from __future__ import annotations

import logging
import random
import sys
import time
from typing import Any, Iterable, Iterator, Optional, Sized, TypeVar, Union

import numpy as np
import torch
from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter() in __init__ and again
                       # when iterated (one extra torch RNG draw and a discarded set of DataLoader workers per epoch)

from fst_plugin.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """``auto`` → cuda when present, else cpu; an explicit cuda without CUDA is an error."""
    if requested == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device: auto -> %s (%s)", chosen, "CUDA available" if chosen == "cuda" else "no CUDA found")
        return chosen
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"device {requested!r} is not a torch device", "use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {requested!r} is not supported by this defense", "use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} requested but CUDA is not available here",
                          "pass --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {requested!r} requested but only {torch.cuda.device_count()} GPU(s) are visible",
                          "pass --device cuda (or cuda:N with N below the GPU count)")
    return requested


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Python's, NumPy's and torch's generator states (every CUDA device's too), for an exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(iterable: Iterable, show: Optional[bool], desc: str) -> Iterable:
    """A tqdm bar over ``iterable``; ``show=None`` shows it only on a terminal (no bars in log files)."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if show is None else not show, dynamic_ncols=True)



T = TypeVar("T")
PHASE_LOG_EVERY_S = 60.0  # while a phase runs without a bar: at most one line this often


def on_terminal() -> bool:
    """Whether stderr (where bars go) is a terminal; a log file or a pipe is not."""
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


class Phase:
    """The progress of one named phase of work (see :func:`phase`, which builds it)."""

    def __init__(self, desc: str, total: Optional[int], show: Optional[bool], logger: logging.Logger,
                 every_s: float) -> None:
        self.desc, self.total, self.logger, self.every_s = desc, total, logger, every_s
        self.bar_shown = on_terminal() if show is None else show
        self.done = 0
        self.closed = False
        self.started = self.last_line = time.monotonic()
        self._bar = tqdm(total=total, desc=desc, leave=False, disable=not self.bar_shown, dynamic_ncols=True)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def _steps(self) -> str:
        return f"{self.done}/{self.total} steps" if self.total is not None else f"{self.done} steps"

    def update(self, n: int = 1) -> None:
        """``n`` more steps done; without a bar, a progress line once ``every_s`` seconds have passed since the last."""
        self.done += n
        self._bar.update(n)
        now = time.monotonic()
        if not self.bar_shown and not self.closed and now - self.last_line >= self.every_s:
            self.last_line = now
            self.logger.info("%s: %s so far, %.0f s", self.desc, self._steps(), now - self.started)

    def close(self, failed: bool = False) -> None:
        """End the phase: the bar goes; without a bar, one line with the steps done and the seconds taken."""
        if self.closed:
            return
        self.closed = True
        self._bar.close()
        if not self.bar_shown:
            how = "stopped after" if failed or (self.total is not None and self.done < self.total) else "done,"
            self.logger.info("%s: %s %s in %.1f s", self.desc, how, self._steps(), self.elapsed_s)

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(failed=exc_type is not None)


class _IterPhase(Phase):
    """A :class:`Phase` over an iterable: one step per item."""

    def __init__(self, iterable: Iterable[T], *args: Any) -> None:
        super().__init__(*args)
        self.iterable = iterable

    def __iter__(self) -> Iterator[T]:
        failed = True
        try:
            for item in self.iterable:
                yield item
                self.update(1)
            failed = False
        finally:  # also when the loop breaks early or raises: the phase still says how far it got
            self.close(failed=failed)


def phase(desc: str, steps: Union[int, Iterable[T], None] = None, show: Optional[bool] = None,
          logger: Optional[logging.Logger] = None, every_s: float = PHASE_LOG_EVERY_S) -> Phase:
    """Report the progress of one phase of work (a training loop, a fit, a pass over data) so that a person
    watching can tell a working run from a hung one, on a terminal or in a log file.

    Two ways to use it (a stable API: the trigger inversion, QRA and others rely on it)::

        for epoch in phase("qra generator", range(epochs)):      # an iterable: one step per item
            ...
        with phase("mask", total_steps) as p:                     # a context manager: count the steps yourself
            for ...:
                ...
                p.update()                                        # update(n=1): n more steps done

    ``desc``: the phase's name, first word of its lines. ``steps``: the number of steps (or None: unknown), or an
    iterable to wrap (its ``len()``, when it has one, is the total). ``show``: True a tqdm bar, False none, None
    (the default) a bar only when stderr is a terminal. ``logger``: where the lines go (default this module's).

    When no bar is shown, it logs at INFO one line when the phase ends, ``"<desc>: done, 400/400 steps in 312.4 s"``
    (``"stopped after 3/400 steps"`` when it ended early or raised), and while it runs at most one line every
    ``every_s`` seconds (default a minute), ``"<desc>: 120/400 steps so far, 61 s"``. With a bar, no lines: the
    bar shows it. The phase's ``done`` (steps so far) and ``elapsed_s`` are there to read.
    """
    logger = logger or log
    if steps is None or isinstance(steps, int):
        return Phase(desc, steps, show, logger, every_s)
    total = len(steps) if isinstance(steps, Sized) else None
    return _IterPhase(steps, desc, total, show, logger, every_s)


def cpu_bf16_supported() -> bool:
    """True when oneDNN has native bfloat16 kernels on this CPU (otherwise bf16 would be slow emulation)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
