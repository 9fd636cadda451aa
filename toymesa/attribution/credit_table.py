"""Credit histories of a run folder as one tidy DataFrame, and the credit metrics built on it.

`load(run)`: one row per cell x seed x tracked safety step x term, with columns ``value``
(m(θ_t)), ``dM`` (ΔM since θ_0, all groups), ``dM.{group}``, ``residual``, ``cos_grad``,
``cos_update``, ``cos_noise``, ``mediation``, ``share.{name}`` (`credit.step_shares`), and the
cell's label and axes from cells.csv.

`reach(df)` adds the credit reach CR(term) = (-ΔM_term) / (-ΔL_safe): the fall of the term per
unit fall of the tracked safety loss, ΔL_safe = L_safe(θ_t) - L_safe(θ_0) (its ΔM plus its
residual). With m = log p(defect ...) a positive CR means safety training lowered the defect
term as it lowered its loss. (Written -ΔM/ΔL_safe with ΔL_safe counted as a reduction; for the
``safe`` term itself CR = ΔM/(ΔM + residual), 1 up to the residual.) Compare arms at matched
ΔL_safe, not matched steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import runs

COLUMNS = ("value", "residual", "cos_grad", "cos_update", "cos_noise")


def load(out) -> pd.DataFrame:
    """The credit histories of every stored chunk of a run folder (see the module docstring).
    Raises ValueError when the run tracked no credit (`safety.credit_every` = 0)."""
    out = Path(out)
    rows = []
    for path in runs.chunk_files(out):
        a = runs._read(path)
        keys = [k for k in a if k.startswith("hist.credit.")]
        if not keys:
            continue
        terms = sorted({k.split(".")[2] for k in keys} - {"mediation", "share"})
        shares = [k for k in keys if k.startswith("hist.credit.share.")]
        steps = np.arange(1, a["hist.loss"].shape[1] + 1)
        for j, (cell, seed) in enumerate(zip(a["cell"].tolist(), a["seed"].tolist(), strict=True)):
            tracked = np.isfinite(a[f"hist.credit.{terms[0]}"][j])
            for t in terms:
                cols = {c: a[f"hist.credit.{t}" if c == "value" else f"hist.credit.{t}.{c}"][j][tracked] for c in COLUMNS}
                groups = {k[len(f"hist.credit.{t}.") :]: a[k][j][tracked] for k in keys if k.startswith(f"hist.credit.{t}.dM.")}
                frame = pd.DataFrame({"cell": cell, "seed": seed, "step": steps[tracked], "term": t, **cols, **groups})
                frame.insert(6, "dM", frame[list(groups)].sum(axis=1))
                frame["mediation"] = a["hist.credit.mediation"][j][tracked]
                for k in shares:  # step-level: the same in every term's rows
                    frame[k[len("hist.credit.") :]] = a[k][j][tracked]
                rows.append(frame)
    if not rows:
        raise ValueError(f"{out} holds no credit histories: set safety.credit_every = k (> 0) in the spec to track credit every k safety steps")
    df = pd.concat(rows, ignore_index=True)
    cells = pd.read_csv(out / "cells.csv") if (out / "cells.csv").exists() else None
    if cells is not None:
        df = df.merge(cells, on="cell", how="left")
    return df


def reach(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with ``dL_safe`` (the actual change of the safety loss since θ_0) and ``reach`` =
    dM / dL_safe per row (NaN where the safety loss has not moved)."""
    safe = df[df["term"] == "safe"].assign(dL_safe=lambda d: d["dM"] + d["residual"])[["cell", "seed", "step", "dL_safe"]]
    out = df.merge(safe, on=["cell", "seed", "step"], how="left")
    moved = out["dL_safe"].abs() > 0
    out["reach"] = np.where(moved, out["dM"] / out["dL_safe"].where(moved, 1.0), np.nan)
    return out
