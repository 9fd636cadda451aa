"""Fuzz the config constructors: an invalid value of any kind, for any field of any group,
must raise a one-line ValueError that starts ``Owner.field=`` (``TaskConfig.trigger=1.5 is
invalid: ...``), however the config is built (constructor, `dataclasses.replace`, `Config.replace`).

Invalid classes: strings and numbers for bools; floats for ints (non-integral, and integer-valued
like 2.0: rejected by design, nothing is truncated); bools and strings for numbers; inf, -inf and
NaN; None; a near-miss or a list for a Literal; lists with a bad item, wrong lengths, strings and
scalars for tuples; names, dicts and the wrong group for a `Config` group; bad stacked arrays for
`HParams`; unknown field names. One table of value generators drives a hypothesis test, a
deterministic loop over 200 seeded draws, and an exhaustive pass over every field and class.
Configs only, no JAX compiles: the file runs in a few seconds.
"""

import dataclasses
import types
import typing

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toymesa.checks import UnknownFieldError
from toymesa.config import Config, HParams, ModelConfig, SafetyConfig, TaskConfig, TrainConfig, check_hparams

GROUPS = {"model": ModelConfig, "task": TaskConfig, "train": TrainConfig, "hparams": HParams, "safety": SafetyConfig}
OWNERS = (*GROUPS.values(), Config)


def kind(hint) -> str:
    """The invalid classes that apply to a field depend only on this coarse kind of its annotation."""
    origin = typing.get_origin(hint)
    if origin is types.UnionType:  # T | None: unset follows other fields; T's invalid classes apply, None does not
        (inner,) = (a for a in typing.get_args(hint) if a is not type(None))
        return kind(inner) + "?"
    if origin is typing.Literal:
        return "literal"
    if origin is tuple:
        return "tuple" if typing.get_args(hint)[-1] is Ellipsis else "pair"
    return {bool: "bool", int: "int", float: "float"}.get(hint, "group")


FIELDS = {cls: {name: (kind(hint), hint) for name, hint in typing.get_type_hints(cls).items()} for cls in OWNERS}


class NumpyPick:
    """Choices from a seeded NumPy generator (the deterministic loop)."""

    def __init__(self, rng):
        self.rng = rng

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def integer(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))


class HypothesisPick:
    """The same choices drawn by hypothesis (so failures shrink)."""

    def __init__(self, data):
        self.data = data

    def choice(self, seq):
        return self.data.draw(st.sampled_from(seq))

    def integer(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))


NAN, INF = float("nan"), float("inf")


def bad_item_list(p, hint):
    """A list of valid ints with one bad item; the right length for a pair."""
    args = typing.get_args(hint)
    items = list(range(p.integer(1, 4) if args[-1] is Ellipsis else len(args)))
    items[p.integer(0, len(items) - 1)] = p.choice([1.5, 2.0, "3", True, None, NAN, INF, [1]])
    return items


def near_miss(p, hint):
    """A string one typo away from a valid Literal choice."""
    c = p.choice(typing.get_args(hint))
    return p.choice([c.upper(), c + " ", c[:-1], c + "s", "x" + c])


def other_group(p, hint):
    return p.choice([cls for cls in GROUPS.values() if cls is not hint])()


# class -> (kinds it applies to, owners it is limited to or None, generator(pick, hint) -> invalid value)
INVALID = {
    "str for bool": ({"bool"}, None, lambda p, h: p.choice(["no", "false", "False", "True", "yes", "0", ""])),
    "number for bool": ({"bool"}, None, lambda p, h: p.choice([0, 1, 0.0, 1.0, 2])),
    "float for int": ({"int", "int?"}, None, lambda p, h: p.integer(-20, 40) + p.choice([0.5, 0.25, -0.1])),
    "int-valued float for int": ({"int", "int?"}, None, lambda p, h: float(p.integer(-20, 40))),
    "bool for number": ({"int", "int?", "float"}, None, lambda p, h: p.choice([True, False])),
    "str for number": ({"int", "int?", "float"}, None, lambda p, h: p.choice([str(p.integer(0, 9)), "0.9", "1e-3", "inf", " 2"])),
    "non-finite": ({"bool", "int", "int?", "float"}, None, lambda p, h: p.choice([INF, -INF, NAN])),
    "None": ({"bool", "int", "float", "literal", "tuple", "pair", "group"}, None, lambda p, h: None),
    "near-miss choice": ({"literal"}, None, near_miss),
    "list for choice": ({"literal"}, None, lambda p, h: [p.choice(typing.get_args(h))]),
    "list with a bad item": ({"tuple", "pair"}, None, bad_item_list),
    "wrong length": ({"pair"}, None, lambda p, h: p.choice([[0], [0, 1, 2], ()])),
    "str for tuple": ({"tuple", "pair"}, None, lambda p, h: p.choice(["32", "0,1", ""])),
    "scalar for tuple": ({"tuple", "pair"}, None, lambda p, h: p.integer(0, 3)),
    "name for group": ({"group"}, None, lambda p, h: p.choice(["tiny", "reference", "latent", "sft_pre"])),
    "dict for group": ({"group"}, None, lambda p, h: {next(iter(FIELDS[h])): None}),
    "wrong group": ({"group"}, None, other_group),
    "bad stacked array": (
        {"float"},
        {HParams},
        lambda p, h: p.choice([np.array([1e-3, NAN]), np.array([0.1, -INF]), np.array([True, False]), np.array(["1e-3", "1e-2"]), [1e-3, None], [0.1, [0.2]]]),
    ),
    "unknown field": (None, None, None),  # a name, not a value: see `unknown_name`
}


def applies(cls_name, owner, field_kind) -> bool:
    kinds, owners, _ = INVALID[cls_name]
    return (kinds is None or field_kind in kinds) and (owners is None or owner in owners)


def unknown_name(p, owner) -> str:
    return p.choice([n for f in FIELDS[owner] for n in (f + "s", f + "_", f.upper(), "x" + f) if n not in FIELDS[owner]])


def builds(owner, field, value, unknown=False) -> list:
    """Every way to build a config holding `owner.field = value` from Python."""
    kw = {field: value}
    if owner is Config:
        return [lambda: Config(**kw), lambda: dataclasses.replace(Config(), **kw)]
    group = next(g for g, c in GROUPS.items() if c is owner)
    via_replace = lambda: Config().replace(**{group: kw})
    if owner is HParams:  # a plain NamedTuple: unknown names are caught by Config.replace, values by check_hparams
        return [via_replace] if unknown else [lambda: Config(hparams=HParams(**kw)), via_replace, lambda: check_hparams(HParams()._replace(**kw))]
    return [lambda: owner(**kw), lambda: dataclasses.replace(owner(), **kw), via_replace]


def draw_case(p):
    """(class, owner, field, value, build): one invalid config, the invalid class drawn first so every class is tried."""
    cls_name = p.choice(list(INVALID))
    owner = p.choice([o for o in OWNERS if any(applies(cls_name, o, k) for k, _ in FIELDS[o].values())])
    if cls_name == "unknown field":
        field = unknown_name(p, owner)
        return cls_name, owner, field, 1, p.choice(builds(owner, field, 1, unknown=True))
    field = p.choice([f for f, (k, _) in FIELDS[owner].items() if applies(cls_name, owner, k)])
    value = INVALID[cls_name][2](p, FIELDS[owner][field][1])
    return cls_name, owner, field, value, p.choice(builds(owner, field, value))


def rejection(owner, field, build) -> str | None:
    """None if `build` raises a one-line ValueError starting ``Owner.field=``; else what went wrong."""
    try:
        build()
    except ValueError as e:
        msg = str(e)
        if msg.startswith(f"{owner.__name__}.{field}=") and " is invalid: " in msg and "\n" not in msg:
            return None
        return f"wrong message: {msg!r}"
    except Exception as e:  # any other exception is the failure being reported
        return f"{type(e).__name__}: {e}"
    return "no error"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_invalid_value_of_any_class_is_rejected_naming_the_field(data):
    cls_name, owner, field, value, build = draw_case(HypothesisPick(data))
    problem = rejection(owner, field, build)
    assert problem is None, f"{cls_name}: {owner.__name__}.{field}={value!r}: {problem}"


def test_200_seeded_invalid_configs_all_rejected():
    """The review's experiment, rerun: 200 random invalid configs built in Python (61 were accepted or failed elsewhere)."""
    p = NumpyPick(np.random.default_rng(0))
    cases = [draw_case(p) for _ in range(200)]
    failures = [f"{c}: {o.__name__}.{f}={v!r}: {problem}" for c, o, f, v, b in cases if (problem := rejection(o, f, b))]
    assert not failures, f"{len(failures)}/200 invalid configs not rejected:\n" + "\n".join(failures)
    assert {c for c, *_ in cases} == set(INVALID)  # every invalid class was drawn


def test_every_field_rejects_every_applicable_class_every_way():
    p = NumpyPick(np.random.default_rng(1))
    failures, n = [], 0
    for owner in OWNERS:
        for field, (field_kind, hint) in FIELDS[owner].items():
            for cls_name, (_, _, gen) in INVALID.items():
                if gen is None or not applies(cls_name, owner, field_kind):
                    continue
                value = gen(p, hint)
                for build in builds(owner, field, value):
                    n += 1
                    if problem := rejection(owner, field, build):
                        failures.append(f"{cls_name}: {owner.__name__}.{field}={value!r}: {problem}")
        name = unknown_name(p, owner)
        for build in builds(owner, name, 1, unknown=True):
            n += 1
            if problem := rejection(owner, name, build):
                failures.append(f"unknown field: {owner.__name__}.{name}: {problem}")
    assert n > 500
    assert not failures, "\n".join(failures)


# The review's examples, each with the message that replaces the late failure.
REVIEW = [
    (lambda: ModelConfig(layer_norm="no"), "ModelConfig.layer_norm='no' is invalid: use True or False"),
    (lambda: SafetyConfig(rl_reasoning_grad="false"), "SafetyConfig.rl_reasoning_grad='false' is invalid: use True or False"),
    (lambda: TaskConfig(trigger=1.5), "TaskConfig.trigger=1.5 is invalid: use an integer"),
    (lambda: TaskConfig(trigger=2.0), "TaskConfig.trigger=2.0 is invalid: use the integer 2"),
    (lambda: TaskConfig(cue_weights=(1.5, 2.5)), "TaskConfig.cue_weights=(1.5, 2.5) is invalid: use a tuple of integers"),
    (lambda: TaskConfig(cue_weights=[3, 2.0]), "TaskConfig.cue_weights=[3, 2.0] is invalid: use a tuple of integers"),
    (lambda: TaskConfig(conjunction=[0, 1, 2]), "TaskConfig.conjunction=[0, 1, 2] is invalid: use a tuple of 2 integers"),
    (lambda: TrainConfig(b1="0.9"), "TrainConfig.b1='0.9' is invalid: use a number"),
    (lambda: Config(hparams=HParams(lr="1e-3")), "HParams.lr='1e-3' is invalid: use a float"),
    (lambda: SafetyConfig(temperature=float("inf")), "SafetyConfig.temperature=inf is invalid: use a finite number"),
    (lambda: SafetyConfig(kl=float("inf")), "SafetyConfig.kl=inf is invalid: use a finite number"),
    (lambda: SafetyConfig(temperature=0.0), "SafetyConfig.temperature=0.0 is invalid: use a positive temperature"),
    (lambda: TrainConfig(grad_clip=float("nan")), "TrainConfig.grad_clip=nan is invalid: use a finite number"),
    (
        lambda: Config(model="tiny"),
        "Config.model='tiny' is invalid: give a ModelConfig, not a str; e.g. toymesa.presets.tiny(); model size names are for specs",
    ),
    (lambda: Config(task={"rule": "latent"}), "Config.task={'rule': 'latent'} is invalid: give a TaskConfig, not a dict"),
    (lambda: Config().replace(task=dict(nope=1)), "TaskConfig.nope=1 is invalid: unknown field; TaskConfig fields are"),
    (lambda: Config().replace(hparams=dict(nope=1)), "HParams.nope=1 is invalid: unknown field"),
    (lambda: Config().replace(nope=dict(rule="latent")), "Config.nope={'rule': 'latent'} is invalid: unknown field"),
    (lambda: Config().replace(task="latent"), "Config.task='latent' is invalid: give a dict of TaskConfig fields to change, or a whole TaskConfig"),
    (lambda: dataclasses.replace(TaskConfig(), nope=1), "TaskConfig.nope=1 is invalid: unknown field"),
]


@pytest.mark.parametrize(("build", "start"), REVIEW, ids=[s.split(" is")[0] for _, s in REVIEW])
def test_review_examples(build, start):
    with pytest.raises(ValueError) as e:
        build()
    assert str(e.value).startswith(start), str(e.value)


def test_unknown_field_is_also_a_type_error():
    """Unknown keywords raised TypeError before; callers catching that still work."""
    with pytest.raises(TypeError, match=r"^ModelConfig\.n_layer=2 is invalid: unknown field"):
        ModelConfig(n_layer=2)
    assert issubclass(UnknownFieldError, ValueError)


# ------------------------------------------------------------------ valid values still construct
def numpy_form(value):
    """A NumPy-typed (or list) spelling of a valid default value."""
    if value is None:  # an unset T | None field
        return None
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, str):
        return np.str_(value)
    return [np.int32(v) for v in value]  # a tuple of ints


@pytest.mark.parametrize("owner", [ModelConfig, TaskConfig, TrainConfig, SafetyConfig])
def test_numpy_scalars_and_lists_construct_the_canonical_config(owner):
    """Every field given as a NumPy scalar (tuples as lists of NumPy ints) builds the default
    config, stored as Python scalars and tuples: equal, and with the same repr (which names sweep cells)."""
    default = owner()
    given = owner(**{f.name: numpy_form(getattr(default, f.name)) for f in dataclasses.fields(owner)})
    assert given == default and repr(given) == repr(default) and hash(given) == hash(default)
    assert all(type(getattr(given, f.name)) is type(getattr(default, f.name)) for f in dataclasses.fields(owner))


def test_other_valid_spellings():
    task = TaskConfig(rule="latent", cue_weights=[3, 2, -1], conjunction=[2, 5])
    assert task == TaskConfig(rule="latent", cue_weights=(3, 2, -1), conjunction=(2, 5))
    assert TrainConfig(grad_clip=2, end_lr_fraction=0) == TrainConfig(grad_clip=2.0, end_lr_fraction=0.0)  # ints stay ints; equal
    assert ModelConfig(layer_norm=np.True_) == ModelConfig()
    cfg = Config().replace(model=ModelConfig(n_layers=3), task=dict(cue_weights=[1, 2]))  # a whole group, and a list
    assert cfg.model.n_layers == 3 and cfg.task.cue_weights == (1, 2)


@pytest.mark.parametrize(
    "stacked",
    [
        np.full(4, 1e-3),
        np.full(4, 1e-3, np.float32),
        jnp.asarray(np.full(4, 1e-3, np.float32)),  # a transfer, no compile
        jnp.asarray(np.full(4, 1e-3).astype(jnp.bfloat16)),
        [1e-3, 2e-3, 3e-3, 4e-3],
        np.arange(4),  # integer learning rates are odd but valid numbers
    ],
    ids=["float64", "float32", "jax_float32", "jax_bfloat16", "list", "int64"],
)
def test_check_hparams_accepts_stacked_arrays(stacked):
    hp = HParams(lr=stacked, weight_decay=np.zeros(4), trigger_rate=np.full(4, 0.5), safety_lr=np.float32(3e-4))
    assert check_hparams(hp) is hp
    assert check_hparams(HParams(lr=np.float64(1e-3), weight_decay=0, trigger_rate=1)) == (1e-3, 0, 1, HParams().safety_lr)
