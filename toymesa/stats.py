"""Statistics across a population of seeds, and the record that keeps predictions honest.

Interval estimates (percentile bootstrap over seeds, via `scipy.stats.bootstrap`): `bootstrap_ci`
of a mean (`summarize`: one per group), `difference_ci` of a difference of means, `hedges_g_ci` of
a standardized effect. `verdict` turns an interval into the call on an ex-ante prediction.

Preregistration: `register` keeps an append-only JSON record of a sweep's hypotheses
(dicts with keys id, statement, prediction and optionally metric, test). Schema::

    {"registered": time, "results_existed": bool,        # at the first call
     "hypotheses": [version, ...],                       # as first registered; never rewritten
     "amendments": [{"id": id, "kind": "edited" | "added" | "removed",
                     "old": version | null, "new": version | null,
                     "at": time, "results_existed": bool}, ...]}   # only ever appended

A version is the hypothesis's fields plus "digest" (`hypothesis_digest`). The current version of
an id is its registered one with its amendments replayed in order. `registration_status` says
which hypotheses can still be judged as preregistered; `original` is the version to judge against.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from toymesa import store

_NAN3 = (np.nan, np.nan, np.nan)
# Spelled out, not taken from spec.py: adding a spec key must not change existing digests.
HYPOTHESIS_FIELDS = ("id", "statement", "prediction", "metric", "test")


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
    dof = nx + ny - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1 - 3 / (4 * dof - 1)) * _mean_difference(x, y, axis) / np.sqrt(ss / dof)


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


def verdict(low: float, high: float, *, above: float | None = None, below: float | None = None) -> str:
    """The call on a prediction "quantity > above" (or "< below") given its CI [low, high].

    "confirmed" when low > above (high < below), "refuted" when high <= above (low >= below),
    otherwise, or with a NaN bound, "inconclusive".
    """
    if (above is None) == (below is None):
        raise ValueError("verdict needs exactly one threshold: verdict(low, high, above=t) for a prediction 'quantity > t', or below=t for 'quantity < t'")
    if np.isnan(low) or np.isnan(high):
        return "inconclusive"
    if above is not None:
        return "confirmed" if low > above else "refuted" if high <= above else "inconclusive"
    return "confirmed" if high < below else "refuted" if low >= below else "inconclusive"


def summarize(df: pd.DataFrame, by: list[str], metrics: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """One row per group of `by`: for each metric its mean, CI low and high, and n seeds."""
    rows = []
    for key, g in df.groupby(by, sort=False, dropna=False):  # a cell without some axis has NaN there
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row["n"] = len(g)
        for m in metrics:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_ci(g[m].to_numpy(), confidence)
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ preregistration
def hypothesis_digest(h: dict) -> str:
    """First 12 hex digits of sha256 of the canonical JSON of h's id, statement, prediction, metric, test.

    Keys h lacks are left out; text is taken verbatim, so any edit (whitespace included) changes it.
    """
    fields = {k: h[k] for k in HYPOTHESIS_FIELDS if k in h}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _version(h: dict) -> dict:
    return {k: h[k] for k in HYPOTHESIS_FIELDS if k in h} | {"digest": hypothesis_digest(h)}


def _current(record: dict) -> dict[str, dict | None]:
    """id -> its latest version (None once removed), replaying the amendments in order."""
    latest = {v["id"]: v for v in record["hypotheses"]}
    for a in record["amendments"]:
        latest[a["id"]] = a["new"]
    return latest


def register(path, hypotheses, results_exist: bool, now: str | None = None) -> dict:
    """Record `hypotheses` in the JSON file `path` (schema in the module docstring); returns the record.

    The first call stores every hypothesis. Later calls append one amendment per hypothesis that
    is new ("added"), whose digest differs from its current version ("edited"), or that is gone
    ("removed"), stamped with `now` (default: UTC now) and `results_exist`. Earlier entries are
    never changed. The file is replaced atomically, and only when something changed.
    """
    path, at = Path(path), now or datetime.now(UTC).isoformat(timespec="seconds")
    versions = [_version(h) for h in hypotheses]
    ids = [v["id"] for v in versions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"hypothesis ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    if not path.exists():
        record = {"registered": at, "results_existed": bool(results_exist), "hypotheses": versions, "amendments": []}
        store.save_json(record, path)
        return record
    record = store.load_json(path)
    latest = _current(record)
    amend = lambda i, kind, old, new: {"id": i, "kind": kind, "old": old, "new": new, "at": at, "results_existed": bool(results_exist)}
    new = [amend(v["id"], "added", None, v) for v in versions if latest.get(v["id"]) is None]
    new += [amend(v["id"], "edited", latest[v["id"]], v) for v in versions if latest.get(v["id"]) and latest[v["id"]]["digest"] != v["digest"]]
    new += [amend(i, "removed", old, None) for i, old in latest.items() if old is not None and i not in ids]
    if new:
        record["amendments"].extend(new)
        store.save_json(record, path)
    return record


def registration_status(record: dict) -> dict[str, str]:
    """id -> standing of every hypothesis the record has seen, first match wins.

    Removed: "REMOVED AFTER RESULTS" or "removed before results" (by the removal). Present:
    "REGISTERED AFTER RESULTS" (first call made when results existed), "ADDED AFTER RESULTS",
    "EDITED AFTER RESULTS" (any amendment made when results existed), "amended before results",
    "as registered" (never amended).
    """
    status = {}
    for i, current in _current(record).items():
        amendments = [a for a in record["amendments"] if a["id"] == i]
        first_registered = any(v["id"] == i for v in record["hypotheses"])
        if current is None:
            status[i] = "REMOVED AFTER RESULTS" if amendments[-1]["results_existed"] else "removed before results"
        elif first_registered and record["results_existed"]:
            status[i] = "REGISTERED AFTER RESULTS"
        elif not first_registered and amendments[0]["results_existed"]:
            status[i] = "ADDED AFTER RESULTS"
        elif any(a["results_existed"] for a in amendments):
            status[i] = "EDITED AFTER RESULTS"
        else:
            status[i] = "amended before results" if amendments else "as registered"
    return status


def original(record: dict, id: str) -> dict:
    """The first registered version of hypothesis `id`: what its verdict is judged against."""
    versions = [v for v in record["hypotheses"] if v["id"] == id] + [a["new"] for a in record["amendments"] if a["id"] == id and a["kind"] == "added"]
    if versions:
        return versions[0]
    raise KeyError(f"hypothesis {id!r} is not in the record; ids: {sorted(_current(record))}")
