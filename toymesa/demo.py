"""The main job: install backdoors and goals in populations and measure them.

Arms: activation rule {single, latent} x reasoning {none, cot}, each a population of
seeds trained from the built-in default config (`demo_config`). For each arm it prints
triggered defection, untriggered defection and helpful accuracy with 95% bootstrap CIs
over seeds, and writes under OUT:

* ``results.csv``  one row per arm x seed (config fields and metrics as columns)
* ``history.csv``  one row per arm x seed x step (training loss and answer accuracy)
* ``summary.csv``  one row per arm (means and CIs)
* ``demo.png`` / ``demo.pdf``
* ``arms/``        each finished arm, written as soon as it finishes: an interrupted demo
  resumes from here (rerun the same command); `--fresh` ignores them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import plot, stats, store
from toymesa.config import Config, demo_config
from toymesa.evaluate import evaluate_population
from toymesa.train import population

ARMS = [("single", "none"), ("single", "cot"), ("latent", "none"), ("latent", "cot")]
METRICS = ["triggered_defection", "untriggered_defection", "helpful_accuracy"]


def arm_config(rule: str, reasoning: str, steps: int | None = None) -> Config:
    """The demo config of one arm; `steps` overrides the length (warmup shrinks to fit)."""
    cfg = demo_config(rule, reasoning)
    if steps is None:
        return cfg
    return cfg.replace(train=dict(steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10)))


def config_columns(cfg: Config) -> dict:
    """Flat `group.field` columns of a config, for tidy tables."""
    cols = {}
    for group in ("model", "task", "train"):
        for k, v in dataclasses.asdict(getattr(cfg, group)).items():
            cols[f"{group}.{k}"] = str(v) if isinstance(v, tuple) else v
    cols.update({f"hparams.{k}": v for k, v in cfg.hparams._asdict().items()})
    return cols


def _fingerprint(cfg: Config, seeds) -> str:
    return hashlib.sha256(repr((cfg, list(seeds))).encode()).hexdigest()[:10]


def run_arm(cfg: Config, seeds, label: str):
    """Train and evaluate one arm; returns (per-seed DataFrame, history DataFrame)."""
    t0 = time.perf_counter()
    states, hist = population(cfg, seeds, progress=label)
    metrics = {k: np.asarray(v) for k, v in evaluate_population(cfg, states.params, np.asarray(seeds, np.int32)).items()}
    seconds = time.perf_counter() - t0
    base = {"arm": label, "rule": cfg.task.rule, "reasoning": cfg.task.reasoning}
    rows = pd.DataFrame({**base, "seed": seeds, **metrics, "final_loss": hist["loss"][:, -1], "seconds": seconds, **config_columns(cfg)})
    n, steps = hist["loss"].shape
    history = pd.DataFrame(
        {
            **base,
            "seed": np.repeat(seeds, steps),
            "step": np.tile(np.arange(1, steps + 1), n),
            "loss": hist["loss"].ravel(),
            "answer_acc": hist["answer_acc"].ravel(),
        }
    )
    return rows, history


def figure(results: pd.DataFrame, summary: pd.DataFrame, history: pd.DataFrame, out: Path):
    import matplotlib.pyplot as plt

    with plt.rc_context(plot.STYLE):
        fig, axes = plt.subplots(1, 4, figsize=(12, 2.8))
        for ax, m in zip(axes, METRICS, strict=False):
            plot.ci_bars(ax, summary, results, m)
        plot.mean_band(axes[3], history, "step", "loss", "arm", log=True)
        axes[3].set_title("training loss (median, 10-90% of seeds)")
        fig.suptitle(f"Backdoors and goals as installed ({summary['n'].min()} seeds per arm, 95% bootstrap CI)", y=1.06)
        return plot.save(fig, out / "demo")


def main(out="results/demo", n_seeds: int = 8, steps: int | None = None, fresh: bool = False, echo=print):
    """Run every arm (resuming finished ones), then write tables and the figure."""
    out = Path(out)
    seeds = np.arange(n_seeds)
    t0 = time.perf_counter()
    results, histories = [], []
    for rule, reasoning in ARMS:
        cfg = arm_config(rule, reasoning, steps)
        label = f"{rule}/{reasoning}"
        stem = out / "arms" / f"{rule}-{reasoning}-{_fingerprint(cfg, seeds)}"
        if not fresh and stem.with_suffix(".csv").exists():
            rows, hist = store.load(stem.with_suffix(".csv")), store.load(stem.with_suffix(".history.csv"))
            echo(f"{label}: reusing finished arm {stem.name} (pass --fresh to retrain)")
        else:
            rows, hist = run_arm(cfg, seeds, label)
            store.save_frame(hist, stem.with_suffix(".history.csv"))
            store.save_frame(rows, stem.with_suffix(".csv"))  # written last: marks the arm done
            echo(f"{label}: trained and evaluated {n_seeds} seeds in {rows['seconds'].iloc[0]:.1f}s")
        results.append(rows)
        histories.append(hist)
    results, history = pd.concat(results, ignore_index=True), pd.concat(histories, ignore_index=True)
    summary = stats.summarize(results, ["arm"], METRICS + ["decision_accuracy"])
    store.save_frame(results, out / "results.csv")
    store.save_frame(history, out / "history.csv")
    store.save_frame(summary, out / "summary.csv")
    paths = figure(results, summary, history, out)
    return summary, paths, time.perf_counter() - t0
