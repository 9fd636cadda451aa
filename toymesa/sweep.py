"""The sweep runner: spec -> cells -> populations on all devices -> a resumable run folder.

Cells that share static shapes (everything but the hparams) form a group; a group's
members (cell x seed) are trained as one vmapped population, split into chunks of at
most ``run.chunk_members`` members, padded to a multiple of the device count and sharded
over every device (`toymesa.devices`). Each finished chunk is written atomically, so a
killed run loses at most the chunk in flight and rerunning resumes.

Run folder::

    spec.toml      the spec text, verbatim        meta.json   versions, git commit, devices, digests
    cells.csv      one row per cell (config)      log.jsonl   one line per chunk computed
    prereg.json    the append-only preregistration record (`toymesa.prereg`)
    chunks/        g{group}-c{chunk}-{key}.npz: members, per-step histories, evaluations,
                   final parameters
    results.csv    tidy: one row per cell x seed x logged step (written when all chunks exist)
    summary.csv    one row per cell: final-step metrics, mean and 95% bootstrap CI over seeds

A chunk's file name carries a hash of everything that determines its numbers (static
config, members and their hparams, run settings, the digest of the code that computes them:
`toymesa.provenance.code_digest`), so a changed spec never reuses stale chunks, and the same
spec never recomputes finished ones. A folder whose chunks were computed by other code is
refused (pass ``fresh`` or another folder) instead of being resumed with a mix of old and new.
The readers of a run folder are in `toymesa.runs`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import platform
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from toymesa import devices, model, phases, prereg, provenance, runs, safety, store
from toymesa.config import Config, HParams, columns
from toymesa.evaluate import evaluate_population
from toymesa.spec import Cell, Spec, SpecError, groups
from toymesa.train import all_finite, init_population, population


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
        key = (self.cfg, self.cells, self.seeds, self.hparams, self.size, self.run, provenance.code_digest())
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


def _member_key(cfg: Config, seed: int, hp: HParams) -> str:
    return runs.install_key(dataclasses.replace(cfg, hparams=hp), seed, provenance.code_digest())


def installed(cfg: Config, seeds, hp_rows, cache: Path | None = None, on_steps=None):
    """Installed parameters (leading axis = members) of models with these seeds and hparams.

    With a `cache` folder, each member's installed parameters are stored there once
    (installs/<hash>.npz, a hash of everything the install depends on) and reused by every
    cell that shares them: the safety methods and safety learning rates of one install
    differ only after it. Members are trained together as one population, padded to the
    device count.
    """
    icfg = runs.install_config(cfg)
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
        out["member.install_finite"] = devices.to_host(jax.vmap(all_finite)(params))[:n]
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
def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _cells_frame(cells: list[Cell]) -> pd.DataFrame:
    return pd.DataFrame([{"cell": c.index, "cell_id": c.id, **{f"axis:{k}": v for k, v in c.values.items()}, **columns(c.config)} for c in cells])


def results_of(digest: str, roots, exclude: Path | None = None) -> list[str]:
    """Run folders under `roots` (searched recursively) that hold chunks of a spec with this
    digest, other than `exclude`: results a registration must know had been seen."""
    found = set()
    for root in map(Path, roots):
        for meta in root.rglob("meta.json") if root.is_dir() else ():
            folder = meta.parent
            if exclude is not None and folder.resolve() == Path(exclude).resolve():
                continue
            try:
                same = json.loads(meta.read_text()).get("digest") == digest
            except (OSError, ValueError):
                continue
            if same and runs.chunk_files(folder):
                found.add(str(folder))
    return sorted(found)


def _prepare(spec: Spec, out: Path, fresh: bool, analysis: Path | None, roots) -> None:
    meta_path = out / "meta.json"
    had_results = bool(runs.chunk_files(out))  # before --fresh deletes them: the record must see them
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
            "verified.json",
            "claims.json",
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
        code = provenance.code_digest()
        if had_results and old.get("code_digest") != code:
            raise SpecError(
                f"{out} holds chunks computed by other code (code digest {old.get('code_digest') or 'not recorded'}, commit {old.get('git_commit')}); "
                + f"the installed toymesa has code digest {code}. Resuming would mix the two: pass --fresh to recompute, or choose another --out"
            )
    if not devices.is_writer():
        return
    out.mkdir(parents=True, exist_ok=True)
    if spec.text:
        store.save_text(spec.text, out / "spec.toml")
    commit = provenance.git_commit()
    meta = {
        "name": spec.name,
        "description": spec.description,
        "digest": spec.digest,
        "code_digest": provenance.code_digest(),
        "seeds": list(spec.seeds),
        "hypotheses": list(spec.hypotheses),
        "run": spec.run,
        "created": json.loads(meta_path.read_text())["created"] if meta_path.exists() else _now(),
        "git_commit": commit,
        "versions": provenance.versions(),
        "devices": devices.describe(),
        "machine": provenance.machine(),
        "host": platform.node(),
    }
    store.save_json(meta, meta_path)
    # append-only preregistration record (kept by --fresh): edits after results stay visible,
    # and results of the same spec anywhere under the results roots count as seen
    elsewhere = results_of(spec.digest, [out.parent, *roots], exclude=out)
    prov = {
        "git_commit": commit,
        "spec_digest": spec.digest,
        "spec_text_digest": hashlib.sha256(spec.text.encode()).hexdigest()[:12] if spec.text else None,
        "analysis": str(analysis) if analysis else None,
        "analysis_digest": provenance.file_digest(analysis) if analysis else None,
        "results_elsewhere": elsewhere,
    }
    prereg.register(out / "prereg.json", spec.hypotheses, results_exist=had_results or bool(elsewhere), provenance=prov)
    store.save_frame(_cells_frame(spec.cells()), out / "cells.csv")
    store.save_json({c.index: dataclasses.asdict(c.config) | {"hparams": c.config.hparams._asdict()} for c in spec.cells()}, out / "configs.json")


def run(spec: Spec, out, fresh: bool = False, progress: bool = True, echo=print, analysis: Path | None = None, roots=()) -> Path:
    """Run (or resume) a sweep into folder `out`; returns `out`. Ctrl-C keeps finished chunks.

    `analysis`: the experiment's analysis file, whose digest the preregistration record keeps;
    `roots`: folders (besides `out`'s parent) searched for earlier results of the same spec.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out} is a file, not a folder; give a folder for the run (it is created if missing)")
    _prepare(spec, out, fresh, analysis, roots)
    chunks = plan(spec)
    done = {c.name for c in chunks if _finished(out / "chunks" / f"{c.name}.npz", echo)}
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
        df = runs.tidy(out, keep={f"{c.name}.npz" for c in chunks})
        store.save_frame(df, out / "results.csv")
        store.save_frame(runs.summarize(df), out / "summary.csv")
        phases.after_training(spec, out, progress, echo)  # e.g. [meter]: measured once, resumable
    return out


def _finished(path: Path, echo) -> bool:
    """Whether chunk file `path` exists and reads back. A chunk is a cache of a pure function
    of its key, so a corrupt one (a truncated copy, a full disk) is removed and recomputed."""
    if not path.exists():
        return False
    try:
        store.load_arrays(path)
        return True
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        echo(f"chunk {path} cannot be read ({type(e).__name__}: {e}); removing it and recomputing it")
        path.unlink()
        return False


def _cells_done(chunks: list[Chunk], done: set) -> int:
    pending = {cell for c in chunks if c.name not in done for cell in c.cells}
    return len({cell for c in chunks for cell in c.cells} - pending)
