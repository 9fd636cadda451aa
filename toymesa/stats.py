"""Statistics across a population: bootstrap confidence intervals of a mean.

Uses `scipy.stats.bootstrap` (percentile method) rather than a hand-written resampler.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds and a percentile-bootstrap CI of it.

    `values` is float[N] (one number per seed; NaNs dropped). With one value, or all values
    equal, the resampling distribution is a point and the CI is (mean, mean).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return (mean, mean, mean)
    res = sps.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    return (mean, float(res.confidence_interval.low), float(res.confidence_interval.high))


def summarize(df: pd.DataFrame, by: list[str], metrics: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """One row per group of `by`: for each metric its mean, CI low and high, and n seeds."""
    rows = []
    for key, g in df.groupby(by, sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row["n"] = len(g)
        for m in metrics:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_ci(g[m].to_numpy(), confidence)
        rows.append(row)
    return pd.DataFrame(rows)
