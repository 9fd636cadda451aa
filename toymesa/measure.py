"""Measurement phases over the stored models of a run folder, chunked and resumable.

A *measurement* is a function over population states, the shape every study phase after
training has here: ``fn(cfg, params, seeds) -> {column: float[M]}`` for M members of one
static config (params with a leading member axis). `run` applies one to every stored model
of a run (cells x seeds), members of one config at a time in chunks of at most `chunk`,
writes each finished chunk atomically under ``<run>/<name>/`` (the file name hashes the
measurement's settings, the members and the code digest) and resumes from the chunks already
there: an interrupted measurement loses at most the chunk in flight. It returns the tidy table:
one row per cell x seed, the cell's id, label and axes, and the measurement's columns.

Which models: ``"final"`` (the parameters the run stored, after safety training if any) or
``"installed"`` (before safety training; read from the run's ``installs/`` cache under the
code digest the run was computed with, never retrained).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd

from toymesa import model, provenance, runs, store
from toymesa.config import Config
from toymesa.meter.names import WHICH


class Measurement(NamedTuple):
    name: str  # folder and table name under the run folder
    fn: Callable  # (cfg, params [M, ...], seeds int32[M]) -> {column: float[M]}
    settings: tuple  # everything besides (config, members, code) that determines the numbers


def _stored(out: Path, which: str):
    """{cell: (cfg, [(seed, param leaves)])} of every member stored in the run's chunks."""
    configs = json.loads((out / "configs.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    found: dict[int, tuple[Config, list]] = {}
    for path in runs.chunk_files(out):
        a = runs._read(path)
        if which == "final" and "param.000" not in a:
            raise FileNotFoundError(f"{out} stores no parameters (run.save_params = false); rerun it with save_params = true to measure its models")
        for j, (cell, seed) in enumerate(zip(a["cell"].tolist(), a["seed"].tolist(), strict=True)):
            cfg = runs.config_from_dict(configs[str(cell)])
            if which == "final":
                leaves = [a[k][j] for k in sorted(k for k in a if k.startswith("param."))]
            else:
                leaves = _installed_leaves(out, cfg, seed, meta.get("code_digest"))
            found.setdefault(cell, (cfg, []))[1].append((seed, leaves))
    if not found:
        raise FileNotFoundError(f"{out} holds no finished chunks; run the sweep (toymesa run / toymesa demo) into it first")
    return found


def _installed_leaves(out: Path, cfg: Config, seed: int, digest: str | None):
    if cfg.safety.method == "none":
        raise ValueError(f"{out} has no safety training, so its installed models are its final ones; use --model final")
    path = out / "installs" / f"{runs.install_key(cfg, seed, digest)}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the installed model of seed {seed} was not kept (or other code computed it); use --model final")
    a = store.load_arrays(path)
    return [a[k] for k in sorted(a)]


def _chunk_name(m: Measurement, cfg: Config, cells, seeds, which: str) -> str:
    key = (m.name, m.settings, which, cfg, tuple(cells), tuple(seeds), provenance.code_digest())
    return hashlib.sha256(repr(key).encode()).hexdigest()[:12]


def run(out, m: Measurement, which: str = "final", chunk: int = 8, progress: bool = True, echo=print) -> pd.DataFrame:
    """Apply measurement `m` to every stored model of run folder `out` (see the module
    docstring); returns the tidy table."""
    out = Path(out)
    if which not in WHICH:
        raise ValueError(f"model={which!r} is unknown; choose one of {WHICH}")
    if not (out / "configs.json").exists():
        raise FileNotFoundError(f"{out} is not a run folder (no configs.json); give the folder a sweep or experiment wrote")
    stored = _stored(out, which)
    folder = out / m.name
    jobs = []
    for cell, (cfg, members) in sorted(stored.items()):
        members = sorted(members)
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            seeds = [s for s, _ in part]
            jobs.append((cell, cfg, part, folder / f"c{cell:03d}-{start // chunk:03d}-{_chunk_name(m, cfg, [cell], seeds, which)}.npz"))
    todo = [j for j in jobs if not j[3].exists()]
    if len(todo) < len(jobs):
        echo(f"resuming {m.name} of {out}: {len(jobs) - len(todo)} of {len(jobs)} chunks already measured")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        done = sum(len(p) for _, _, p, path in jobs if path.exists())
        bar = tqdm(total=sum(len(p) for _, _, p, _ in jobs), initial=done, desc=f"{m.name} {out.name}", unit=" model")
    try:
        for cell, cfg, part, path in todo:
            t0 = time.perf_counter()
            shape = jax.eval_shape(lambda cfg=cfg: model.init_params(cfg, jax.random.key(0)))
            params = jax.tree.unflatten(jax.tree.structure(shape), [np.stack(col) for col in zip(*(leaves for _, leaves in part), strict=True)])
            seeds = np.asarray([s for s, _ in part], np.int32)
            cols = {k: np.asarray(v) for k, v in m.fn(cfg, params, seeds).items()}
            seconds = np.full(len(part), (time.perf_counter() - t0) / len(part))
            store.save_arrays({"cell": np.full(len(part), cell), "seed": seeds, "seconds": seconds, **cols}, path)
            if bar is not None:
                bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()
    return _table(out, [j[3] for j in jobs])


def _table(out: Path, paths) -> pd.DataFrame:
    rows = [pd.DataFrame({k: v for k, v in store.load_arrays(p).items() if v.ndim == 1}) for p in paths]
    df = pd.concat(rows, ignore_index=True)
    cells = pd.read_csv(out / "cells.csv")
    keep = ["cell", "cell_id", *[c for c in cells.columns if c.startswith("axis:")]]
    df = cells[keep].merge(df, on="cell", how="right")
    df.insert(2, "label", runs.cell_labels(df))
    return df
