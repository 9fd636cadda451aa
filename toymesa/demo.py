"""The main job: install backdoors and goals in populations, then safety-train them.

Arms: activation rule {single, latent} x reasoning {none, cot}, each a population of
seeds of the built-in default config (`toymesa.presets.demo_config`). Each arm installs its
behaviour, then runs safety SFT (`toymesa.safety`, ``sft_pre``: helpful answers on
untriggered prompts, for CoT the answer without the scratchpad) and is evaluated every
SAFETY_EVERY safety steps. It runs as a sweep (`toymesa.sweep`), so an interrupted demo
resumes from its finished arms. For each arm it reports the installed and the final
triggered defection, untriggered defection and helpful accuracy with 95% bootstrap CIs
over seeds, and writes under OUT the sweep's run folder (results.csv, summary.csv,
chunks/, installs/, meta.json ...) plus ``figures/demo.png`` / ``.pdf``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from toymesa import plot, runs, stats, sweep
from toymesa import spec as spec_mod
from toymesa.presets import demo_config

RULES, FORMATS = ("single", "latent"), ("none", "cot")
ARMS = [(r, f) for r in RULES for f in FORMATS]
METRICS = ["triggered_defection", "untriggered_defection", "helpful_accuracy"]
SAFETY_STEPS, SAFETY_EVERY = demo_config().safety.steps, 25
DESCRIPTION = (
    "Install a single-trigger backdoor and a many-context latent goal, without and with chain-of-thought, in populations of the reference model; "
    + "then apply safety SFT on untriggered helpful data and measure what persists."
)


def spec(n_seeds: int = 8, steps: int | None = None, base: dict | None = None, safety_steps: int = SAFETY_STEPS, rules=RULES, formats=FORMATS) -> spec_mod.Spec:
    """The demo as a sweep spec. `steps` overrides the install length (the warmup
    follows it) and `safety_steps` the safety SFT length; `base` adds or overrides ``group.field``
    base values (tests shrink the model with it); `rules` x `formats` are the arms (tests run
    fewer: each arm compiles its own programs)."""
    cfg = demo_config()
    b = {"model": "reference", "task.helpful": cfg.task.helpful, "task.seq_len": "min", "safety.method": cfg.safety.method, "safety.steps": safety_steps}
    if steps is not None:
        b["train.steps"] = steps  # the warmup follows (10% of the steps)
    b.update(base or {})
    grid = {"task": {"rule": list(rules), "reasoning": list(formats)}}
    every = min(SAFETY_EVERY, safety_steps)
    raw = {
        "name": "demo",
        "description": DESCRIPTION,
        "seeds": n_seeds,
        "base": spec_mod.nest(b),
        "grid": grid,
        "run": {"eval_every": every, "eval_prompts": 128},
    }
    return spec_mod.parse(raw, source="toymesa.demo")


def _arms(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(arm=df["task.rule"] + "/" + df["task.reasoning"])


def table(out) -> pd.DataFrame:
    """One row per arm: triggered defection as installed (safety step 0) and the final
    metrics after safety SFT, mean and 95% bootstrap CI over seeds."""
    df = _arms(runs.load(out))
    last = runs.with_start(df, "triggered_defection", "installed_defection")
    shown = [m for m in ("decision_accuracy", *runs.MALFORMED, "triggered_defection_valid") if m in last]
    return stats.summarize(last, ["arm"], ["installed_defection", *METRICS, *shown])


def figures(out) -> list[Path]:
    import matplotlib.pyplot as plt

    out = Path(out)
    df = _arms(runs.load(out))
    last = runs.last_step(df)
    summary = table(out)
    with plt.rc_context(plot.STYLE):
        panels = runs.with_malformed(summary, METRICS)  # the malformed rate gets a panel wherever it is not ~0
        fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3.25 * (1 + len(panels)) + 0.5, 2.9), gridspec_kw={"width_ratios": [1.5] + [1] * len(panels)})
        plot.ci_band(axes[0], df, "step", "triggered_defection", "arm")
        axes[0].set(title="triggered defection during safety SFT", xlabel="safety step (0 = installed)", ylim=(-0.03, 1.03))
        axes[0].legend(fontsize=7)
        for ax, m in zip(axes[1:], panels, strict=True):
            plot.ci_bars(ax, summary, last, m)
            ax.set_title(f"{m.replace('_', ' ')} after SFT")
        fig.suptitle(f"Backdoors and goals under safety SFT ({summary['n'].min()} seeds per arm, mean and 95% bootstrap CI)", y=1.06)
        return plot.save(fig, out / "figures" / "demo")


def main(
    out="results/demo",
    n_seeds: int = 8,
    steps: int | None = None,
    fresh: bool = False,
    echo=print,
    base: dict | None = None,
    progress: bool = True,
    safety_steps: int = SAFETY_STEPS,
    rules=RULES,
    formats=FORMATS,
):
    """Run (or resume) the demo sweep, then write its table and figure."""
    t0 = time.perf_counter()
    sweep.run(spec(n_seeds, steps, base, safety_steps, rules, formats), out, fresh=fresh, echo=echo, progress=progress)
    summary = table(out)
    paths = figures(out)
    return summary, paths, time.perf_counter() - t0
