"""One figure style for papers, and helpers that draw from results tables only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display is assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STYLE = {
    "figure.dpi": 120,
    "savefig.dpi": 200,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
}
COLORS = ["#1b6ca8", "#d1495b", "#66a182", "#edae49", "#8d6a9f", "#00798c"]


def palette(n: int) -> list[tuple]:
    """n distinct (colour, line style) pairs: the house colours up to 6 groups, tab10 up to 10,
    tab20 up to 20, then tab20 again with dashed and dotted lines, so no two groups look alike."""
    if n <= len(COLORS):
        return [(c, "-") for c in COLORS[:n]]
    cmap, k = (plt.cm.tab10, 10) if n <= 10 else (plt.cm.tab20, 20)
    return [(cmap(i % k), ("-", "--", ":", "-.")[(i // k) % 4]) for i in range(n)]


def save(fig, stem) -> list[Path]:
    """Save `fig` as STEM.png and STEM.pdf; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight")
    plt.close(fig)
    return paths


def ci_bars(ax, summary: pd.DataFrame, raw: pd.DataFrame, metric: str, arm: str = "arm"):
    """Bars of the mean with CI whiskers per arm, and each seed as a dot."""
    x = np.arange(len(summary))
    mean = summary[metric].to_numpy()
    err = np.stack([mean - summary[f"{metric}_lo"], summary[f"{metric}_hi"] - mean])
    ax.bar(x, mean, color=[c for c, _ in palette(len(x))], alpha=0.6, width=0.7)
    ax.errorbar(x, mean, yerr=err, fmt="none", ecolor="k", capsize=3, lw=1)
    for i, name in enumerate(summary[arm]):
        vals = raw.loc[raw[arm] == name, metric].to_numpy()
        jitter = np.linspace(-0.2, 0.2, len(vals)) if len(vals) > 1 else np.zeros(1)
        ax.plot(i + jitter, vals, "o", ms=2.5, color="k", alpha=0.5)
    names = [f"{a} [{int(k)} NON-FINITE]" if k else str(a) for a, k in zip(summary[arm], summary.get("nonfinite", np.zeros(len(summary))), strict=True)]
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(metric.replace("_", " "))


def label(name, g: pd.DataFrame) -> str:
    """A legend label that says how many members of group `g` went non-finite (excluded)."""
    if "nonfinite" not in g or not g["nonfinite"].astype(bool).any():
        return str(name)
    k = g.loc[g["nonfinite"].astype(bool), "seed"].nunique() if "seed" in g else int(g["nonfinite"].sum())
    return f"{name} [{k} NON-FINITE, excluded]"


def mean_band(ax, hist: pd.DataFrame, x: str, y: str, group: str, log: bool = False):
    """Median of `y` over seeds against `x` per group, with a 10-90% band across seeds
    (non-finite members excluded and counted in the legend)."""
    groups = list(hist.groupby(group, sort=False))
    for (name, g), (c, style) in zip(groups, palette(len(groups)), strict=True):
        q = g.groupby(x)[y].quantile([0.1, 0.5, 0.9]).unstack()
        ax.plot(q.index, q[0.5], style, color=c, lw=1.2, label=label(name, g))
        ax.fill_between(q.index, q[0.1], q[0.9], color=c, alpha=0.2, lw=0)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=7)


def ci_band(ax, df: pd.DataFrame, x: str, y: str, group: str):
    """Mean of `y` over seeds against `x` per group, with a 95% bootstrap CI band (non-finite
    members excluded and counted in the legend)."""
    from toymesa import stats

    groups = list(df.groupby(group, sort=False))
    for (name, g), (c, style) in zip(groups, palette(len(groups)), strict=True):
        rows = [(xv, *stats.bootstrap_ci(gx[y].to_numpy(), n_resamples=1000)) for xv, gx in g.groupby(x)]
        xs, mean, lo, hi = (np.asarray(v, float) for v in zip(*rows, strict=True))
        ax.plot(xs, mean, style, color=c, lw=1.2, label=label(name, g), marker="o", ms=2)
        ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
    ax.set_xlabel(x)
    ax.set_ylabel(y.replace("_", " "))
