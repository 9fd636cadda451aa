"""Results on disk: atomic writes, tidy tables that load as pandas DataFrames.

A file is written to a temporary name in the same folder and renamed into place, so an
interrupted run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_frame(df: pd.DataFrame, path) -> Path:
    """Write a DataFrame as CSV, atomically."""
    return _atomic_write(path, lambda f: df.to_csv(f, index=False))


def save_json(obj, path) -> Path:
    return _atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str))


def load(path) -> pd.DataFrame:
    """Load a results table (a CSV file, or a folder's `results.csv`)."""
    path = Path(path)
    return pd.read_csv(path / "results.csv" if path.is_dir() else path)
