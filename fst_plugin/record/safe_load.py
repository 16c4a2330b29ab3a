"""Loading torch pickles from untrusted records without executing code.

Attack records, defense results and checkpoints are pickles, and a pickle can run arbitrary code when
loaded. A backdoor defense receives them from people it does not trust, so they are loaded with torch's
weights-only unpickler, allowing exactly the NumPy types a BackdoorBench record holds (arrays, dtypes and
scalars such as the ``np.int64`` keys of ``data_dict``). Anything else is refused with a clear error unless
the user passes ``--trust-record``, which is logged as a warning.
"""
from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fst_plugin.errors import RecordError

log = logging.getLogger(__name__)


def _numpy_safe_globals() -> list[Any]:
    """NumPy callables and classes a record may reference, under both NumPy 1 and NumPy 2 module names."""
    try:
        from numpy._core import multiarray  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    allowed: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    allowed += [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return allowed


SAFE_GLOBALS = _numpy_safe_globals()


def load_untrusted(path: str | Path, what: str, trust: bool = False) -> Any:
    """``torch.load`` ``path`` on the CPU with the allow-list (or fully, if ``trust``); errors are RecordError."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{what} {path} does not exist", "check the path (and --result_file / --record)")
    if path.stat().st_size == 0:
        raise RecordError(f"{what} {path} is empty", "re-create it (re-run the attack or defense that wrote it)")
    if trust:
        log.warning("LOADING %s %s WITH FULL UNPICKLING (--trust-record): any code inside it runs now", what, path)
        loader = lambda: torch.load(path, map_location="cpu", weights_only=False)  # noqa: E731
    else:
        def loader() -> Any:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return loader()
    except pickle.UnpicklingError as exc:
        text = str(exc)
        refused = re.search(r"GLOBAL ([\w.]+)", text)  # torch words this differently across versions
        if refused:
            name = refused.group(1).rstrip(".")
            raise RecordError(
                f"{what} {path} references {name}, which is not on the allow-list of types a record holds; "
                "it was not unpickled",
                "if you trust where this file came from, pass --trust-record (it lets the file run code)",
            ) from None
        raise RecordError(f"{what} {path} is not a loadable torch file ({text.strip().splitlines()[-1][:200]})",
                          "re-create it; if you trust its source and it uses other types, pass --trust-record") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, TypeError,
            KeyError, IndexError, ImportError, MemoryError, OverflowError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RecordError(f"{what} {path} is corrupt or truncated ({first})",
                          "re-create it (re-run the attack or defense that wrote it)") from None
