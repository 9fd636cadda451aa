"""The sections of a sweep spec, checked one at a time (used by `toymesa.spec`).

A spec writes config fields as ``group.field`` (TOML dotted keys or nested tables); here
they become one flat dict, ``{"task.rule": "latent", "model": "tiny", "model.d_model": 48}``,
where the key ``model`` holds a model size preset, written ``model = "tiny"`` or
``model.size = "tiny"`` (the second form combines with field overrides). `nest` turns the
flat form back into the TOML shape. Every check reports through ``fail(key, problem)``,
which raises; the checked value comes back normalised (ints on float fields as floats,
lists on tuple fields as tuples).
"""

from __future__ import annotations

import dataclasses
import re

from toymesa import checks
from toymesa.config import Config
from toymesa.presets import MODEL_SIZES

GROUPS = ("model", "task", "train", "safety", "hparams")
RUN_DEFAULTS = {"eval_every": None, "eval_prompts": 256, "chunk_members": 64, "save_params": True}
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
PRESET = "size"  # model.size = "tiny": the preset, stored under the flat key "model"


def check_seeds(seeds, fail) -> tuple[int, ...]:
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


def flatten(table, where: str, fail) -> tuple[dict, dict]:
    """{"task": {"rule": x}} or {"task.rule": x} -> {"task.rule": x}; distributions stay leaves.

    The preset, ``model = p`` or ``model.size = p``, becomes the key ``model``. Returns the
    flat dict and, per flat key, the key as written (errors name what the user wrote)."""
    if not isinstance(table, dict):
        fail(where, f"must be a table, got {table!r}")
    flat, written = {}, {}

    def put(key, name, value):
        if key in flat:  # only the preset has two spellings
            fail(f"{where}.{name}", f"the model size is given twice (as {where}.{written[key]} and {where}.{name}); keep one")
        flat[key], written[key] = value, name

    for key, value in table.items():
        if "." in key:  # a quoted dotted key, "task.rule" = ..., as Python dicts write it
            key, value = key.split(".", 1)[0], {key.split(".", 1)[1]: value}
        if key == "model" and not isinstance(value, dict):
            put("model", "model", value)
            continue
        if key not in GROUPS:
            fail(f"{where}.{key}", f"unknown group; fields are written group.field with group one of {GROUPS} (or model.size = <size>)")
        if not isinstance(value, dict):
            fail(f"{where}.{key}", "must be a table of fields, e.g. task.rule = ...")
        for field, v in value.items():
            if key == "model" and field == PRESET:
                put("model", f"model.{PRESET}", v)
            else:
                put(f"{key}.{field}", f"{key}.{field}", v)
    return flat, written


def nest(flat: dict) -> dict:
    """{"task.rule": x, "model": "tiny"} -> {"task": {"rule": x}, "model": "tiny"} (the TOML
    shape); with model field overrides the preset goes in as ``model.size``."""
    out: dict = {}
    for key, v in flat.items():
        if "." in key:
            group, field = key.split(".", 1)
            out.setdefault(group, {})[field] = v
    if "model" in flat:
        if "model" in out:
            out["model"] = {PRESET: flat["model"], **out["model"]}
        else:
            out["model"] = flat["model"]
    return out


def field_defaults(group: str) -> dict:
    return (
        Config().hparams._asdict()
        if group == "hparams"
        else {f.name: getattr(getattr(Config(), group), f.name) for f in dataclasses.fields(getattr(Config(), group))}
    )


def check_value(key: str, value, where: str, fail):
    """Check one field value's type against the field's default; return it normalised."""
    if key == "model":
        if not isinstance(value, str) or value not in MODEL_SIZES:
            fail(where, f"unknown model size {value!r}; choose one of {list(MODEL_SIZES)}")
        return value
    group, field = key.split(".", 1)
    defaults = field_defaults(group)
    if field not in defaults:
        extra = f" (and {PRESET}, the preset)" if group == "model" else ""
        fail(where, f"unknown field {group}.{field}; {group} fields are {sorted(defaults)}{extra}")
    default = defaults[field]
    if default is None:  # a field annotated `T | None` that follows others unless set: check against T
        default = checks.unset_type(type(getattr(Config(), group)), field)()
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


def check_random(table, fail, grid) -> dict:
    """``[random]`` -> {"n", "seed", "axes": {flat key: {distribution: args}}} ({} when absent)."""
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
                args = [check_value(key, v, where, fail) for v in args]
            else:
                ok = isinstance(args, list) and len(args) == 2 and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
                if not ok or not args[0] < args[1] or (kind == "log_uniform" and args[0] <= 0):
                    fail(where, f"{kind} needs [low, high] with low < high{' and low > 0' if kind == 'log_uniform' else ''}, got {args!r}")
                check_value(key, float(args[0]) if isinstance(field_defaults(group)[field], float) else args[0], where, fail)
                if not isinstance(field_defaults(group)[field], float):
                    fail(where, f"{kind} draws real numbers but {key} is not a float field; use choice = [...]")
            axes[key] = {kind: args}
    if not axes:
        fail("random", "has no axes; add e.g. hparams.lr = { log_uniform = [1e-4, 1e-2] }")
    return {"n": n, "seed": seed, "axes": axes}


def _with_defaults(section: str, table, defaults: dict, fail, example: str = "") -> dict:
    """A section's table (a dict whose keys are all known) with its defaults filled in."""
    if not isinstance(table, dict):
        fail(section, "must be a table" + (f", e.g. {example}" if example else ""))
    unknown = sorted(set(table) - set(defaults))
    if unknown:
        fail(f"{section}.{unknown[0]}", f"unknown key; valid keys are {sorted(defaults)}")
    return {**defaults, **table}


def check_run(table, fail) -> dict:
    """``[run]`` with its defaults filled in."""
    run = _with_defaults("run", table, RUN_DEFAULTS, fail)
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


def check_arms(items, fail) -> tuple:
    """``[[arms]]`` -> ((name, {flat key: [values]}), ...); a scalar is a one-value axis."""
    if not isinstance(items, list) or not all(isinstance(a, dict) for a in items):
        fail("arms", "must be an array of tables: [[arms]] with a name and group.field values")
    arms, names = [], set()
    for i, a in enumerate(items):
        a = dict(a)
        name = a.pop("name", f"arm{i}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in names:
            fail(f"arms[{i}].name", f"{name!r} must be a short identifier (letters, digits, _ or -), unique among arms")
        names.add(name)
        flat, written = flatten(a, f"arms[{i}]", fail)
        if not flat:
            fail(f"arms[{i}]", "sets nothing; give group.field values (a list makes an axis)")
        axes = {}
        for key, values in flat.items():
            where = f"arms[{i}].{written[key]}"
            tuple_field = key != "model" and isinstance(field_defaults(key.split(".")[0]).get(key.split(".", 1)[1]), tuple)
            is_axis = isinstance(values, list) and not (tuple_field and values and not isinstance(values[0], list))
            values = values if is_axis else [values]
            if not values:
                fail(where, "is empty; give at least one value")
            axes[key] = [check_value(key, v, where, fail) for v in values]
        arms.append((name, axes))
    return tuple(arms)


METER_DEFAULTS = {"meters": [], "model": "final", "chains": None, "draws": None}


def check_meter(table, fail) -> dict:
    """``[meter]``: meters to measure every stored model with after training (`toymesa meter`);
    {} when absent. Names and settings are checked here, before anything trains."""
    if table is None:
        return {}
    m = _with_defaults("meter", table, METER_DEFAULTS, fail, '[meter] meters = ["llc", "norm"]')
    from toymesa.meter.names import METER_NAMES, WHICH

    if not isinstance(m["meters"], list) or not m["meters"] or any(x not in METER_NAMES for x in m["meters"]):
        fail("meter.meters", f"must be a non-empty list of meter names from {list(METER_NAMES)}, got {m['meters']!r}")
    if m["model"] not in WHICH:
        fail("meter.model", f"must be one of {list(WHICH)}, got {m['model']!r}")
    for key in ("chains", "draws"):
        v = m[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            fail(f"meter.{key}", f"must be an int >= 1 (or left out for the default), got {v!r}")
    return m
