"""Sweep specs: a small TOML file (or a dict) -> validated cells.

A spec names a base config, axes over config fields ([grid], [random], [[arms]]), the seeds
and the experiment's hypotheses. Fields are written ``group.field`` (groups: model, task,
train, safety, hparams); ``model = "tiny"`` or ``model.size = "tiny"`` picks a model size
preset, and the second form takes field overrides (``model.d_model = 48``). The format,
section by section, with a complete example: docs/spec.md. The checks of each section live in
`toymesa.spec_fields`; here: loading, the `Spec`, and its expansion into `Cell`s.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toymesa import prereg
from toymesa.config import Config, HParams
from toymesa.presets import MODEL_SIZES
from toymesa.spec_fields import check_arms, check_meter, check_random, check_run, check_seeds, check_value, flatten
from toymesa.spec_fields import nest as nest  # re-exported: `toymesa.demo` builds its spec with it

TOP_KEYS = {"name", "description", "seeds", "base", "grid", "arms", "random", "run", "hypotheses", "meter"}


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
    meter: dict = field(default_factory=dict)  # [meter]: meters measured after training (not in the digest: training does not depend on it)

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
    seeds = check_seeds(raw.get("seeds", 4), fail)
    base, b_name = flatten(raw.get("base", {}), "base", fail)
    for key, value in base.items():
        base[key] = check_value(key, value, f"base.{b_name[key]}", fail)
    grid, g_name = flatten(raw.get("grid", {}), "grid", fail)
    if "grid" in raw and not grid:
        fail("grid", "has no axes; remove [grid] to run the base config alone")
    for key, values in grid.items():
        where = f"grid.{g_name[key]}"
        if not isinstance(values, list):
            fail(where, f"must be a list of values, got {values!r}")
        if not values:
            fail(where, "is empty; give at least one value or remove the axis")
        grid[key] = [check_value(key, v, where, fail) for v in values]
        dup = [v for i, v in enumerate(grid[key]) if grid[key].index(v) != i]
        if dup:
            fail(where, f"lists {dup[0]!r} more than once")
        now = base[key] if key in base else _base_value(base, key)
        if all(v == now for v in grid[key]):
            fail(where, f"changes nothing: every value equals the base value {now!r}")
    random = check_random(raw.get("random"), fail, grid)
    run = check_run(raw.get("run", {}), fail)
    hypotheses = prereg.check_hypotheses(raw.get("hypotheses", []), fail)
    arms = check_arms(raw.get("arms", []), fail)
    meter = check_meter(raw.get("meter"), fail)
    spec = Spec(name, description, seeds, base, grid, random, run, hypotheses, source=source, text=text, arms=arms, meter=meter)
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
                    raise SpecError(f"{spec.source}: {_culprit(spec.base, values, arm, str(e), _all_values(spec))}: {e}") from None
                if cfg in seen:
                    raise SpecError(f"{spec.source}: cells ({seen[cfg]}) and ({values}) resolve to the same config; an axis changes nothing there")
                seen[cfg] = values
                if cfg in earlier:
                    continue
                earlier[cfg] = arm
                cells.append(Cell(len(cells), {"arm": arm, **values} if arm else values, cfg))
    return cells


def _culprit(base: dict, values: dict, arm, error: str, every=()) -> str:
    """Where a config error comes from: "base" when the base alone fails with the same
    error and no cell (axis values in `every`) resolves (naming the first cell would point
    at an axis that is not at fault), otherwise the cell's axis values."""
    try:
        resolve(base)
    except ValueError as e:
        if str(e) == error and not any(_resolves({**base, **v}) for v in every):
            return "base (every cell inherits it)"
    where = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "base"
    return f"cell ({'arm ' + arm + ': ' if arm else ''}{where})"


def _all_values(spec: Spec):
    """The axis values of every cell, before de-duplication (a generator)."""
    for _, arm_axes in spec.arms or ((None, {}),):
        axes = {**spec.grid, **arm_axes}
        for combo in itertools.product(*axes.values()):
            for draw in _draws(spec):
                yield {**dict(zip(axes, combo, strict=True)), **draw}


def _resolves(values: dict) -> bool:
    try:
        resolve(values)
    except ValueError:
        return False
    return True


def static_key(cfg: Config) -> Config:
    """The part of a config that fixes compiled shapes: everything but the hparams."""
    return dataclasses.replace(cfg, hparams=HParams())


def groups(cells: list[Cell]) -> list[list[Cell]]:
    """Cells grouped by static shape (first-seen order); each group is one population."""
    out: dict = {}
    for c in cells:
        out.setdefault(static_key(c.config), []).append(c)
    return list(out.values())
