"""Reading a run folder back: tidy tables, histories and parameters from stored chunks.

Everything here only reads what the runner (`toymesa.sweep`) wrote; nothing trains. Layout of
a run folder: see `toymesa.sweep`. Members whose training went non-finite (a NaN or inf loss,
gradient norm or parameter at any step so far, or non-finite installed parameters) carry
``nonfinite = True`` in the tidy table from the first logged step at which that is known, and
every metric of theirs is NaN there: a NaN model's greedy answers are not "no defection".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from toymesa import evaluate, model, stats, store
from toymesa.config import Config, HParams, ModelConfig, SafetyConfig, TaskConfig, TrainConfig

TRAIN_METRICS = ("loss", "answer_acc", "grad_norm", "reward", "signal")  # "reward", "signal": RL safety training only
# the headline behaviour metrics (figures); summaries hold every metric of `evaluate.METRICS`
EVAL_METRICS = ("triggered_defection", "untriggered_defection", "helpful_accuracy", "decision_accuracy", "uncovered_defection", "covered_defection")
MALFORMED = ("triggered_malformed", "untriggered_malformed")  # shown wherever not ~0
NEGLIGIBLE = 0.005


def with_malformed(df: pd.DataFrame, metrics) -> list[str]:
    """`metrics` plus each malformed-sequence rate of `df` (a tidy or summary table) that
    exceeds `NEGLIGIBLE` somewhere: a drop in defection can be format damage."""
    extra = [m for m in MALFORMED if m in df and m not in metrics and df[m].max(skipna=True) > NEGLIGIBLE]
    return [*metrics, *extra]


def load(path) -> pd.DataFrame:
    """Load results as one tidy DataFrame.

    `path` is a CSV file, or a run folder. For a sweep folder the table has one row per
    cell x seed x logged step, with every config field as a ``group.field`` column; it is
    read from ``results.csv`` when the run finished, else assembled from the chunks
    finished so far (so a partial run loads too).
    """
    path = Path(path)
    if not path.is_dir():
        return pd.read_csv(path)
    if (path / "results.csv").exists():
        return pd.read_csv(path / "results.csv")
    if (path / "chunks").is_dir():
        return tidy(path)
    raise FileNotFoundError(f"{path} holds no results (no results.csv and no chunks/); run a sweep or an experiment into it first")


def _read(path: Path) -> dict:
    try:
        return store.load_arrays(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"chunk {path} cannot be read ({type(e).__name__}: {e}); rerun the run's command, which recomputes it") from None


def chunk_files(out) -> list[Path]:
    """The chunk files of a run folder, sorted by name."""
    return sorted(Path(out, "chunks").glob("*.npz"))


def finite_steps(a: dict) -> np.ndarray:
    """bool[n, steps + 1] of one chunk's arrays: column s says the member was finite through
    step s (column 0: the starting or installed model)."""
    h = a["hist.loss"]
    ok = a["hist.finite"].astype(bool) if "hist.finite" in a else np.isfinite(h) & np.isfinite(a.get("hist.grad_norm", h))
    start = a.get("member.install_finite", np.ones(len(h), bool)).astype(bool)
    return np.logical_and.accumulate(np.concatenate([start[:, None], ok], axis=1), axis=1)


def tidy(out, keep: set[str] | None = None) -> pd.DataFrame:
    """One row per cell x seed x logged step, from the chunks in `out` (finished so far).

    Logged steps are the evaluation steps. Training metrics at a logged step are the mean
    over the steps since the previous one (NaN at step 0); evaluation metrics are the
    behaviour measured at that step. `keep`: only the chunk files with these names (a folder
    may hold stale ones). Column ``nonfinite``: see the module docstring.
    """
    out = Path(out)
    cells = pd.read_csv(out / "cells.csv")
    frames = []
    for path in chunk_files(out):
        if keep is not None and path.name not in keep:
            continue
        a = _read(path)
        at = a["eval_step"]
        n = len(a["seed"])
        rows = {"cell": np.repeat(a["cell"], len(at)), "seed": np.repeat(a["seed"], len(at)), "step": np.tile(at, n)}
        for k in (k for k in TRAIN_METRICS if f"hist.{k}" in a):
            h = a[f"hist.{k}"]
            bounds = np.concatenate([[0], at])
            means = [h[:, lo:hi].mean(axis=1) if hi > lo else np.full(n, np.nan) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            rows[k] = np.stack(means, axis=1).ravel()
        for k in a:
            if k.startswith("eval."):
                rows[k[5:]] = a[k].ravel()
            elif k.startswith("member.") and k != "member.install_finite":  # one number per member (e.g. red-team prompts found)
                rows[k[7:]] = np.repeat(a[k], len(at))
        bad = ~finite_steps(a)[:, at]  # [n, len(at)]
        rows["nonfinite"] = bad.ravel()
        frame = pd.DataFrame(rows)
        metrics = [c for c in frame.columns if c not in ("cell", "seed", "step", "nonfinite")]
        frame.loc[frame["nonfinite"], metrics] = np.nan
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True).sort_values(["cell", "seed", "step"], ignore_index=True)
    return df.merge(cells, on="cell", how="left")


def _short(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # a CSV column with gaps reads 4 as 4.0
    return f"{v:g}" if isinstance(v, float) else str(v)


def cell_labels(df: pd.DataFrame) -> pd.Series:
    """A readable label per row from its axis values: "rule=single, lr=0.001", or with [[arms]]
    "ARM: rule=single, k=4" (axes a cell lacks skipped; an axis named by its field alone unless
    two axes share a field name). The same text labels figure legends and summary.csv."""
    axes = [c for c in df.columns if c.startswith("axis:") and c != "axis:arm"]
    fields = [c.removeprefix("axis:").rsplit(".", 1)[-1] for c in axes]
    names = fields if len(set(fields)) == len(fields) else [c.removeprefix("axis:") for c in axes]
    arms = df["axis:arm"] if "axis:arm" in df else pd.Series(np.nan, index=df.index)

    def one(arm, *values) -> str:
        text = ", ".join(f"{n}={_short(v)}" for n, v in zip(names, values, strict=True) if pd.notna(v))
        return (f"{arm}: {text}" if text else str(arm)) if pd.notna(arm) else text or "base"

    return pd.Series([one(*r) for r in zip(arms, *(df[c] for c in axes), strict=True)], index=df.index, dtype=object)


def last_step(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a tidy table at each cell's last logged step (one per cell x seed)."""
    return df[df["step"] == df.groupby("cell")["step"].transform("max")]


def with_start(df: pd.DataFrame, metric: str, name: str) -> pd.DataFrame:
    """`last_step(df)` with column `name`: each member's `metric` at step 0 (with safety
    training, the installed model)."""
    start = df[df["step"] == 0][["cell", "seed", metric]].rename(columns={metric: name})
    return last_step(df).merge(start, on=["cell", "seed"])


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell at its last logged step: mean and 95% bootstrap CI over seeds of each metric,
    after columns cell, cell_id, label (`cell_labels`) and the cell's axis values."""
    last = last_step(df)
    metrics = [m for m in (*evaluate.METRICS, "loss") if m in last and last[m].notna().any()]
    axes = [c for c in df.columns if c.startswith("axis:")]
    summary = stats.summarize(last, ["cell", "cell_id", *axes], metrics)
    summary.insert(2, "label", cell_labels(summary))
    return summary


def load_histories(out) -> tuple[pd.DataFrame, dict]:
    """Per-step training histories: (members frame with cell and seed, {metric: float[M, steps]}).

    Groups with different step counts are padded with NaN to the longest.
    """
    members, hists = [], {}
    for path in chunk_files(out):
        a = _read(path)
        members.append(pd.DataFrame({"cell": a["cell"], "seed": a["seed"]}))
        for k in TRAIN_METRICS:  # metrics a chunk lacks (reward without RL) are NaN
            hists.setdefault(k, []).append(a[f"hist.{k}"] if f"hist.{k}" in a else np.full(a["hist.loss"].shape, np.nan))
    if not members:
        return pd.DataFrame(columns=["cell", "seed"]), {}
    width = max(h.shape[1] for h in hists["loss"])
    pad = {k: np.concatenate([np.pad(h, ((0, 0), (0, width - h.shape[1])), constant_values=np.nan) for h in v]) for k, v in hists.items()}
    return pd.concat(members, ignore_index=True), pad


def load_params(out, cell: int, seed: int):
    """The final parameters (nnx.State) of one member of a finished sweep."""
    out = Path(out)
    configs = json.loads((out / "configs.json").read_text())
    if str(cell) not in configs:
        raise KeyError(f"{out} has no cell {cell}; its cells are {', '.join(sorted(configs, key=int))} (see cells.csv)")
    cfg_row = configs[str(cell)]
    cfg = config_from_dict(cfg_row)
    for path in chunk_files(out):
        a = _read(path)
        hit = np.flatnonzero((a["cell"] == cell) & (a["seed"] == seed))
        if hit.size:
            if "param.000" not in a:
                raise FileNotFoundError(f"{out} was run with run.save_params = false")
            shape = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
            leaves = [a[f"param.{i:03d}"][hit[0]] for i in range(len(jax.tree.leaves(shape)))]
            return jax.tree.unflatten(jax.tree.structure(shape), leaves), cfg
    raise KeyError(f"no finished member with cell={cell}, seed={seed} in {out}")


def install_config(cfg: Config) -> Config:
    """The config of the install phase (safety settings and safety_lr do not affect it)."""
    return dataclasses.replace(cfg, safety=SafetyConfig(), hparams=cfg.hparams._replace(safety_lr=HParams().safety_lr))


def install_key(cfg: Config, seed: int, code_digest: str | None) -> str:
    """The name (in the run's installs/ folder) of one member's installed parameters: a hash of
    everything the install depends on, including the digest of the code that computed it."""
    key = (install_config(cfg), int(seed), code_digest)
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def config_from_dict(d: dict) -> Config:
    """The Config of one entry of a run folder's configs.json."""
    task = {k: tuple(v) if isinstance(v, list) else v for k, v in d["task"].items()}
    return Config(ModelConfig(**d["model"]), TaskConfig(**task), TrainConfig(**d["train"]), HParams(**d["hparams"]), SafetyConfig(**d.get("safety", {})))
