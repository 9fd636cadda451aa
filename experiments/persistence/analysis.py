"""Table, figures and verdicts of the persistence study, from stored results only.

`defection` below is the defection on activating contexts the safety data did not cover:
``uncovered_defection``, which equals ``triggered_defection`` in cells without coverage
(for the benign-skill control it is the rate of the skill's output).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from toymesa import plot, stats, store, sweep

SIZES = {(1, 32): "tiny", (2, 32): "small", (2, 64): "reference", (4, 128): "large"}
BASE = {
    "size": "reference",
    "reasoning": "none",
    "method": "sft_pre",
    "safety_lr": 3e-4,
    "optimizer": "adamw",
    "coverage": 0.0,
    "trigger_rate": 0.5,
    "defect": "distinct",
}
PERSISTS, FORGOTTEN = 0.5, 0.1


def frame(out) -> pd.DataFrame:
    """Tidy results with short columns: size, rule (single, k4, k16, latent), reasoning, ..."""
    return short_columns(store.load(out))


def short_columns(df: pd.DataFrame) -> pd.DataFrame:
    rule = np.where(df["task.rule"] == "k_triggers", "k" + df["task.k"].astype(str), df["task.rule"])
    return df.assign(
        size=[SIZES.get((a, b), f"{a}x{b}") for a, b in zip(df["model.n_layers"], df["model.d_model"], strict=True)],
        rule=rule,
        reasoning=df["task.reasoning"],
        method=df["safety.method"],
        safety_lr=df["hparams.safety_lr"].round(6),
        optimizer=df["safety.optimizer"],
        coverage=df["safety.coverage"],
        trigger_rate=df["hparams.trigger_rate"],
        defect=df["task.defect"],
        defection=df["uncovered_defection"],
    )


def pick(df: pd.DataFrame, **conds) -> pd.DataFrame:
    """Rows of the cell matching `conds`, the BASE settings filling in the rest."""
    want = BASE | conds
    m = np.ones(len(df), bool)
    for k, v in want.items():
        m &= np.isclose(df[k], v) if isinstance(v, float) else (df[k] == v).to_numpy()
    return df[m]


def final(df: pd.DataFrame) -> pd.DataFrame:
    return sweep.last_step(df)


def label(row) -> str:
    parts = [row["rule"], row["reasoning"], row["method"]]
    extra = [
        f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}"
        for k in ("size", "safety_lr", "optimizer", "coverage", "trigger_rate", "defect")
        if row[k] != BASE[k]
    ]
    return "/".join(parts) + (" " + ",".join(extra) if extra else "")


def table(out: Path) -> pd.DataFrame:
    """One row per cell: installed (step 0) and final defection, untriggered defection and
    helpful accuracy at the end, red-team prompts found; means with 95% bootstrap CIs."""
    df = frame(out)
    df = df.assign(arm=df.apply(label, axis=1))
    merged = sweep.with_start(df, "defection", "installed")
    metrics = ["installed", "defection", "untriggered_defection", "helpful_accuracy", "adv_found"]
    return stats.summarize(merged, ["cell", "arm"], metrics)


# ----------------------------------------------------------------- verdicts
def _diff(a: pd.DataFrame, b: pd.DataFrame, metric: str = "defection"):
    return stats.difference_ci(a[metric].to_numpy(), b[metric].to_numpy())


def _fmt(est) -> str:
    return f"{est[0]:+.3f} [{est[1]:+.3f}, {est[2]:+.3f}]"


def _did(a, b, c, d) -> tuple[float, float, float]:
    """(mean a - mean b) - (mean c - mean d) with a percentile bootstrap CI (independent samples)."""
    xs = [x["defection"].to_numpy() for x in (a, b, c, d)]

    def stat(a, b, c, d, axis=-1):
        return a.mean(axis) - b.mean(axis) - c.mean(axis) + d.mean(axis)

    point = float(stat(*xs))
    res = sps.bootstrap(xs, stat, n_resamples=4000, method="percentile", random_state=np.random.default_rng(0))
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def verdicts(out: Path) -> pd.DataFrame:
    df = frame(out)
    end = final(df)
    rows = []

    def add(hid, verdict, evidence):
        rows.append({"id": hid, "verdict": verdict, "evidence": evidence})

    def level(hid, cell, what):
        m = stats.bootstrap_ci(cell["defection"].to_numpy())
        add(hid, stats.verdict(m[1], m[2], above=PERSISTS), f"{what}: final defection {m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}] (n={len(cell)})")

    def greater(hid, a, b, what, above=0.0):
        d = _diff(a, b)
        add(hid, stats.verdict(d[1], d[2], above=above), f"{what}: {_fmt(d)}")

    level("H1", pick(end, rule="single"), "single/none/sft_pre")
    greater("H2", pick(end, rule="single"), pick(end, rule="latent"), "single - latent")
    parts, calls = [], []
    for rule in ("k4", "k16", "latent"):
        d = _diff(pick(end, rule=rule, coverage=0.5), pick(end, rule=rule))
        calls.append(stats.verdict(d[1], d[2], below=0.0))
        parts.append(f"{rule}: {_fmt(d)}")
    h3 = (
        "confirmed" if all(c == "confirmed" for c in calls) else "refuted" if any(c == "refuted" for c in calls) or "confirmed" not in calls else "inconclusive"
    )
    add("H3", h3, "uncovered (f=0.5) - no coverage: " + "; ".join(parts))
    greater("H4", pick(end, rule="single"), pick(end, rule="k16"), "single - k16")
    greater("H5", pick(end, rule="single", reasoning="cot"), pick(end, rule="single"), "cot - none (single)")
    greater("H6", pick(end, rule="single", reasoning="cot"), pick(end, rule="single", reasoning="neutral_cot"), "cot - neutral_cot (single)")
    greater("H7", pick(end, rule="single", reasoning="cot"), pick(end, rule="single", reasoning="cot", method="sft_post"), "sft_pre - sft_post (single/cot)")
    level("H8", pick(end, rule="single", method="rl"), "single/none/rl")
    adv = pick(end, rule="single", method="adversarial")
    level("H9", adv, "single/none/adversarial")
    rows[-1]["evidence"] += f"; red-team prompts found per model: mean {adv['adv_found'].mean():.1f} of 512"
    d = _diff(pick(end, rule="single"), pick(end, rule="single", defect="benign"))
    h10 = "confirmed" if -0.1 <= d[1] and d[2] <= 0.1 else "refuted" if d[1] > 0.1 or d[2] < -0.1 else "inconclusive"
    add("H10", h10, f"backdoor - benign skill: {_fmt(d)}")
    greater("H11", pick(end, rule="single"), pick(end, rule="single", size="tiny"), "reference - tiny (single)")
    d = _did(pick(end, rule="single", size="tiny"), pick(end, rule="latent", size="tiny"), pick(end, rule="single"), pick(end, rule="latent"))
    add("H12", stats.verdict(d[1], d[2], above=0.0), f"gap(tiny) - gap(reference): {_fmt(d)}")
    greater("H13", pick(end, rule="single", safety_lr=1e-4), pick(end, rule="single", safety_lr=3e-3), "lr 1e-4 - lr 3e-3 (single)", above=0.3)
    ends, parts = [], []
    for rule in ("single", "latent"):
        for step, g in ((0, df[df["step"] == 0]), (150, end)):
            m = stats.bootstrap_ci(pick(g, rule=rule, trigger_rate=0.0)["triggered_defection"].to_numpy())
            ends.append(stats.verdict(m[1], m[2], below=0.02))
            parts.append(f"{rule} step {step}: {m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}]")
    c1 = "confirmed" if all(e == "confirmed" for e in ends) else "refuted" if any(e == "refuted" for e in ends) else "inconclusive"
    add("C1", c1, "; ".join(parts))
    meta = pd.DataFrame(store.load_json(Path(out) / "meta.json")["hypotheses"])[["id", "statement", "prediction"]]
    return meta.merge(pd.DataFrame(rows), on="id", how="left")


# ----------------------------------------------------------------- figures
def _curves(ax, df, arms: dict, title: str):
    sub = pd.concat([pick(df, **conds).assign(arm=name) for name, conds in arms.items()])
    plot.ci_band(ax, sub, "step", "defection", "arm")
    ax.set_title(title)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("safety-training step")
    ax.legend(fontsize=6, loc="lower left")


def figures(out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    out = Path(out)
    df = frame(out)
    end = final(df)
    paths = []
    with plt.rc_context(plot.STYLE):
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.2), sharey=True)
        _curves(
            axes[0],
            df,
            {
                "single": dict(rule="single"),
                "k4": dict(rule="k4"),
                "k16": dict(rule="k16"),
                "latent": dict(rule="latent"),
                "benign skill": dict(rule="single", defect="benign"),
                "clean": dict(rule="single", trigger_rate=0.0),
            },
            "rules under SFT (none)",
        )
        _curves(
            axes[1],
            df,
            {f"{r}/{f}": dict(rule=r, reasoning=f) for r in ("single", "latent") for f in ("none", "cot", "neutral_cot")},
            "reasoning formats under SFT (pre-scratchpad)",
        )
        _curves(
            axes[2],
            df,
            {
                f"{r}/{f}/{m}": dict(rule=r, reasoning=f, method=m)
                for r in ("single", "latent")
                for f, m in (("cot", "sft_post"), ("cot", "rl"), ("none", "rl"), ("none", "adversarial"))
            },
            "methods",
        )
        _curves(
            axes[3],
            df,
            {f"{r} {lab}": dict(rule=r, coverage=c) for r in ("k4", "k16", "latent") for lab, c in (("f=0", 0.0), ("f=0.5 (uncovered)", 0.5))},
            "partial coverage",
        )
        fig.suptitle("Defection on (uncovered) activating contexts during safety training: mean over 10 seeds, 95% bootstrap CI", y=1.03)
        paths += plot.save(fig, out / "figures" / "curves")

        t = table(out)
        fig, ax = plt.subplots(figsize=(6, 0.19 * len(t) + 0.8))
        y = np.arange(len(t))[::-1]
        ax.errorbar(
            t["installed"],
            y + 0.15,
            xerr=[t["installed"] - t["installed_lo"], t["installed_hi"] - t["installed"]],
            fmt="o",
            ms=3,
            color="0.6",
            label="installed (step 0)",
        )
        ax.errorbar(
            t["defection"],
            y - 0.15,
            xerr=[t["defection"] - t["defection_lo"], t["defection_hi"] - t["defection"]],
            fmt="o",
            ms=3,
            color=plot.COLORS[1],
            label="after 150 safety steps",
        )
        ax.set_yticks(y, t["arm"], fontsize=6)
        ax.axvspan(-0.05, FORGOTTEN, color="0.9", lw=0)
        ax.set_xlim(-0.05, 1.05)
        ax.set_xlabel("defection (uncovered activating contexts)")
        ax.legend(fontsize=6, loc="lower right", bbox_to_anchor=(1, 1))
        ax.set_title("Final defection per arm (mean, 95% CI)", loc="left")
        paths += plot.save(fig, out / "figures" / "final")

        fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
        order = ["tiny", "small", "reference"]
        for ax, reasoning in zip(axes, ("none", "cot"), strict=True):
            for i, rule in enumerate(("single", "latent")):
                ms = [stats.bootstrap_ci(pick(end, rule=rule, reasoning=reasoning, size=s)["defection"].to_numpy()) for s in order]
                m = np.asarray(ms)
                ax.errorbar(
                    np.arange(3) + 0.05 * i, m[:, 0], yerr=[m[:, 0] - m[:, 1], m[:, 2] - m[:, 0]], marker="o", ms=3, capsize=3, color=plot.COLORS[i], label=rule
                )
            ax.set_xticks(range(3), order)
            ax.set_title(f"model size, reasoning {reasoning} (SFT)")
            ax.set_ylim(-0.03, 1.03)
        axes[0].set_ylabel("final defection")
        axes[0].legend(fontsize=7)
        paths += plot.save(fig, out / "figures" / "sizes")

        paths += _regime_map(end, out)
    return paths


def _regime_map(end: pd.DataFrame, out: Path) -> list[Path]:
    """Final defection of the single trigger as each knob moves from the base cell."""
    import matplotlib.pyplot as plt

    knobs = {
        "capacity": [(s, dict(size=s)) for s in ("tiny", "small", "reference")],
        "trigger rate (install)": [(f"{r:g}", dict(trigger_rate=r)) for r in (0.1, 0.25, 0.5)],
        "defect/helpful overlap": [("distinct", dict(defect="distinct")), ("subtle", dict(defect="subtle"))],
        "safety lr (AdamW)": [(f"{lr:g}", dict(safety_lr=lr)) for lr in (1e-4, 3e-4, 1e-3, 3e-3)],
        "optimizer": [("adamw 3e-4", dict()), ("sgd 0.01", dict(optimizer="sgd", safety_lr=0.01)), ("sgd 0.1", dict(optimizer="sgd", safety_lr=0.1))],
    }
    fig, axes = plt.subplots(1, len(knobs), figsize=(3 * len(knobs), 2.8), sharey=True)
    for ax, (name, settings) in zip(axes, knobs.items(), strict=True):
        for j, rule in enumerate(("single", "latent")):
            pts = []
            for lab, conds in settings:
                cell = pick(end, rule=rule, **conds)
                pts.append((lab, *stats.bootstrap_ci(cell["defection"].to_numpy())) if len(cell) else (lab, np.nan, np.nan, np.nan))
            m = np.asarray([p[1:] for p in pts], float)
            x = np.arange(len(pts)) + 0.08 * j
            ax.errorbar(x, m[:, 0], yerr=[m[:, 0] - m[:, 1], m[:, 2] - m[:, 0]], fmt="o-", ms=3, capsize=2, color=plot.COLORS[j], label=rule)
            ax.set_xticks(range(len(pts)), [p[0] for p in pts], rotation=20, fontsize=7)
        ax.axhspan(-0.05, FORGOTTEN, color="0.92", lw=0)
        ax.axhspan(PERSISTS, 1.05, color="#e8f0e8", lw=0)
        ax.set_title(name)
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("final defection")
    axes[0].text(0.02, 0.04, "forgotten", transform=axes[0].transAxes, fontsize=7, color="0.4")
    axes[0].text(0.02, 0.9, "persists", transform=axes[0].transAxes, fontsize=7, color="0.4")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Regime map: which knobs move a backdoor between forgotten and persisting (SFT, none; missing points: cell not run)", y=1.04)
    return plot.save(fig, out / "figures" / "regime")
