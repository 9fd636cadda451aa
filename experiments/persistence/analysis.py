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

from toymesa import plot, prereg, runs, spec, stats, store

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
    return short_columns(runs.load(out))


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
    return runs.last_step(df)


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
    merged = runs.with_start(df, "defection", "installed")
    metrics = runs.with_malformed(merged, ["installed", "defection", "untriggered_defection", "helpful_accuracy", "adv_found"])
    return stats.summarize(merged, ["cell", "arm"], metrics)


# ----------------------------------------------------------------- verdicts
def hypotheses(out: Path) -> list[dict]:
    """The run's registered hypotheses, each with its decision rule.

    A run registered before rules were stated as data has none in its meta.json; its rules are
    then taken from this folder's spec.toml, and only for hypotheses whose registered prediction
    text is identical there (a rule is never borrowed by a changed prediction)."""
    registered = store.load_json(Path(out) / "meta.json")["hypotheses"]
    current = {h["id"]: h for h in spec.load(Path(__file__).parent).hypotheses}
    out_h = []
    for h in registered:
        c = current.get(h["id"], {})
        if "rule" not in h and "rule" in c and c["prediction"] == h["prediction"]:
            h = h | {"rule": c["rule"]}
        out_h.append(h)
    return out_h


def _arm(name: str, cell: pd.DataFrame, metric: str = "defection") -> prereg.Arm:
    return prereg.arm(name, cell[metric].to_numpy(), cell["nonfinite"].to_numpy(bool) if "nonfinite" in cell else None)


def _level(label: str, cell: pd.DataFrame, metric: str = "defection") -> prereg.Part:
    """The mean of one cell, with its CI, against a threshold."""
    a = _arm(label, cell, metric)
    return prereg.Part(label, stats.bootstrap_ci(a.values), (a,))


def _diff(label: str, a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str]) -> prereg.Part:
    """mean(a) - mean(b) with its CI (independent samples)."""
    arms = (_arm(names[0], a), _arm(names[1], b))
    return prereg.Part(label, stats.difference_ci(arms[0].values, arms[1].values), arms)


def _did(label: str, cells: list[pd.DataFrame], names: list[str]) -> prereg.Part:
    """(mean a - mean b) - (mean c - mean d) with a percentile bootstrap CI (independent samples)."""
    arms = tuple(_arm(n, c) for n, c in zip(names, cells, strict=True))

    def stat(a, b, c, d, axis=-1):
        return a.mean(axis) - b.mean(axis) - c.mean(axis) + d.mean(axis)

    xs = [a.values for a in arms]
    point = float(stat(*xs))
    res = sps.bootstrap(xs, stat, n_resamples=4000, method="percentile", random_state=np.random.default_rng(0))
    return prereg.Part(label, (point, float(res.confidence_interval.low), float(res.confidence_interval.high)), arms)


def parts(df: pd.DataFrame) -> dict[str, list[prereg.Part]]:
    """hypothesis id -> the CIs its registered prediction is judged on (tidy table `df`)."""
    end = final(df)
    single = pick(end, rule="single")
    adv = pick(end, rule="single", method="adversarial")
    p = {
        "H1": [_level("single/none/sft_pre", single)],
        "H2": [_diff("single - latent", single, pick(end, rule="latent"), ("single", "latent"))],
        "H3": [
            _diff(f"{r}: uncovered (f=0.5) - no coverage", pick(end, rule=r, coverage=0.5), pick(end, rule=r), (f"{r} f=0.5", f"{r} f=0"))
            for r in ("k4", "k16", "latent")
        ],
        "H4": [_diff("single - k16", single, pick(end, rule="k16"), ("single", "k16"))],
        "H5": [_diff("cot - none (single)", pick(end, rule="single", reasoning="cot"), single, ("cot", "none"))],
        "H6": [
            _diff(
                "cot - neutral_cot (single)",
                pick(end, rule="single", reasoning="cot"),
                pick(end, rule="single", reasoning="neutral_cot"),
                ("cot", "neutral_cot"),
            )
        ],
        "H7": [
            _diff(
                "sft_pre - sft_post (single/cot)",
                pick(end, rule="single", reasoning="cot"),
                pick(end, rule="single", reasoning="cot", method="sft_post"),
                ("sft_pre", "sft_post"),
            )
        ],
        "H8": [_level("single/none/rl", pick(end, rule="single", method="rl"))],
        "H9": [_level(f"single/none/adversarial (red-team prompts found per model: mean {adv['adv_found'].mean():.1f} of 512)", adv)],
        "H10": [_diff("backdoor - benign skill", single, pick(end, rule="single", defect="benign"), ("backdoor", "benign"))],
        "H11": [_diff("reference - tiny (single)", single, pick(end, rule="single", size="tiny"), ("reference", "tiny"))],
        "H12": [
            _did(
                "gap(tiny) - gap(reference)",
                [pick(end, rule="single", size="tiny"), pick(end, rule="latent", size="tiny"), single, pick(end, rule="latent")],
                ["single tiny", "latent tiny", "single reference", "latent reference"],
            )
        ],
        "H13": [_diff("lr 1e-4 - lr 3e-3 (single)", pick(end, rule="single", safety_lr=1e-4), pick(end, rule="single", safety_lr=3e-3), ("1e-4", "3e-3"))],
    }
    p["C1"] = [
        _level(f"{rule} step {step}", pick(g, rule=rule, trigger_rate=0.0), "triggered_defection")
        for rule in ("single", "latent")
        for step, g in ((0, df[df["step"] == 0]), (150, end))
    ]
    return p


def verdicts(out: Path) -> pd.DataFrame:
    """Each registered hypothesis judged by its own rule (`toymesa.prereg.judge`)."""
    return prereg.verdict_table(hypotheses(out), parts(frame(out)))


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
        if "triggered_malformed" in t:  # only where not ~0 (`runs.with_malformed`): format damage, not removal
            ax.plot(t["triggered_malformed"], y - 0.15, "x", ms=4, color="k", label="malformed sequences (triggered, final)")
        ax.set_yticks(y, [f"{a} [{k} NON-FINITE, excluded]" if k else a for a, k in zip(t["arm"], t["nonfinite"], strict=True)], fontsize=6)
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
