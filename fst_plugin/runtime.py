"""Runtime helpers every layer needs (core, adapter, attacks, demo, benchmarks): the device, seeding, the
random-generator state a resumed run restores, and progress bars. It sits low in the house (it imports only
torch, NumPy, tqdm and fst_plugin.errors), so no caller has to import upward to reach it."""
from __future__ import annotations

import logging
import random
from typing import Any, Iterable, Optional

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
