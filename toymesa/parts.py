"""The CIs a registered hypothesis is judged on (`prereg.Part`), built from per-seed values.

An analysis picks the seeds' values of each arm from its tidy results and calls `level` (one
arm's mean against a threshold) or `difference` (two arms; paired when both arms share each
seed's installed model, e.g. cells that differ only in their safety phase). Members whose
training went non-finite are dropped and counted (`prereg.arm`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from toymesa import prereg, stats


def _arm(name: str, cell: pd.DataFrame, metric: str) -> prereg.Arm:
    bad = cell["nonfinite"].to_numpy(bool) if "nonfinite" in cell else None
    return prereg.arm(name, cell[metric].to_numpy(), bad)


def level(label: str, cell: pd.DataFrame, metric: str, minus: float = 0.0) -> prereg.Part:
    """mean(metric) - `minus` over the cell's seeds, with its percentile-bootstrap CI (`minus`
    centres an equivalence band: "between 0.2 and 0.8" is |mean - 0.5| < 0.3)."""
    a = _arm(label, cell, metric)
    mean, lo, hi = stats.bootstrap_ci(a.values)
    return prereg.Part(label, (mean - minus, lo - minus, hi - minus), (a,))


def difference(label: str, a: pd.DataFrame, b: pd.DataFrame, metric: str, names: tuple[str, str], paired: bool = False) -> prereg.Part:
    """mean(a) - mean(b) of `metric` with its percentile-bootstrap CI. Paired: rows matched by
    seed (both cells must hold the same seeds), a seed non-finite in either arm dropped."""
    if paired:
        a, b = (c.sort_values("seed") for c in (a, b))
        if not np.array_equal(a["seed"].to_numpy(), b["seed"].to_numpy()):
            raise ValueError(f"{label}: a paired difference needs the same seeds in both arms, got {a['seed'].tolist()} and {b['seed'].tolist()}")
        bad = np.zeros(len(a), bool)
        for c in (a, b):
            bad |= c["nonfinite"].to_numpy(bool) if "nonfinite" in c else False
            bad |= np.isnan(c[metric].to_numpy(float))
        # a seed broken in either arm leaves both: counted as excluded in each
        arms = tuple(prereg.Arm(n, c[metric].to_numpy(float)[~bad], int(bad.sum())) for n, c in zip(names, (a, b), strict=True))
    else:
        arms = (_arm(names[0], a, metric), _arm(names[1], b, metric))
    return prereg.Part(label, stats.difference_ci(arms[0].values, arms[1].values, paired=paired), arms)
