"""Statistics across a population of seeds.

Interval estimates (percentile bootstrap over seeds, via `scipy.stats.bootstrap`): `bootstrap_ci`
of a mean (`summarize`: one per group), `difference_ci` of a difference of means, `hedges_g_ci` of
a standardized effect. Turning an interval into a verdict on a registered prediction is
`toymesa.prereg`'s job.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

_NAN3 = (np.nan, np.nan, np.nan)


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


def _percentile_ci(samples, statistic, point: float, confidence: float, n_resamples: int, seed: int, paired: bool = False) -> tuple[float, float, float]:
    kw = dict(confidence_level=confidence, n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    with np.errstate(invalid="ignore"):  # an infinite resampled g makes scipy's standard error inf - inf; the CI is fine
        res = sps.bootstrap(samples, statistic, paired=paired, vectorized=True, **kw)
    return (point, float(res.confidence_interval.low), float(res.confidence_interval.high))


def _mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def difference_ci(a, b, confidence: float = 0.95, n_resamples: int = 4000, seed: int = 0, paired: bool = False) -> tuple[float, float, float]:
    """(d, low, high): d = mean(a) - mean(b) and a percentile-bootstrap CI of it.

    `a` is float[N], `b` float[M], one number per seed. Unpaired, each sample is resampled on its
    own and its NaNs dropped. Paired (N == M, a[i] and b[i] from the same seed), pairs are
    resampled together and a pair holding a NaN is dropped. With fewer than 2 values in a sample,
    or no variation (both samples constant; paired: a - b constant), the CI is the point (d, d).
    An empty sample gives NaNs.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if paired:
        if a.size != b.size:
            raise ValueError(f"paired=True needs a and b of equal length (a[i], b[i] from seed i), got {a.size} and {b.size}; else pass paired=False")
        keep = ~(np.isnan(a) | np.isnan(b))
        a, b = a[keep], b[keep]
    else:
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size == 0 or b.size == 0:
        return _NAN3
    d = float(a.mean() - b.mean())
    flat = np.ptp(a - b) == 0 if paired else np.ptp(a) == 0 and np.ptp(b) == 0
    if min(a.size, b.size) < 2 or flat:
        return (d, d, d)
    return _percentile_ci((a, b), _mean_difference, d, confidence, n_resamples, seed, paired)


def _hedges_g(x, y, axis=-1):
    """g = J (mean x - mean y) / s_p; s_p^2 = (SS_x + SS_y) / (n_x + n_y - 2); J = 1 - 3 / (4 (n_x + n_y) - 9)."""
    nx, ny = x.shape[axis], y.shape[axis]
    ss = sum(np.sum((v - np.mean(v, axis=axis, keepdims=True)) ** 2, axis=axis) for v in (x, y))
    diff = _mean_difference(x, y, axis)
    # both samples constant: exactly zero SD and the exact difference (a computed mean of n
    # copies of 0.95 is not always 0.95, which would leave g a ratio of rounding errors)
    const = (np.ptp(x, axis=axis) == 0) & (np.ptp(y, axis=axis) == 0)
    ss = np.where(const, 0.0, ss)
    diff = np.where(const, np.take(x, 0, axis=axis) - np.take(y, 0, axis=axis), diff)
    dof = nx + ny - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1 - 3 / (4 * dof - 1)) * diff / np.sqrt(ss / dof)


def hedges_g_ci(a, b, confidence: float = 0.95, n_resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(g, low, high): Hedges' g of a against b and a percentile-bootstrap CI of it.

    `a` is float[N], `b` float[M] (NaNs dropped, resampled independently).
    g = J (mean(a) - mean(b)) / s_p with s_p^2 = (sum (a - mean a)^2 + sum (b - mean b)^2) / (N + M - 2)
    and J = 1 - 3 / (4 (N + M) - 9). Zero pooled SD (each sample constant): the means differ by
    infinitely many SDs, so g = low = high = +-inf, or all NaN when the means are equal; resamples
    where that happens count as +-inf or 0. With fewer than 2 values in a sample, the point (g, g, g).
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size == 0 or b.size == 0:
        return _NAN3
    g = float(_hedges_g(a, b))
    if min(a.size, b.size) < 2 or not np.isfinite(g):
        return (g, g, g)
    # A resample with both groups the same constant shows no shift: g = 0 there, not NaN.
    resampled_g = lambda x, y, axis: np.nan_to_num(_hedges_g(x, y, axis), nan=0.0, posinf=np.inf, neginf=-np.inf)
    return _percentile_ci((a, b), resampled_g, g, confidence, n_resamples, seed)


def summarize(df: pd.DataFrame, by: list[str], metrics: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """One row per group of `by`: for each metric its mean, CI low and high, and n seeds.

    With a bool column ``nonfinite`` in `df` (members whose training went non-finite; their
    metrics are NaN), n counts the other members and column ``nonfinite`` the excluded ones.
    """
    rows = []
    for key, g in df.groupby(by, sort=False, dropna=False):  # a cell without some axis has NaN there
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        bad = g["nonfinite"].to_numpy(bool) if "nonfinite" in g else np.zeros(len(g), bool)
        row["n"], row["nonfinite"] = int((~bad).sum()), int(bad.sum())
        for m in metrics:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_ci(np.where(bad, np.nan, g[m].to_numpy(float)), confidence)
        rows.append(row)
    return pd.DataFrame(rows)


NOT_RATES = frozenset({"loss", "grad_norm", "reward"})  # metrics that may fall in [0, 1] without being fractions


def metrics(df: pd.DataFrame) -> list[str]:
    """The columns of `df` that carry a CI (``m`` with ``m_lo`` and ``m_hi``), in order."""
    return [c for c in df.columns if f"{c}_lo" in df and f"{c}_hi" in df]


def is_rate(df: pd.DataFrame, m: str) -> bool:
    """Whether metric `m` of `df` is a fraction: every finite mean and CI bound in [0, 1]."""
    if m in NOT_RATES:
        return False
    v = pd.to_numeric(df[[m, f"{m}_lo", f"{m}_hi"]].stack(), errors="coerce").dropna()
    return bool(((v >= 0) & (v <= 1)).all())
