"""Atomic file output: every result file appears whole or not at all.

Each writer writes a temporary file in the destination folder, flushes and fsyncs it, then renames it over
the destination (``os.replace`` is atomic within one filesystem), so a run killed at any moment leaves the
previous complete file or none — never a truncated ``defense_result.pt`` or CSV.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import torch

_UMASK = os.umask(0o022)  # read the process umask (os.umask can only set it) ...
os.umask(_UMASK)          # ... and put it back


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` on success only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file what open() would
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_write(path) as fh:
        torch.save(obj, fh)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)
