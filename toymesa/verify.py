"""`toymesa verify RUN`: recompute stored chunks from their configs and seeds, and compare.

Every chunk of a run folder is a pure function of (configs, seeds, run settings, code), so a
reader can recompute any of them with the installed code and compare the arrays with the
stored ones. The plan is rebuilt from what the folder stores (configs.json, the seeds and run
settings in meta.json, the device count the run used), never from a spec that may have
changed since; each rebuilt cell must reproduce the cell id in cells.csv, and with the same
code each rebuilt chunk must reproduce its stored file name (a hash of everything it depends
on), so a wrong reconstruction is caught before anything trains. Installs are recomputed too
(the folder's installs/ are a cache and are not read), each in the population that first
computed it: cells that differ only in their safety phase share installs, which the run trains
once, in the first chunk (in plan order) that needs them, together with that chunk's other new
installs; and a member's float rounding depends on its population's size (XLA picks kernels
by shape), so recomputing an install in another population would not be a bit-for-bit check.

Comparison: bit for bit when the machine type (architecture, CPU model, device count) and the
numerical libraries' versions equal the run's, since then XLA compiles the same programs;
otherwise within ``|a - b| <= atol + rtol |b|`` (`RTOL`, `ATOL`): a different CPU or JAX
version changes kernels and summation order, float32 rounding differences of ~1e-7 per
operation that training then carries. A greedy answer that flips changes a rate by one
prompt, and is reported as a difference, not absorbed.

Then results.csv and summary.csv are re-derived from the stored chunks, and the verdicts from
the stored tables, and compared with the stored files. Each verification is appended to
RUN/verified.json (when, which code digest, what was checked, the outcome), which
`toymesa report` shows.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import claims, experiment, provenance, runs, store

RTOL, ATOL = 1e-5, 1e-6
RECORD = "verified.json"


class CodeMismatch(ValueError):
    """The installed code is not the code the run was computed with."""


@dataclasses.dataclass(frozen=True)
class StoredSpec:
    """What `toymesa.sweep.plan` needs, rebuilt from a run folder instead of a spec file."""

    cells_: tuple
    seeds: tuple[int, ...]
    run: dict

    def cells(self) -> list:
        return list(self.cells_)


@dataclasses.dataclass(frozen=True)
class Check:
    """The outcome of comparing one recomputed item (a chunk, a table) with the stored one."""

    name: str
    status: str  # "identical", "within tolerance", "different", "missing"
    largest: float  # largest absolute difference over every compared number (nan: none compared)
    where: str = ""  # the array or column holding it, or what is missing
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("identical", "within tolerance")

    def line(self) -> str:
        big = "" if np.isnan(self.largest) else f"  largest |difference| {self.largest:.3g}"
        where = f" ({self.where})" if self.where else ""
        took = f"  {self.seconds:.1f} s" if self.seconds else ""
        return f"{self.name}: {self.status}{big}{where}{took}"


def meta(out) -> dict:
    path = Path(out) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{out} is not a run folder (no meta.json); give a folder written by `toymesa run`, `toymesa sweep` or `toymesa demo`")
    return json.loads(path.read_text())


def stored_spec(out) -> StoredSpec:
    """The cells, seeds and run settings of a run folder, as stored. Each cell's config must
    hash to the cell id recorded in cells.csv."""
    from toymesa.spec import Cell

    out = Path(out)
    m = meta(out)
    configs = json.loads((out / "configs.json").read_text())
    ids = dict(pd.read_csv(out / "cells.csv")[["cell", "cell_id"]].itertuples(index=False))
    cells = []
    for k in sorted(configs, key=int):
        cell = Cell(int(k), {}, runs.config_from_dict(configs[k]))
        if cell.id != ids.get(int(k)):
            raise ValueError(
                f"{out}/configs.json cell {k} rebuilds to config id {cell.id}, but cells.csv records {ids.get(int(k))}: the folder's files disagree"
            )
        cells.append(cell)
    return StoredSpec(tuple(cells), tuple(m["seeds"]), m["run"])


def mode(m: dict, rtol: float | None = None) -> tuple[str, str]:
    """("bitwise" or "tolerance", why): bitwise only on the run's machine type and versions."""
    if rtol is not None:
        return "tolerance", "asked for (--rtol)"
    diffs = []
    here = {"versions": provenance.versions(), "machine": provenance.machine(), "devices": _devices()}
    for key, now in here.items():
        then = m.get(key)
        if then is None:
            diffs.append(f"the run did not record its {key}")
            continue
        for k in sorted(set(now) | set(then)):
            if k not in ("toymesa", "n_processes") and now.get(k) != then.get(k):
                diffs.append(f"{k} {then.get(k)} then, {now.get(k)} now")
    return ("tolerance", "; ".join(diffs)) if diffs else ("bitwise", "same machine type, device count and library versions as the run")


def _devices() -> dict:
    from toymesa import devices

    return devices.describe()


def compare(stored: dict, fresh: dict, how: str, rtol: float = RTOL, atol: float = ATOL) -> tuple[str, float, str]:
    """(status, largest |difference|, where) of two dicts of arrays."""
    if stored.keys() != fresh.keys():
        gone, new = sorted(stored.keys() - fresh.keys()), sorted(fresh.keys() - stored.keys())
        return "different", np.nan, f"arrays only stored: {gone}; only recomputed: {new}"
    largest, where, status = 0.0, "", "identical"
    for k in sorted(stored):
        a, b = np.asarray(stored[k]), np.asarray(fresh[k])
        if a.shape != b.shape or a.dtype != b.dtype:
            return "different", np.nan, f"{k}: stored {a.dtype}{list(a.shape)}, recomputed {b.dtype}{list(b.shape)}"
        if a.tobytes() == b.tobytes():
            continue
        x, y = a.astype(np.float64), b.astype(np.float64)
        same_nan = np.isnan(x) == np.isnan(y)
        d = np.where(np.isnan(x) | np.isnan(y), np.where(same_nan, 0.0, np.inf), np.abs(x - y))
        if d.max() >= largest:
            largest, where = float(d.max()), k
        close = how == "tolerance" and bool(same_nan.all()) and np.allclose(y, x, rtol=rtol, atol=atol, equal_nan=True)
        if not close:
            status = "different"
        elif status == "identical":
            status = "within tolerance"
    return status, largest, where


def _plan(out: Path, m: dict, spec: StoredSpec, same_code: bool):
    """Each stored chunk file with the chunk it is, rebuilt; a stored file no planned chunk
    explains, or a planned chunk with no file, is an error."""
    from toymesa import sweep

    n_dev = (m.get("devices") or {}).get("n_devices")
    if n_dev is None:
        raise ValueError(f"{out}/meta.json does not record the device count the run used; its chunks cannot be rebuilt")
    chunks = sweep.plan(spec, n_devices=n_dev)
    files = {p.stem: p for p in runs.chunk_files(out)}
    if same_code:
        by_name = {c.name: c for c in chunks}
    else:  # other code: the hash in the name differs; match by group and chunk index
        prefix = {c.name[:9]: c for c in chunks}
        by_name = {s: prefix[s[:9]] for s in files if s[:9] in prefix}
    unplanned = sorted(set(files) - set(by_name))
    missing = sorted(c.name for c in chunks if c.name not in files and (same_code or not any(s[:9] == c.name[:9] for s in files)))
    if unplanned or missing:
        raise ValueError(
            f"{out}/chunks does not match the plan rebuilt from its configs: "
            + (f"{len(unplanned)} file(s) no chunk explains ({', '.join(unplanned[:3])}); " if unplanned else "")
            + (f"{len(missing)} chunk(s) missing ({', '.join(missing[:3])}); rerun the run's command to finish it" if missing else "")
        )
    return [(files[s], by_name[s]) for s in sorted(files)]


def install_keys(chunk) -> list[str]:
    """The install cache keys of a chunk's members, padding included (none without safety training)."""
    from toymesa import sweep

    if chunk.cfg.safety.method == "none":
        return []
    pad = chunk.size - chunk.n
    seeds, hps = chunk.seeds + chunk.seeds[:1] * pad, chunk.hparams + chunk.hparams[:1] * pad
    return [sweep._member_key(chunk.cfg, s, h) for s, h in zip(seeds, hps, strict=True)]


def install_origins(chunks) -> dict[str, tuple]:
    """For each install key of a run, the population that computed it, as (seeds, hparams) to
    pass to `toymesa.sweep.installed`: the new installs of the first chunk, in plan order, that
    needed it (what `toymesa.sweep.run` does with its installs/ cache)."""
    origins: dict[str, tuple] = {}
    for c in chunks:
        keys = install_keys(c)
        if not keys:  # no safety training: nothing installed
            continue
        pad = c.size - c.n
        members = dict(zip(keys, zip(c.seeds + c.seeds[:1] * pad, c.hparams + c.hparams[:1] * pad, strict=True), strict=True))
        new = [k for k in dict.fromkeys(keys) if k not in origins]
        population = (tuple(members[k][0] for k in new), tuple(members[k][1] for k in new))
        origins.update(dict.fromkeys(new, population))
    return origins


def _frame_check(name: str, stored: Path, fresh: pd.DataFrame, how: str) -> Check:
    if not stored.exists():
        return Check(name, "missing", np.nan, f"no stored {stored.name}")
    text = io.StringIO()
    fresh.to_csv(text, index=False)  # the writer of `toymesa.store.save_frame`
    if text.getvalue() == stored.read_text():
        return Check(name, "identical", 0.0)
    old, new = pd.read_csv(stored), pd.read_csv(io.StringIO(text.getvalue()))
    if list(old.columns) != list(new.columns) or old.shape != new.shape:
        return Check(name, "different", np.nan, f"stored {old.shape[0]} rows x {list(old.columns)[:6]}..., re-derived {new.shape[0]} rows")
    num = [c for c in old.columns if pd.api.types.is_numeric_dtype(old[c]) and pd.api.types.is_numeric_dtype(new[c])]
    text_cols = [c for c in old.columns if c not in num and not old[c].astype(str).equals(new[c].astype(str))]
    if text_cols:
        return Check(name, "different", np.nan, f"column {text_cols[0]}")
    status, largest, where = compare({c: old[c].to_numpy(np.float64) for c in num}, {c: new[c].to_numpy(np.float64) for c in num}, how)
    return Check(name, status, largest, f"column {where}" if where else "")


def tables(out: Path, planned: set[str], how: str) -> list[Check]:
    """results.csv and summary.csv re-derived from the stored chunks; the verdicts and the
    ledger of published numbers re-derived from the stored tables, against verdicts.csv and
    claims.json where the folder holds them."""
    df = runs.tidy(out, keep=planned)
    checks = [_frame_check("results.csv", out / "results.csv", df, how), _frame_check("summary.csv", out / "summary.csv", runs.summarize(df), how)]
    if (out / "verdicts.csv").exists():
        checks.append(_frame_check("verdicts.csv", out / "verdicts.csv", experiment.for_results(out).verdicts(out), how))
    if (out / claims.LEDGER).exists():
        diff = claims.differences(json.loads((out / claims.LEDGER).read_text()), claims.derive(out))
        checks.append(Check(claims.LEDGER, "different" if diff else "identical", np.nan, "; ".join(diff[:3])))
    return checks


def verify(
    out,
    sample: int | None = 3,
    seed: int | None = None,
    any_code: bool = False,
    rtol: float | None = None,
    atol: float = ATOL,
    echo=print,
    progress: bool = True,
) -> dict:
    """Recompute `sample` randomly chosen chunks of run folder `out` (None: all of them) and
    compare them with the stored ones; re-derive its tables and verdicts. Returns the record
    appended to RUN/verified.json; ``record["passed"]`` is False on any difference.

    Refuses (`CodeMismatch`) when the installed code digest differs from the run's, unless
    `any_code`: the comparison then says whether the other code computes the same numbers."""
    from toymesa import sweep

    out = Path(out)
    t0 = time.perf_counter()
    m = meta(out)
    code = provenance.code_digest()
    same_code = m.get("code_digest") == code
    if not same_code and not any_code:
        raise CodeMismatch(
            f"{out} was computed by code with digest {m.get('code_digest') or '(not recorded)'} (commit {m.get('git_commit')}); "
            + f"the installed toymesa has code digest {code}. Recomputing would compare two programs, not check the run: check out that commit, "
            + "or pass --any-code to compare anyway"
        )
    how, why = mode(m, rtol)
    rtol = RTOL if rtol is None else rtol
    pairs = _plan(out, m, stored_spec(out), same_code)
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    chosen = pairs if sample is None or sample >= len(pairs) else sorted(random.Random(seed).sample(pairs, sample), key=lambda p: p[0].name)
    echo(f"verifying {out}: {len(chosen)} of {len(pairs)} chunks" + ("" if len(chosen) == len(pairs) else f" (random sample, seed {seed})"))
    echo(f"comparison: {'bit for bit' if how == 'bitwise' else f'within |a - b| <= {atol:g} + {rtol:g} |b|'} ({why})")
    if not same_code:
        echo(f"code: the run's digest {m.get('code_digest')} differs from the installed {code} (--any-code)")
    checks = []
    origins = install_origins([c for _, c in pairs])
    for path, chunk in chosen:
        t = time.perf_counter()
        bar = _bar(chunk, path.stem) if progress else None
        try:
            with tempfile.TemporaryDirectory() as cache:
                for origin in dict.fromkeys(origins[k] for k in install_keys(chunk)):
                    sweep.installed(chunk.cfg, *origin, cache=Path(cache))  # as the run trained them: same population
                fresh = sweep.run_chunk(chunk, m["run"], on_steps=bar.update if bar is not None else None, cache=Path(cache))
        finally:
            if bar is not None:
                bar.close()
        status, largest, where = compare(store.load_arrays(path), fresh, how, rtol, atol)
        checks.append(Check(path.stem, status, largest, where, time.perf_counter() - t))
        echo("  " + checks[-1].line())
    for c in tables(out, {p.name for p, _ in pairs}, how):
        checks.append(c)
        echo("  " + c.line())
    passed = all(c.ok for c in checks)
    record = {
        "verified": datetime.datetime.now().isoformat(timespec="seconds"),
        "passed": passed,
        "code_digest": code,
        "run_code_digest": m.get("code_digest"),
        "git_commit": provenance.git_commit(),
        "comparison": how,
        "why": why,
        "rtol": rtol if how == "tolerance" else None,
        "atol": atol if how == "tolerance" else None,
        "chunks": f"{len(chosen)} of {len(pairs)}",
        "seed": None if len(chosen) == len(pairs) else seed,
        "checks": [dataclasses.asdict(c) | {"largest": None if np.isnan(c.largest) else c.largest} for c in checks],
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": provenance.machine(),
        "versions": provenance.versions(),
    }
    history = json.loads((out / RECORD).read_text()) if (out / RECORD).exists() else []
    store.save_json([*history, record], out / RECORD)
    bad = [c for c in checks if not c.ok]
    echo(
        f"{'PASSED' if passed else 'FAILED'}: {len(checks) - len(bad)} of {len(checks)} checks agree"
        + (f"; different: {', '.join(c.name for c in bad)}" if bad else "")
        + f" ({record['seconds']:.0f} s)"
    )
    return record


def _bar(chunk, name: str):
    from tqdm.auto import tqdm

    from toymesa import sweep

    steps = chunk.n * chunk.cfg.train.steps + (chunk.n * sweep.phase_steps(chunk.cfg) if chunk.cfg.safety.method != "none" else 0)
    return tqdm(total=steps, desc=name, unit=" seed-step", unit_scale=True, dynamic_ncols=True, leave=False)


def status(out) -> str:
    """One line on run folder `out`'s verification: the last record, or "not verified"."""
    path = Path(out) / RECORD
    if not path.exists():
        return "not verified (run `toymesa verify " + str(out) + "`)"
    r = json.loads(path.read_text())[-1]
    word = "verified" if r["passed"] else "verification FAILED"
    how = "bit for bit" if r["comparison"] == "bitwise" else f"within rtol {r['rtol']:g}, atol {r['atol']:g}"
    other = "" if r["code_digest"] == r.get("run_code_digest") else f" (run computed by {r.get('run_code_digest')})"
    return f"{word} {r['verified']}: {r['chunks']} chunks recomputed, {how}, code digest {r['code_digest']}{other}"
