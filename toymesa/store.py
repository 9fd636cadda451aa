"""Results on disk: atomic writes, tidy tables that load as pandas DataFrames.

A file is written to a temporary name in the same folder and renamed into place, so an
interrupted run leaves either the old file or the new one, never half of one. Files get the
permissions `open()` would give them (0666 less the umask), so collaborators can read them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write, binary: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a file (a folder?); remove it or write elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            write(f)
        # mkstemp creates owner-only (0600) files; results are shared, so use the umask like open()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_frame(df: pd.DataFrame, path) -> Path:
    """Write a DataFrame as CSV, atomically."""
    return _atomic_write(path, lambda f: df.to_csv(f, index=False))


def save_text(text: str, path) -> Path:
    return _atomic_write(path, lambda f: f.write(text))


def save_json(obj, path) -> Path:
    return _atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str))


def load_json(path):
    with open(path) as f:
        return json.load(f)


def save_arrays(arrays: dict, path) -> Path:
    """Write a dict of NumPy arrays as an uncompressed .npz, atomically."""
    return _atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


def load_arrays(path) -> dict:
    with open(path, "rb") as f, np.load(f) as z:  # our handle: closed even when the file is corrupt
        return {k: z[k] for k in z.files}
