"""Which clean training images a defense tunes on: BackdoorBench's ``choose_index``, so a run tunes on the very
subset BackdoorBench's own ``ft`` picks for the same seed, size and ratio (or on an index file)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np

from fst_plugin.errors import ConfigError


def choose_clean_indices(n: int, ratio: float, index_file: Optional[str]) -> np.ndarray:
    """BackdoorBench's ``choose_index``: an index file, else ``random.sample(range(n), int(n * ratio))``."""
    if index_file:
        path = Path(index_file)
        if not path.is_file():
            raise ConfigError(f"index file {path} does not exist", "pass --index with an existing file, or omit it to use --ratio")
        try:
            indices = np.atleast_1d(np.loadtxt(path, dtype=np.int64))
        except ValueError as exc:
            raise ConfigError(f"index file {path} is not a list of integers ({exc})", "write one integer index per line") from None
        if indices.ndim != 1 or indices.size == 0:
            raise ConfigError(f"index file {path} holds no indices", "write one integer index per line")
        bad = indices[(indices < 0) | (indices >= n)]
        if bad.size:
            raise ConfigError(f"index file {path} holds index {int(bad[0])}, outside 0..{n - 1} of the clean training set",
                              "use indices of the clean training set")
        values, counts = np.unique(indices, return_counts=True)
        if (counts > 1).any():
            dup = int(values[counts > 1][0])
            raise ConfigError(f"index file {path} lists index {dup} more than once", "remove the duplicate indices")
        return indices
    count = int(n * ratio)
    if count < 1:
        raise ConfigError(f"ratio {ratio} of {n} training images selects no image", "raise --ratio")
    return np.asarray(random.sample(range(n), count), dtype=np.int64)
