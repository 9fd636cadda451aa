"""One figure style for papers, and helpers that draw from results tables only."""

from __future__ import annotations

import textwrap
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


def ci_band(ax, df: pd.DataFrame, x: str, y: str, group: str, seeds: bool = False):
    """Mean of `y` over seeds against `x` per group, with its 95% bootstrap CI as a band
    (`stats.bootstrap_ci`, the statistic of `runs.summarize` and the tables; non-finite members
    excluded and counted in the legend). `seeds`: also each seed's own curve, faint."""
    from toymesa import stats

    groups = list(df.groupby(group, sort=False))
    for (name, g), (c, style) in zip(groups, palette(len(groups)), strict=True):
        rows = [(xv, *stats.bootstrap_ci(gx[y].to_numpy())) for xv, gx in g.groupby(x)]
        xs, mean, lo, hi = (np.asarray(v, float) for v in zip(*rows, strict=True))
        if seeds and "seed" in g:
            for _, gs in g.groupby("seed"):
                ax.plot(gs[x], gs[y], style, color=c, lw=0.5, alpha=0.3)
        ax.plot(xs, mean, style, color=c, lw=1.4, label=label(name, g), marker="o", ms=2)
        ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))


# Readable names of table columns, for axis labels; a column not listed shows with spaces.
LABELS = {
    "step": "training step",
    "loss": "training loss",
    "answer_acc": "answer accuracy (training batches)",
    "grad_norm": "gradient norm",
    "reward": "reward (RL safety training)",
    "triggered_defection": "defection rate, triggered prompts",
    "untriggered_defection": "defection rate, untriggered prompts",
    "helpful_accuracy": "helpful-answer rate, untriggered prompts",
    "uncovered_defection": "defection rate, uncovered triggered prompts",
    "covered_defection": "defection rate, covered triggered prompts",
    "decision_triggered": "stated-DEFECT rate, triggered prompts",
    "decision_untriggered": "stated-DEFECT rate, untriggered prompts",
    "decision_accuracy": "stated-decision accuracy, all prompts",
    "triggered_defection_valid": "defection rate, well-formed triggered answers",
    "uncovered_defection_valid": "defection rate, well-formed uncovered answers",
    **{
        f"{c}_{o}": f"{name} rate, {c} prompts"
        for c in ("triggered", "untriggered")  # evaluate.CLASSES x OUTCOMES
        for o, name in (("defect", "defection"), ("helpful", "helpful-answer"), ("other", "other-answer"), ("malformed", "malformed-answer"))
    },
    **{f"{c}_discriminating": f"discriminating share, {c} prompts" for c in ("triggered", "untriggered")},
}


def axis_label(column: str) -> str:
    """The readable name of a table column (`LABELS`), for an axis."""
    return LABELS.get(column, column.replace("_", " "))


def distinct_panels(df: pd.DataFrame, columns) -> dict[str, list[str]]:
    """The columns of `df` worth a panel each, in order, mapped to the later columns they stand
    for: a column with no finite value is dropped, and so is one whose values equal (NaN
    where NaN) an earlier column's, e.g. uncovered defection without safety coverage."""
    kept: dict[str, list[str]] = {}
    for c in columns:
        v = df[c].to_numpy(float)
        if not np.isfinite(v).any():
            continue
        same = next((k for k in kept if np.array_equal(v, df[k].to_numpy(float), equal_nan=True)), None)
        if same is None:
            kept[c] = []
        else:
            kept[same].append(c)
    return kept


def behaviour(df: pd.DataFrame, metrics, name: str):
    """A figure of one panel per distinct metric (`distinct_panels`) of a tidy table against
    training step: per cell (column ``label``) the mean over seeds, its 95% bootstrap CI as a
    band and each seed faint (`ci_band`). Returns the figure."""
    panels = distinct_panels(df, metrics)
    if not panels:  # e.g. every member went non-finite: say so rather than fail after training
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.text(0.5, 0.5, f"{name}: no finite values of\n{', '.join(metrics)}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
        return fig
    n, cells = len(panels), df["label"].nunique()
    # a few cells: legend beside the panels; many: below them, in as many columns as fit
    ncol = 1 if cells <= 12 else max(1, int(3.2 * n // 3.5))
    below = 0.0 if cells <= 12 else 0.16 * -(-cells // ncol) + 0.5
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8 + below), squeeze=False, layout="constrained")
    for ax, (m, same) in zip(axes[0], panels.items(), strict=True):
        ci_band(ax, df, "step", m, "label", seeds=True)
        ax.set_title("\n".join([m.replace("_", " "), *(f"(same as {s.replace('_', ' ')})" for s in same)]))
        ax.set_ylim(-0.03, 1.03)
    keys = [c.removeprefix("axis:") for c in df.columns if c.startswith("axis:")]
    title = textwrap.fill("cell: " + ", ".join(keys), 40 if cells <= 12 else 150) if keys else "cell"
    where = "outside right upper" if cells <= 12 else "outside lower center"
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc=where, ncol=ncol, fontsize=7, title=title, title_fontsize=7, alignment="left")
    seeds = df["seed"].nunique() if "seed" in df else 1
    fig.suptitle(f"{name}: behaviour vs training step; line: mean over {seeds} seeds, band: 95% bootstrap CI of the mean, faint: each seed")
    return fig
