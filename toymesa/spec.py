"""Sweep specs: a small TOML file (or a dict) -> validated cells.

A spec names a base config, axes over config fields, the seeds and the experiment's
hypotheses. Fields are written ``group.field`` (groups: model, task, train, safety, hparams), as
TOML dotted keys or nested tables; ``model = "tiny"`` picks a model size preset.

.. code-block:: toml

    name = "quickstart"
    description = "Does a latent goal install as reliably as a single trigger?"
    seeds = 4                      # or an explicit list [0, 1, 2, 3]

    [base]
    model = "tiny"
    task.helpful = "copy_kth"
    task.seq_len = "min"           # the shortest length the task's format needs
    train.steps = 300

    [grid]                         # every combination
    task.rule = ["single", "latent"]
    hparams.lr = [1e-3, 3e-3]

    [random]                       # optional: n draws, each crossed with the grid
    n = 4
    seed = 0
    hparams.weight_decay = { log_uniform = [1e-4, 1e-1] }   # or uniform = [a, b], choice = [...]

    [[arms]]                       # optional: a union of sub-grids instead of one product
    name = "lr"                    # each arm: fixed values and list-valued axes, crossed
    task.rule = "single"           # with [grid]; a config reached by two arms runs once
    hparams.lr = [3e-4, 3e-3]

    [run]                          # optional
    eval_every = 100               # evaluate behaviour every k steps (default: at the end)
    eval_prompts = 256             # prompts per class at each evaluation
    chunk_members = 64             # most population members trained in one program

    [[hypotheses]]
    id = "H1"
    statement = "A latent goal installs as reliably as a single trigger."
    prediction = "triggered_defection differs by < 0.05 between rules at the last step"
    rule = { equivalence = 0.05 }  # optional: the decision rule as data (`toymesa.prereg`)

Validation raises `SpecError` (a ValueError) with one line naming the key and the problem:
unknown keys and fields, values of the wrong type, empty or duplicate axis values, axes
whose every value equals the base (they would change nothing), cells that resolve to the
same config, and anything the config classes themselves reject.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toymesa import prereg
from toymesa.config import MODEL_SIZES, Config, HParams

GROUPS = ("model", "task", "train", "safety", "hparams")
TOP_KEYS = {"name", "description", "seeds", "base", "grid", "arms", "random", "run", "hypotheses"}
RUN_DEFAULTS = {"eval_every": None, "eval_prompts": 256, "chunk_members": 64, "save_params": True}
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")


class SpecError(ValueError):
    """A spec problem, reported on one line as ``source: key: problem``."""


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: its axis values and the config they resolve to."""

    index: int
    values: dict  # axis key -> value (grid and random axes)
    config: Config

    @property
    def id(self) -> str:
        return hashlib.sha256(repr(self.config).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    seeds: tuple[int, ...]
    base: dict  # flat key -> value
    grid: dict  # flat key -> list of values
    random: dict  # flat key -> {distribution: args}, plus n and seed
    run: dict
    hypotheses: tuple[dict, ...]
    source: str = "<spec>"
    arms: tuple = ()  # ((name, {flat key: [values]}), ...): sub-grids, scalars as 1-value axes
    text: str = ""  # the TOML text, kept verbatim in the run directory

    def cells(self) -> list[Cell]:
        return expand(self)

    @property
    def digest(self) -> str:
        """Hash of everything that determines the results (not the prose)."""
        key = (
            self.seeds,
            sorted(self.base.items()),
            sorted((k, tuple(v)) for k, v in self.grid.items()),
            repr(sorted(self.random.items())),
            sorted(self.run.items()),
        ) + ((repr(self.arms),) if self.arms else ())
        return hashlib.sha256(repr(key).encode()).hexdigest()[:12]


# ----------------------------------------------------------------- parsing
def load(path) -> Spec:
    """Read and validate a TOML spec file."""
    path = Path(path)
    if path.is_dir() and (path / "spec.toml").exists():
        path = path / "spec.toml"
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file (give a .toml file, or a folder holding spec.toml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the spec as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    return parse(raw, source=str(path), text=text, default_name=path.parent.name if path.name == "spec.toml" else path.stem)


def parse(raw: dict, source: str = "<spec>", text: str = "", default_name: str = "sweep") -> Spec:
    """Validate a spec given as a (TOML-shaped) dict."""

    def fail(key, problem):
        raise SpecError(f"{source}: {key}: {problem}")

    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        fail(unknown[0], f"unknown key; valid top-level keys are {sorted(TOP_KEYS)}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        fail("name", f"{name!r} must be a short identifier (letters, digits, _ or -)")
    description = raw.get("description", "")
    if not isinstance(description, str):
        fail("description", "must be a string")
    seeds = _seeds(raw.get("seeds", 4), fail)
    base = _flatten(raw.get("base", {}), "base", fail)
    for key, value in base.items():
        base[key] = _check_value(key, value, f"base.{key}", fail)
    grid = _flatten(raw.get("grid", {}), "grid", fail)
    if "grid" in raw and not grid:
        fail("grid", "has no axes; remove [grid] to run the base config alone")
    for key, values in grid.items():
        if not isinstance(values, list):
            fail(f"grid.{key}", f"must be a list of values, got {values!r}")
        if not values:
            fail(f"grid.{key}", "is empty; give at least one value or remove the axis")
        grid[key] = [_check_value(key, v, f"grid.{key}", fail) for v in values]
        dup = [v for i, v in enumerate(grid[key]) if grid[key].index(v) != i]
        if dup:
            fail(f"grid.{key}", f"lists {dup[0]!r} more than once")
        now = base[key] if key in base else _base_value(base, key)
        if all(v == now for v in grid[key]):
            fail(f"grid.{key}", f"changes nothing: every value equals the base value {now!r}")
    random = _random(raw.get("random"), fail, grid)
    run = _run(raw.get("run", {}), fail)
    hypotheses = prereg.check_hypotheses(raw.get("hypotheses", []), fail)
    arms = _arms(raw.get("arms", []), fail)
    spec = Spec(name, description, seeds, base, grid, random, run, hypotheses, source=source, text=text, arms=arms)
    expand(spec)  # resolve every cell now, so config errors surface before any training
    return spec


def _base_value(base: dict, key: str):
    """The value a field takes in the base config (its default unless the base sets it)."""
    if key == "model":
        return "reference" if "model" not in base else base["model"]
    try:
        cfg = resolve(base)
    except ValueError:
        return object()  # the base alone is invalid; the cells report it
    group, field = key.split(".", 1)
    return getattr(getattr(cfg, group), field)


def _seeds(seeds, fail) -> tuple[int, ...]:
    if isinstance(seeds, bool) or not isinstance(seeds, int | list):
        fail("seeds", f"must be a count (int >= 1) or a list of distinct ints >= 0, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            fail("seeds", f"{seeds} is not a positive count")
        return tuple(range(seeds))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in seeds):
        fail("seeds", f"must be a non-empty list of ints in [0, 2**31), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        fail("seeds", "lists a seed more than once")
    return tuple(seeds)


def _flatten(table, where: str, fail) -> dict:
    """{"task": {"rule": x}} or {"task.rule": x} -> {"task.rule": x}; distributions stay leaves."""
    if not isinstance(table, dict):
        fail(where, f"must be a table, got {table!r}")
    flat = {}
    for key, value in table.items():
        if "." in key:  # a quoted dotted key, "task.rule" = ..., as Python dicts write it
            key, value = key.split(".", 1)[0], {key.split(".", 1)[1]: value}
        if key == "model" and not isinstance(value, dict):
            flat[key] = value
            continue
        if key not in GROUPS:
            fail(f"{where}.{key}", f"unknown group; fields are written group.field with group one of {GROUPS} (or model = <size>)")
        if not isinstance(value, dict):
            fail(f"{where}.{key}", "must be a table of fields, e.g. task.rule = ...")
        for field, v in value.items():
            flat[f"{key}.{field}"] = v
    return flat


def nest(flat: dict) -> dict:
    """{"task.rule": x, "model": "tiny"} -> {"task": {"rule": x}, "model": "tiny"} (the TOML shape)."""
    out: dict = {}
    for key, v in flat.items():
        if "." in key:
            group, field = key.split(".", 1)
            out.setdefault(group, {})[field] = v
        else:
            out[key] = v
    return out


def _defaults(group: str) -> dict:
    return (
        Config().hparams._asdict()
        if group == "hparams"
        else {f.name: getattr(getattr(Config(), group), f.name) for f in dataclasses.fields(getattr(Config(), group))}
    )


def _check_value(key: str, value, where: str, fail):
    """Check one field value's type against the field's default; return it normalised."""
    if key == "model":
        if not isinstance(value, str) or value not in MODEL_SIZES:
            fail(where, f"unknown model size {value!r}; choose one of {list(MODEL_SIZES)}")
        return value
    group, field = key.split(".", 1)
    defaults = _defaults(group)
    if field not in defaults:
        fail(where, f"unknown field {group}.{field}; {group} fields are {sorted(defaults)}")
    default = defaults[field]
    if key == "task.seq_len" and value == "min":
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = "a list of ints" if isinstance(default, tuple) else type(default).__name__
        extra = ' (or "min")' if key == "task.seq_len" else ""
        fail(where, f"{value!r} has the wrong type; {key} takes {want}{extra}, e.g. {default!r}")
    return value


def _random(table, fail, grid) -> dict:
    if table is None:
        return {}
    if not isinstance(table, dict):
        fail("random", "must be a table")
    table = dict(table)
    n, seed = table.pop("n", None), table.pop("seed", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        fail("random.n", f"give the number of random draws as an int >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        fail("random.seed", f"must be an int >= 0, got {seed!r}")
    axes = {}
    for group, fields in table.items():
        if group not in GROUPS or group == "model":
            fail(f"random.{group}", f"unknown group; random axes are written group.field with group one of {GROUPS[1:]}")
        if not isinstance(fields, dict):
            fail(f"random.{group}", "must be a table of fields")
        for field, dist in fields.items():
            key = f"{group}.{field}"
            where = f"random.{key}"
            if key in grid:
                fail(where, "is also a grid axis; sweep a field on one axis only")
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                fail(where, f"must be one distribution {{name = args}} with name one of {DISTRIBUTIONS}")
            ((kind, args),) = dist.items()
            if kind == "choice":
                if not isinstance(args, list) or len(args) < 2:
                    fail(where, "choice needs a list of at least 2 values")
                args = [_check_value(key, v, where, fail) for v in args]
            else:
                ok = isinstance(args, list) and len(args) == 2 and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
                if not ok or not args[0] < args[1] or (kind == "log_uniform" and args[0] <= 0):
                    fail(where, f"{kind} needs [low, high] with low < high{' and low > 0' if kind == 'log_uniform' else ''}, got {args!r}")
                _check_value(key, float(args[0]) if isinstance(_defaults(group)[field], float) else args[0], where, fail)
                if not isinstance(_defaults(group)[field], float):
                    fail(where, f"{kind} draws real numbers but {key} is not a float field; use choice = [...]")
            axes[key] = {kind: args}
    if not axes:
        fail("random", "has no axes; add e.g. hparams.lr = { log_uniform = [1e-4, 1e-2] }")
    return {"n": n, "seed": seed, "axes": axes}


def _run(table, fail) -> dict:
    if not isinstance(table, dict):
        fail("run", "must be a table")
    unknown = sorted(set(table) - set(RUN_DEFAULTS))
    if unknown:
        fail(f"run.{unknown[0]}", f"unknown key; valid keys are {sorted(RUN_DEFAULTS)}")
    run = {**RUN_DEFAULTS, **table}
    for key in ("eval_prompts", "chunk_members"):
        v = run[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            fail(f"run.{key}", f"must be an int >= 1, got {v!r}")
    ev = run["eval_every"]
    if ev is not None and (isinstance(ev, bool) or not isinstance(ev, int) or ev < 1):
        fail("run.eval_every", f"must be an int >= 1 (steps between evaluations), got {ev!r}")
    if not isinstance(run["save_params"], bool):
        fail("run.save_params", f"must be true or false, got {run['save_params']!r}")
    return run


def _arms(items, fail) -> tuple:
    if not isinstance(items, list) or not all(isinstance(a, dict) for a in items):
        fail("arms", "must be an array of tables: [[arms]] with a name and group.field values")
    arms, names = [], set()
    for i, a in enumerate(items):
        a = dict(a)
        name = a.pop("name", f"arm{i}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in names:
            fail(f"arms[{i}].name", f"{name!r} must be a short identifier (letters, digits, _ or -), unique among arms")
        names.add(name)
        flat = _flatten(a, f"arms[{i}]", fail)
        if not flat:
            fail(f"arms[{i}]", "sets nothing; give group.field values (a list makes an axis)")
        axes = {}
        for key, values in flat.items():
            tuple_field = key != "model" and isinstance(_defaults(key.split(".")[0]).get(key.split(".", 1)[1]), tuple)
            is_axis = isinstance(values, list) and not (tuple_field and values and not isinstance(values[0], list))
            values = values if is_axis else [values]
            if not values:
                fail(f"arms[{i}].{key}", "is empty; give at least one value")
            axes[key] = [_check_value(key, v, f"arms[{i}].{key}", fail) for v in values]
        arms.append((name, axes))
    return tuple(arms)


# ----------------------------------------------------------------- cells
def _draws(spec: Spec) -> list[dict]:
    if not spec.random:
        return [{}]
    rng = np.random.default_rng(spec.random["seed"])
    draws = []
    for _ in range(spec.random["n"]):
        d = {}
        for key, dist in spec.random["axes"].items():
            ((kind, args),) = dist.items()
            if kind == "uniform":
                d[key] = float(rng.uniform(*args))
            elif kind == "log_uniform":
                d[key] = float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
            else:
                d[key] = args[int(rng.integers(len(args)))]
        draws.append(d)
    return draws


def resolve(values: dict) -> Config:
    """A Config from flat ``group.field`` values (and an optional ``model`` size)."""
    cfg = Config()
    if "model" in values:
        cfg = dataclasses.replace(cfg, model=MODEL_SIZES[values["model"]]())
    groups: dict = {}
    for key, v in values.items():
        if key != "model":
            group, field = key.split(".", 1)
            groups.setdefault(group, {})[field] = v
    min_len = groups.get("task", {}).get("seq_len") == "min"
    if min_len:
        groups["task"]["seq_len"] = 10_000  # placeholder: any length passes validation
    cfg = cfg.replace(**groups)
    if min_len:
        cfg = cfg.replace(task=dict(seq_len=cfg.task.min_seq_len))
    return cfg


def expand(spec: Spec) -> list[Cell]:
    """Cells of the spec: the grid's product (in key order) crossed with the random draws;
    with arms, the union over arms of that product crossed with each arm's axes (a config
    two arms share runs once, under the first arm's name)."""
    cells, earlier = [], {}
    for arm, arm_axes in spec.arms or ((None, {}),):
        axes = {**spec.grid, **arm_axes}
        keys, seen = list(axes), {}
        for combo in itertools.product(*(axes[k] for k in keys)):
            for draw in _draws(spec):
                values = {**dict(zip(keys, combo, strict=True)), **draw}
                try:
                    cfg = resolve({**spec.base, **values})
                except ValueError as e:
                    where = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "base"
                    raise SpecError(f"{spec.source}: cell ({'arm ' + arm + ': ' if arm else ''}{where}): {e}") from None
                if cfg in seen:
                    raise SpecError(f"{spec.source}: cells ({seen[cfg]}) and ({values}) resolve to the same config; an axis changes nothing there")
                seen[cfg] = values
                if cfg in earlier:
                    continue
                earlier[cfg] = arm
                cells.append(Cell(len(cells), {"arm": arm, **values} if arm else values, cfg))
    return cells


def static_key(cfg: Config) -> Config:
    """The part of a config that fixes compiled shapes: everything but the hparams."""
    return dataclasses.replace(cfg, hparams=HParams())


def groups(cells: list[Cell]) -> list[list[Cell]]:
    """Cells grouped by static shape (first-seen order); each group is one population."""
    out: dict = {}
    for c in cells:
        out.setdefault(static_key(c.config), []).append(c)
    return list(out.values())
