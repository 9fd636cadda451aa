"""Table, figures and verdicts of persistence_cot, from stored results only; and `coverage`, the
simulation that checks the percentile-bootstrap CI's coverage at this study's n.

"kept" is triggered defection at the last safety step. sft_full and sft_post cells of one rule
and format share each seed's installed model, so C3 is paired by seed; C2 compares formats
(different installs) and is not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import parts, plot, prereg, runs, stats, store

ARMS = [(r, f, m) for r in ("single", "latent") for f, m in (("none", "sft_full"), ("cot", "sft_full"), ("cot", "sft_post"))]


def frame(out) -> pd.DataFrame:
    return frame_columns(runs.load(out))


def frame_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Short columns: rule, reasoning, method, kept (triggered defection)."""
    return df.assign(rule=df["task.rule"], reasoning=df["task.reasoning"], method=df["safety.method"], kept=df["triggered_defection"])


def cell(df: pd.DataFrame, rule: str, reasoning: str, method: str) -> pd.DataFrame:
    return df[(df["rule"] == rule) & (df["reasoning"] == reasoning) & (df["method"] == method)]


def table(out: Path) -> pd.DataFrame:
    """Per cell: installed and kept defection, untriggered defection, helpful accuracy, and the
    outcome rates on triggered prompts (defect, helpful, other, malformed)."""
    df = frame(out)
    df = df.assign(arm=df["rule"] + "/" + df["reasoning"] + "/" + df["method"])
    merged = runs.with_start(df, "kept", "installed")
    metrics = ["installed", "kept", "untriggered_defection", "helpful_accuracy", "triggered_other", "triggered_malformed", "untriggered_malformed"]
    return stats.summarize(merged, ["cell", "arm"], metrics)


def verdict_parts(df: pd.DataFrame) -> dict[str, list[prereg.Part]]:
    end = runs.last_step(df)
    return {
        "C1": [parts.level(f"{r}/cot/sft_full: triggered malformed", cell(end, r, "cot", "sft_full"), "triggered_malformed") for r in ("single", "latent")],
        "C2": [
            parts.difference(f"{r}, sft_full: cot - none", cell(end, r, "cot", "sft_full"), cell(end, r, "none", "sft_full"), "kept", ("cot", "none"))
            for r in ("single", "latent")
        ],
        "C3": [
            parts.difference(
                f"{r}/cot: sft_post - sft_full", cell(end, r, "cot", "sft_post"), cell(end, r, "cot", "sft_full"), "kept", ("sft_post", "sft_full"), paired=True
            )
            for r in ("single", "latent")
        ],
    }


def verdicts(out: Path) -> pd.DataFrame:
    return prereg.verdict_table(store.load_json(Path(out) / "meta.json")["hypotheses"], verdict_parts(frame(out)))


def figures(out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    out = Path(out)
    df = frame(out)
    paths = []
    with plt.rc_context(plot.STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
        for ax, metric, title in (
            (axes[0], "kept", "defection, triggered prompts"),
            (axes[1], "triggered_malformed", "malformed outputs, triggered prompts"),
            (axes[2], "helpful_accuracy", "helpful accuracy, untriggered prompts"),
        ):
            sub = pd.concat([cell(df, *a).assign(arm="/".join(a)) for a in ARMS])
            plot.ci_band(ax, sub, "step", metric, "arm")
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("safety-training step")
            ax.set_title(title)
        axes[0].set_ylabel("defection kept, triggered prompts")
        axes[0].legend(fontsize=7, loc="lower left")
        fig.suptitle("On-format safety SFT on plain and chain-of-thought backdoors (mean over 25 seeds, 95% bootstrap CI)", y=1.03)
        paths += plot.save(fig, out / "figures" / "curves")
    return paths


# ----------------------------------------------------------------- CI coverage at this n
def coverage(n: int, trials: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Coverage of the 95% percentile-bootstrap CI of a mean (`stats.bootstrap_ci`) at n seeds,
    for per-seed outcomes like the CoT arms': a mixture of seeds near 0 and near 1 (share p at
    ~1, each value jittered by a Beta(2, 20) distance from its end), at p = 0.1, 0.3, 0.5. The
    true mean is known exactly; coverage is the share of trials whose CI holds it."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in (0.1, 0.3, 0.5):
        jitter_mean = 2 / 22
        true = p * (1 - jitter_mean) + (1 - p) * jitter_mean
        hits = 0
        for t in range(trials):
            high = rng.random(n) < p
            d = rng.beta(2, 20, n)
            x = np.where(high, 1 - d, d)
            _, lo, hi = stats.bootstrap_ci(x, n_resamples=1000, seed=t)
            hits += lo <= true <= hi
        rows.append({"n": n, "p_high": p, "coverage": hits / trials, "trials": trials})
    return pd.DataFrame(rows)
