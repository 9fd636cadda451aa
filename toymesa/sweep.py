"""The sweep runner: spec -> cells -> populations on all devices -> a resumable run folder.

Cells that share static shapes (everything but the hparams) form a group; a group's
members (cell x seed) are trained as one vmapped population, split into chunks of at
most ``run.chunk_members`` members, padded to a multiple of the device count and sharded
over every device (`toymesa.devices`). Each finished chunk is written atomically, so a
killed run loses at most the chunk in flight and rerunning resumes.

Run folder::

    spec.toml      the spec text, verbatim        meta.json   versions, git commit, devices, digest
    cells.csv      one row per cell (config)      log.jsonl   one line per chunk computed
    chunks/        g{group}-c{chunk}-{key}.npz: members, per-step histories, evaluations,
                   final parameters
    results.csv    tidy: one row per cell x seed x logged step (written when all chunks exist)
    summary.csv    one row per cell: final-step metrics, mean and 95% bootstrap CI over seeds

A chunk's file name carries a hash of everything that determines its numbers (static
config, members and their hparams, run settings, package version), so a changed spec never
reuses stale chunks, and the same spec never recomputes finished ones.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import pandas as pd

import toymesa
from toymesa import devices, model, safety, stats, store
from toymesa.config import Config, HParams, SafetyConfig, columns
from toymesa.evaluate import evaluate_population
from toymesa.spec import Cell, Spec, SpecError, groups
from toymesa.train import init_population, population

TRAIN_METRICS = ("loss", "answer_acc", "grad_norm", "reward")  # "reward": RL safety training only
EVAL_METRICS = ("triggered_defection", "untriggered_defection", "helpful_accuracy", "decision_accuracy", "uncovered_defection", "covered_defection")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "pandas")


@dataclass(frozen=True)
class Chunk:
    """A slice of one group's members, trained as one (padded) population."""

    group: int
    index: int
    cfg: Config  # the group's static config (hparams come per member)
    cells: tuple[int, ...]  # cell index per member
    seeds: tuple[int, ...]
    hparams: tuple[HParams, ...]  # per member
    size: int  # padded population size (multiple of the device count)
    run: tuple  # sorted run settings

    @property
    def key(self) -> str:
        key = (self.cfg, self.cells, self.seeds, self.hparams, self.size, self.run, toymesa.__version__)
        return hashlib.sha256(repr(key).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"g{self.group:02d}-c{self.index:03d}-{self.key}"

    @property
    def n(self) -> int:
        return len(self.seeds)


def plan(spec: Spec, n_devices: int | None = None) -> list[Chunk]:
    """Split every group of cells into chunks of members."""
    n_dev = devices.n_devices() if n_devices is None else n_devices
    run = tuple(sorted(spec.run.items()))
    chunks = []
    for g, cells in enumerate(groups(spec.cells())):
        members = [(c, s) for c in cells for s in spec.seeds]
        per = min(spec.run["chunk_members"], len(members))
        size = -(-per // n_dev) * n_dev
        for i, start in enumerate(range(0, len(members), per)):
            part = members[start : start + per]
            cfg = dataclasses.replace(part[0][0].config, hparams=HParams())
            chunks.append(Chunk(g, i, cfg, tuple(c.index for c, _ in part), tuple(s for _, s in part), tuple(c.config.hparams for c, _ in part), size, run))
    return chunks


def eval_steps(cfg: Config, run: dict) -> list[int]:
    """Steps at which behaviour is evaluated: 0, e, 2e, ..., steps (or only the last).

    With safety training the steps count safety steps (0 = the installed model).
    """
    steps, every = phase_steps(cfg), run["eval_every"]
    if every is None:
        return [steps]
    return sorted({0, *range(every, steps, every), steps})


def phase_steps(cfg: Config) -> int:
    """Steps of the phase a cell's results describe: safety training if any, else install."""
    return cfg.safety.steps if cfg.safety.method != "none" else cfg.train.steps


def install_config(cfg: Config) -> Config:
    """The config of the install phase (safety settings and safety_lr do not affect it)."""
    return dataclasses.replace(cfg, safety=SafetyConfig(), hparams=cfg.hparams._replace(safety_lr=HParams().safety_lr))


def _member_key(cfg: Config, seed: int, hp: HParams) -> str:
    key = (install_config(dataclasses.replace(cfg, hparams=hp)), int(seed), toymesa.__version__)
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def installed(cfg: Config, seeds, hp_rows, cache: Path | None = None, on_steps=None):
    """Installed parameters (leading axis = members) of models with these seeds and hparams.

    With a `cache` folder, each member's installed parameters are stored there once
    (installs/<hash>.npz, a hash of everything the install depends on) and reused by every
    cell that shares them: the safety methods and safety learning rates of one install
    differ only after it. Members are trained together as one population, padded to the
    device count.
    """
    icfg = install_config(cfg)
    keys = [_member_key(cfg, s, h) for s, h in zip(seeds, hp_rows, strict=True)]
    path = {k: (cache / "installs" / f"{k}.npz") if cache is not None else None for k in keys}
    todo = list(dict.fromkeys(k for k in keys if path[k] is None or not path[k].exists()))
    shape = jax.eval_shape(lambda: model.init_params(icfg, jax.random.key(0)))
    treedef, n_leaves = jax.tree.structure(shape), len(jax.tree.leaves(shape))
    fresh = {}
    if todo:
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        rows = [first[k] for k in todo]
        pad = (-len(rows)) % devices.n_devices()
        rows = rows + rows[:1] * pad
        s = np.asarray([seeds[i] for i in rows], np.int32)
        hp = HParams(*(np.asarray(col, np.float32) for col in zip(*(hp_rows[i] for i in rows), strict=True)))
        s_d, hp_d = devices.shard_population(s, hp)

        def progress(states, done, h):
            if on_steps is not None:
                on_steps(len(todo) * h["loss"].shape[1])

        states, _ = population(icfg, s_d, hp_d, chunk=_segment(icfg.train.steps), on_chunk=progress)
        leaves = [devices.to_host(x) for x in jax.tree.leaves(states.params)]
        for j, k in enumerate(todo):
            fresh[k] = [x[j] for x in leaves]
            if path[k] is not None and devices.is_writer():
                store.save_arrays({f"param.{i:03d}": x for i, x in enumerate(fresh[k])}, path[k])
    elif on_steps is not None:
        on_steps(len(set(keys)) * icfg.train.steps)
    per_member = []
    for k in keys:
        if k not in fresh:
            a = store.load_arrays(path[k])
            fresh[k] = [a[f"param.{i:03d}"] for i in range(n_leaves)]
        per_member.append(fresh[k])
    return jax.tree.unflatten(treedef, [np.stack(col) for col in zip(*per_member, strict=True)])


def run_chunk(chunk: Chunk, run: dict, on_steps=None, cache: Path | None = None) -> dict:
    """Train and evaluate one chunk; returns its arrays (real members only, padding dropped).

    Without safety training: install, evaluating at the evaluation steps. With it: install
    (or reuse installs from `cache`), then safety training, evaluating at safety steps.
    `on_steps(n)` is called with the number of seed-steps done after each segment.
    """
    cfg, n, size = chunk.cfg, chunk.n, chunk.size
    pad = size - n
    seeds = np.asarray(chunk.seeds + chunk.seeds[:1] * pad, np.int32)
    hp_rows = chunk.hparams + chunk.hparams[:1] * pad
    hp = HParams(*(np.asarray(col, np.float32) for col in zip(*hp_rows, strict=True)))  # each cell's Config checked its own
    seeds_d, hp_d = devices.shard_population(seeds, hp)
    at = eval_steps(cfg, run)
    evals = []
    safe = cfg.safety.method != "none"

    def evaluate(states):
        params = states.train.params if safe else states.params
        m = evaluate_population(cfg, params, seeds_d, run["eval_prompts"])
        evals.append({k: devices.to_host(v)[:n] for k, v in m.items()})

    out = {"cell": np.asarray(chunk.cells), "seed": seeds[:n], "eval_step": np.asarray(at)}
    if safe:
        params = jax.device_put(installed(cfg, seeds.tolist(), hp_rows, cache, on_steps), seeds_d.sharding)
        states = safety.init_population(cfg, params, seeds_d)
        out["member.adv_found"] = devices.to_host(states.found.sum(axis=-1))[:n]
    else:
        states = init_population(cfg, seeds_d)
    if at[0] == 0:
        evaluate(states)
    segment = _segment(at[1] - at[0] if len(at) > 1 else phase_steps(cfg))

    def on_chunk(states, done, h):
        if done in at:
            evaluate(states)
        if on_steps is not None:
            on_steps(n * h["loss"].shape[1])

    fn = safety.safety_chunk if safe else None
    states, hist = population(cfg, seeds_d, hp_d, steps=phase_steps(cfg), chunk=segment, on_chunk=on_chunk, states=states, fn=fn)
    out.update({f"hist.{k}": v[:n] for k, v in hist.items()})
    out.update({f"eval.{k}": np.stack([e[k] for e in evals], axis=1) for k in evals[0]})
    if run["save_params"]:
        leaves = jax.tree.leaves(states.train.params if safe else states.params)
        out.update({f"param.{i:03d}": devices.to_host(x)[:n] for i, x in enumerate(leaves)})
    return out


def _segment(every: int, most: int = 100, least: int = 20) -> int:
    """Steps per compiled call: a divisor of the evaluation interval, at most `most` (for
    progress updates), unless that would mean calls shorter than `least` steps."""
    k = next(d for d in range(min(every, most), 0, -1) if every % d == 0)
    return k if k >= least else every


# ----------------------------------------------------------------- the run folder
def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _versions() -> dict:
    out = {"python": platform.python_version(), "toymesa": toymesa.__version__}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _cells_frame(cells: list[Cell]) -> pd.DataFrame:
    return pd.DataFrame([{"cell": c.index, "cell_id": c.id, **{f"axis:{k}": v for k, v in c.values.items()}, **columns(c.config)} for c in cells])


def _prepare(spec: Spec, out: Path, fresh: bool) -> None:
    meta_path = out / "meta.json"
    had_results = bool(chunk_files(out))  # before --fresh deletes them: the record must see them
    if fresh:
        for name in (
            "chunks",
            "installs",
            "results.csv",
            "summary.csv",
            "log.jsonl",
            "meta.json",
            "cells.csv",
            "configs.json",
            "spec.toml",
            "figures",
            "report.html",
        ):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("digest") != spec.digest:
            raise SpecError(
                f"{out} holds results of a different spec ({old.get('name')}, digest {old.get('digest')} != {spec.digest}); "
                + "pass --fresh to discard them or choose another --out"
            )
    if not devices.is_writer():
        return
    out.mkdir(parents=True, exist_ok=True)
    if spec.text:
        store.save_text(spec.text, out / "spec.toml")
    meta = {
        "name": spec.name,
        "description": spec.description,
        "digest": spec.digest,
        "seeds": list(spec.seeds),
        "hypotheses": list(spec.hypotheses),
        "run": spec.run,
        "created": json.loads(meta_path.read_text())["created"] if meta_path.exists() else _now(),
        "git_commit": _git_commit(),
        "versions": _versions(),
        "devices": devices.describe(),
        "host": platform.node(),
    }
    store.save_json(meta, meta_path)
    # append-only preregistration record (kept by --fresh): edits after results stay visible
    stats.register(out / "prereg.json", spec.hypotheses, results_exist=had_results)
    store.save_frame(_cells_frame(spec.cells()), out / "cells.csv")
    store.save_json({c.index: dataclasses.asdict(c.config) | {"hparams": c.config.hparams._asdict()} for c in spec.cells()}, out / "configs.json")


def run(spec: Spec, out, fresh: bool = False, progress: bool = True, echo=print) -> Path:
    """Run (or resume) a sweep into folder `out`; returns `out`. Ctrl-C keeps finished chunks."""
    out = Path(out)
    _prepare(spec, out, fresh)
    chunks = plan(spec)
    done = {c.name for c in chunks if (out / "chunks" / f"{c.name}.npz").exists()}
    todo = [c for c in chunks if c.name not in done]
    steps_of = {c.name: c.n * c.cfg.train.steps + (c.n * phase_steps(c.cfg) if c.cfg.safety.method != "none" else 0) for c in chunks}
    n_cells = len(spec.cells())
    if done:
        echo(f"resuming {spec.name}: {len(done)} of {len(chunks)} chunks already finished in {out}")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(steps_of.values()), initial=sum(steps_of[n] for n in done), desc=spec.name, unit=" seed-step", unit_scale=True, dynamic_ncols=True)
    try:
        for i, c in enumerate(todo):
            if i and c.group != todo[i - 1].group:
                # a finished group's programs are never used again; without this a long sweep
                # accumulates compiled code until LLVM runs out of memory mappings
                jax.clear_caches()
            if bar is not None:
                bar.set_postfix_str(f"cells done {_cells_done(chunks, done)}/{n_cells}, chunk {c.name[:8]}")
            t0 = time.perf_counter()
            arrays = run_chunk(c, spec.run, on_steps=bar.update if bar is not None else None, cache=out)
            if devices.is_writer():
                store.save_arrays(arrays, out / "chunks" / f"{c.name}.npz")
                with open(out / "log.jsonl", "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "chunk": c.name,
                                "members": c.n,
                                "seconds": round(time.perf_counter() - t0, 3),
                                "finished": _now(),
                            }
                        )
                        + "\n"
                    )
            done.add(c.name)
        if bar is not None:
            bar.set_postfix_str(f"cells done {n_cells}/{n_cells}")
    finally:
        if bar is not None:
            bar.close()
    if devices.is_writer():
        df = tidy(out, spec)
        store.save_frame(df, out / "results.csv")
        store.save_frame(summarize(df), out / "summary.csv")
    return out


def _cells_done(chunks: list[Chunk], done: set) -> int:
    pending = {cell for c in chunks if c.name not in done for cell in c.cells}
    return len({cell for c in chunks for cell in c.cells} - pending)


# ----------------------------------------------------------------- reading back
def chunk_files(out) -> list[Path]:
    return sorted(Path(out, "chunks").glob("*.npz"))


def tidy(out, spec: Spec | None = None) -> pd.DataFrame:
    """One row per cell x seed x logged step, from the chunks in `out` (finished so far).

    Logged steps are the evaluation steps. Training metrics at a logged step are the mean
    over the steps since the previous one (NaN at step 0); evaluation metrics are the
    behaviour measured at that step.
    """
    out = Path(out)
    cells = pd.read_csv(out / "cells.csv")
    keep = None
    if spec is not None:  # only this spec's chunks (the folder may hold stale ones)
        keep = {f"{c.name}.npz" for c in plan(spec)}
    frames = []
    for path in chunk_files(out):
        if keep is not None and path.name not in keep:
            continue
        a = store.load_arrays(path)
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
            elif k.startswith("member."):  # one number per member (e.g. red-team prompts found)
                rows[k[7:]] = np.repeat(a[k], len(at))
        frames.append(pd.DataFrame(rows))
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True).sort_values(["cell", "seed", "step"], ignore_index=True)
    return df.merge(cells, on="cell", how="left")


def cell_labels(df: pd.DataFrame) -> pd.Series:
    """A short label per row from its axis values ("arm, value, ..."; axes a cell lacks skipped)."""
    axes = [c for c in df.columns if c.startswith("axis:")]
    if not axes:
        return pd.Series("base", index=df.index)
    return df[axes].apply(lambda r: ", ".join(str(v) for v in r if pd.notna(v)), axis=1)


def last_step(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a tidy table at each cell's last logged step (one per cell x seed)."""
    return df[df["step"] == df.groupby("cell")["step"].transform("max")]


def with_start(df: pd.DataFrame, metric: str, name: str) -> pd.DataFrame:
    """`last_step(df)` with column `name`: each member's `metric` at step 0 (with safety
    training, the installed model)."""
    start = df[df["step"] == 0][["cell", "seed", metric]].rename(columns={metric: name})
    return last_step(df).merge(start, on=["cell", "seed"])


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell at its last logged step: mean and 95% bootstrap CI over seeds of each metric."""
    last = last_step(df)
    metrics = [m for m in (*EVAL_METRICS, "loss") if m in last and last[m].notna().any()]
    axes = [c for c in df.columns if c.startswith("axis:")]
    return stats.summarize(last, ["cell", "cell_id", *axes] if axes else ["cell", "cell_id"], metrics)


def load_histories(out) -> tuple[pd.DataFrame, dict]:
    """Per-step training histories: (members frame with cell and seed, {metric: float[M, steps]}).

    Groups with different step counts are padded with NaN to the longest.
    """
    members, hists = [], {}
    for path in chunk_files(out):
        a = store.load_arrays(path)
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
    cfg_row = json.loads((out / "configs.json").read_text())[str(cell)]
    cfg = _config_from_dict(cfg_row)
    for path in chunk_files(out):
        a = store.load_arrays(path)
        hit = np.flatnonzero((a["cell"] == cell) & (a["seed"] == seed))
        if hit.size:
            if "param.000" not in a:
                raise FileNotFoundError(f"{out} was run with run.save_params = false")
            shape = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
            leaves = [a[f"param.{i:03d}"][hit[0]] for i in range(len(jax.tree.leaves(shape)))]
            return jax.tree.unflatten(jax.tree.structure(shape), leaves), cfg
    raise KeyError(f"no finished member with cell={cell}, seed={seed} in {out}")


def _config_from_dict(d: dict) -> Config:
    from toymesa.config import ModelConfig, SafetyConfig, TaskConfig, TrainConfig

    task = {k: tuple(v) if isinstance(v, list) else v for k, v in d["task"].items()}
    return Config(ModelConfig(**d["model"]), TaskConfig(**task), TrainConfig(**d["train"]), HParams(**d["hparams"]), SafetyConfig(**d.get("safety", {})))
