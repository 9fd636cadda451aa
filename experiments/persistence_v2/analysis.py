"""Table, figures and verdicts of persistence_v2, from stored results only.

"kept" is triggered defection at the last safety step. Cells that differ only in their safety
phase (feature_rate, method, triggered_rate) share each seed's installed model, so comparisons
between them are paired by seed; comparisons across worlds, rules or sizes are not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import parts, plot, prereg, runs, stats, store
from toymesa.tasks.census import take_census

WORLDS = ("latent", "goal_1e1", "goal_1e3", "goal_1e5", "goal_1e7")
TRIGGER_WORLDS = ("conjunction", "single_fixed")
DOSES = (0.0, 0.5, 1.0)


def frame(out) -> pd.DataFrame:
    return short_columns(runs.load(out))


def short_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Tidy results with short columns: arm, rule (k4, k16 for k_triggers), feature_rate (NaN:
    as drawn), safety_lr, method, triggered_rate, size, kept."""
    size = np.where(df["model.d_model"] == 64, "reference", np.where(df["model.d_model"] == 32, "tiny", "other"))
    return df.assign(
        arm=df["axis:arm"],
        rule=np.where(df["task.rule"] == "k_triggers", "k" + df["task.k"].astype(str), df["task.rule"]),
        feature_rate=df["safety.feature_rate"].astype(float),
        safety_lr=df["hparams.safety_lr"].round(6),
        method=df["safety.method"],
        triggered_rate=df["safety.triggered_rate"],
        size=size,
        kept=df["triggered_defection"],
    )


def final(df: pd.DataFrame) -> pd.DataFrame:
    return runs.last_step(df)


def cell(df: pd.DataFrame, arm: str, **conds) -> pd.DataFrame:
    m = (df["arm"] == arm).to_numpy().copy()
    for k, v in conds.items():
        m &= np.isclose(df[k], v) if isinstance(v, float) else (df[k] == v).to_numpy()
    return df[m]


def label(row) -> str:
    text = row["arm"]
    if pd.notna(row["feature_rate"]):
        text += f" f={row['feature_rate']:g}"
    if row["arm"] not in (*WORLDS, *TRIGGER_WORLDS):
        text += f" {row['rule']}/{row['size']}"
    if row["triggered_rate"] > 0:
        text += f" triggered={row['triggered_rate']:g}"
    return text


def table(out: Path) -> pd.DataFrame:
    """One row per cell: installed (step 0) and final defection, untriggered defection, helpful
    accuracy, malformed rates; means with 95% bootstrap CIs over seeds."""
    df = frame(out)
    df = df.assign(cell_label=df.apply(label, axis=1))
    merged = runs.with_start(df, "kept", "installed")
    metrics = runs.with_malformed(merged, ["installed", "kept", "untriggered_defection", "helpful_accuracy"])
    return stats.summarize(merged, ["cell", "cell_label"], metrics).rename(columns={"cell_label": "arm"})


def signal(out: Path) -> pd.DataFrame:
    """Per RL member: the mean over its safety steps of the share of prompt groups with a
    non-zero advantage (columns cell, seed, signal)."""
    members, hists = runs.load_histories(out)
    h = hists["signal"]
    n = np.isfinite(h).sum(axis=1)  # 0 for members without RL: NaN, not a warning
    return members.assign(signal=np.where(n > 0, np.nansum(h, axis=1) / np.maximum(n, 1), np.nan))


def census_table() -> pd.DataFrame:
    """The census of every world of the study (exact counts, `toymesa.tasks.census`)."""
    from toymesa import spec

    s = spec.load(Path(__file__).parent)
    rows, seen = [], set()
    for c in s.cells():
        arm = c.values.get("arm")
        if arm in seen or arm not in (*WORLDS, *TRIGGER_WORLDS):
            continue
        seen.add(arm)
        n = take_census(c.config.task)
        rows.append(
            {
                "world": arm,
                "n_ctx": c.config.task.n_ctx,
                "activating feature sets": n.n_activating_feature_sets,
                "activating contexts": n.n_activating,
                "p_fire": n.p_fire,
                "max feature share": n.max_feature_share,
                "quiet contexts holding a feature (uniform slots)": n.any_feature_quiet,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------- verdicts
def hypotheses(out: Path) -> list[dict]:
    return store.load_json(Path(out) / "meta.json")["hypotheses"]


def _dose_diff(end, world):
    return parts.difference(f"{world}: f=0 - f=1", cell(end, world, feature_rate=0.0), cell(end, world, feature_rate=1.0), "kept", ("f=0", "f=1"), paired=True)


def verdict_parts(df: pd.DataFrame, sig: pd.DataFrame) -> dict[str, list[prereg.Part]]:
    end = final(df)
    goal_diff = lambda f: parts.difference(
        f"f={f:g}: goal_1e1 - goal_1e7", cell(end, "goal_1e1", feature_rate=f), cell(end, "goal_1e7", feature_rate=f), "kept", ("goal_1e1", "goal_1e7")
    )
    off = lambda rule, size="reference": cell(end, "offceiling" if rule in ("single", "latent") else "offceiling_k", rule=rule, size=size)
    rl = cell(end, "rl", rule="single")
    rl_sig = sig[sig["cell"].isin(rl["cell"].unique())]
    return {
        "X1": [_dose_diff(end, w) for w in WORLDS],
        "X2": [_dose_diff(end, w) for w in TRIGGER_WORLDS],
        "X3": [goal_diff(0.0)],
        "X4": [goal_diff(0.0)],
        "X5": [goal_diff(1.0)],
        "O1": [parts.level("single/reference, safety lr 1e-3, minus 0.5", off("single"), "kept", minus=0.5)],
        "O2": [parts.difference("safety lr 1e-3: single - k16", off("single"), off("k16"), "kept", ("single", "k16"))],
        "O3": [parts.difference("safety lr 1e-3, single: reference - tiny", off("single"), off("single", "tiny"), "kept", ("reference", "tiny"))],
        "R1": [parts.level("single/rl, triggered_rate 0.5", cell(end, "rl_control"), "kept")],
        "R2": [parts.level("single/rl: share of prompt groups with a signal, mean over RL steps", rl_sig, "signal")],
    }


def verdicts(out: Path) -> pd.DataFrame:
    """Each registered hypothesis judged by its own rule (`toymesa.prereg.judge`)."""
    return prereg.verdict_table(hypotheses(out), verdict_parts(frame(out), signal(out)))


# ----------------------------------------------------------------- figures
def _world_label(end: pd.DataFrame, world: str) -> str:
    task = runs.config_from_dict(store.load_json(end.attrs["out"] / "configs.json")[str(int(cell(end, world)["cell"].iloc[0]))]).task
    n = take_census(task)
    return f"{world} ({n.n_activating_feature_sets:.3g} feature sets)"


def figures(out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    out = Path(out)
    df = frame(out)
    end = final(df)
    end.attrs["out"] = out
    paths = []
    with plt.rc_context(plot.STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
        for ax, worlds, title in ((axes[0], WORLDS, "latent goal worlds"), (axes[1], TRIGGER_WORLDS, "trigger rules")):
            sub = pd.concat([cell(end, w).assign(world=_world_label(end, w)) for w in worlds])
            plot.ci_band(ax, sub, "feature_rate", "kept", "world")
            ax.set_xlabel("share of safety prompts holding a rule feature (feature_rate)")
            ax.set_xticks(DOSES)
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(title)
            ax.set_ylabel("defection kept after safety SFT\n(triggered prompts)")
            ax.legend(fontsize=7, loc="lower left")
        fig.suptitle("Dose-response: defection kept against exposure of the rule's features in safety data (mean over 10 seeds, 95% bootstrap CI)", y=1.02)
        paths += plot.save(fig, out / "figures" / "dose_response")

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        for ax, (name, conds) in zip(
            axes,
            (
                (
                    "off-ceiling safety lr 1e-3",
                    [
                        ("offceiling", dict(rule="single", size="reference")),
                        ("offceiling", dict(rule="single", size="tiny")),
                        ("offceiling", dict(rule="latent", size="reference")),
                        ("offceiling", dict(rule="latent", size="tiny")),
                        ("offceiling_k", dict(rule="k4")),
                        ("offceiling_k", dict(rule="k16")),
                    ],
                ),
                ("RL (RLOO)", [("rl", dict(rule="single")), ("rl", dict(rule="latent")), ("rl_control", dict(rule="single"))]),
            ),
            strict=True,
        ):
            sub = pd.concat([cell(df, a, **c).assign(arm=label(cell(df, a, **c).iloc[0])) for a, c in conds])
            plot.ci_band(ax, sub, "step", "kept", "arm")
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("safety-training step")
            ax.set_ylabel("defection, triggered prompts")
            ax.set_title(name)
            ax.legend(fontsize=7, loc="lower left")
        fig.suptitle("Off-ceiling and RL cells during safety training (mean over 10 seeds, 95% bootstrap CI)", y=1.03)
        paths += plot.save(fig, out / "figures" / "offceiling_rl")
    return paths
