"""The main job: install backdoors and goals in populations and measure them.

Arms: activation rule {single, latent} x reasoning {none, cot}, each a population of
seeds of the built-in default config (`toymesa.config.demo_config`), run as a sweep
(`toymesa.sweep`), so an interrupted demo resumes from its finished arms. For each arm it
reports triggered defection, untriggered defection and helpful accuracy with 95%
bootstrap CIs over seeds, and writes under OUT the sweep's run folder (results.csv,
summary.csv, chunks/, meta.json ...) plus ``figures/demo.png`` / ``.pdf``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from toymesa import plot, stats, store, sweep
from toymesa import spec as spec_mod
from toymesa.config import demo_config

RULES, FORMATS = ("single", "latent"), ("none", "cot")
ARMS = [(r, f) for r in RULES for f in FORMATS]
METRICS = ["triggered_defection", "untriggered_defection", "helpful_accuracy"]
DESCRIPTION = "Install a single-trigger backdoor and a many-context latent goal, without and with chain-of-thought, in populations of the reference model."


def spec(n_seeds: int = 8, steps: int | None = None, base: dict | None = None) -> spec_mod.Spec:
    """The demo as a sweep spec. `steps` overrides the length (warmup shrinks to fit);
    `base` adds or overrides ``group.field`` base values (tests shrink the model with it)."""
    cfg = demo_config()
    b = {"model": "reference", "task.helpful": cfg.task.helpful, "task.seq_len": "min"}
    if steps is not None:
        b.update({"train.steps": steps, "train.warmup_steps": min(cfg.train.warmup_steps, steps // 10)})
    b.update(base or {})
    grid = {"task": {"rule": list(RULES), "reasoning": list(FORMATS)}}
    raw = {"name": "demo", "description": DESCRIPTION, "seeds": n_seeds, "base": spec_mod.nest(b), "grid": grid}
    return spec_mod.parse(raw, source="toymesa.demo")


def _arms(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(arm=df["task.rule"] + "/" + df["task.reasoning"])


def table(out) -> pd.DataFrame:
    """One row per arm: final-step metrics, mean and 95% bootstrap CI over seeds."""
    df = _arms(store.load(out))
    last = sweep.last_step(df)
    return stats.summarize(last, ["arm"], METRICS + ["decision_accuracy"])


def figures(out) -> list[Path]:
    import matplotlib.pyplot as plt

    out = Path(out)
    df = _arms(store.load(out))
    last = sweep.last_step(df)
    summary = table(out)
    members, hist = sweep.load_histories(out)
    cells = df.drop_duplicates("cell").set_index("cell")["arm"]
    steps = hist["loss"].shape[1]
    long = pd.DataFrame(
        {
            "arm": members["cell"].map(cells).repeat(steps).to_numpy(),
            "step": list(range(1, steps + 1)) * len(members),
            "loss": hist["loss"].ravel(),
        }
    )
    with plt.rc_context(plot.STYLE):
        fig, axes = plt.subplots(1, 4, figsize=(12, 2.8))
        for ax, m in zip(axes, METRICS, strict=False):
            plot.ci_bars(ax, summary, last, m)
        plot.mean_band(axes[3], long, "step", "loss", "arm", log=True)
        axes[3].set_title("training loss (median, 10-90% of seeds)")
        fig.suptitle(f"Backdoors and goals as installed ({summary['n'].min()} seeds per arm, 95% bootstrap CI)", y=1.06)
        return plot.save(fig, out / "figures" / "demo")


def main(out="results/demo", n_seeds: int = 8, steps: int | None = None, fresh: bool = False, echo=print, base: dict | None = None, progress: bool = True):
    """Run (or resume) the demo sweep, then write its table and figure."""
    t0 = time.perf_counter()
    sweep.run(spec(n_seeds, steps, base), out, fresh=fresh, echo=echo, progress=progress)
    summary = table(out)
    paths = figures(out)
    return summary, paths, time.perf_counter() - t0
