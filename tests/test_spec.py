"""Sweep specs (`toymesa.spec`): TOML or dict -> validated `Spec` -> `Cell`s.

Bad specs fail with a one-line `SpecError` (``source: key: problem``) naming the offending key;
valid specs expand to exactly the cells they claim, with the configs their values resolve to.
Pure Python: nothing is trained or compiled here, so hypothesis may draw any values.
"""

import collections
import copy
import itertools
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from toymesa import config as C
from toymesa import demo, spec
from toymesa.config import REASONING, RULES, Config, HParams, TaskConfig, TrainConfig
from toymesa.presets import MODEL_SIZES, demo_config
from toymesa.spec import SpecError

ROOT = Path(__file__).resolve().parent.parent
SRC = "t.toml"
COT = ("cot", "neutral_cot")


def parse(raw: dict) -> spec.Spec:
    return spec.parse(raw, source=SRC)


def error(raw: dict) -> str:
    """The SpecError message of an invalid spec, checked to be one line from this source."""
    with pytest.raises(SpecError) as excinfo:
        parse(raw)
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{SRC}: "), msg
    return msg


def assert_fails(raw: dict, key: str, *fragments: str) -> str:
    """Invalid spec: one line ``t.toml: KEY: problem`` that contains every fragment."""
    msg = error(raw)
    assert msg.startswith(f"{SRC}: {key}: "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def min_seq_len(reasoning: str, n_ctx: int = 4, n_content: int = 2) -> int:
    """Known answer: BOS ctx content SEP, the think block (THINK, one token per slot, decision, END) for cot formats, then ANS answer EOS."""
    return (1 + n_ctx + n_content + 1) + (n_ctx + 3 if reasoning in COT else 0) + 3


# ======================================================================== bad specs
def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)
    with pytest.raises(ValueError):
        parse({"grdi": {}})


def test_unknown_top_level_key():
    assert_fails({"grdi": {"task": {"rule": ["latent"]}}}, "grdi", "unknown key")


def test_unknown_group_under_base():
    assert_fails({"base": {"taks": {"rule": "latent"}}}, "base.taks", "unknown group")


def test_unknown_group_under_grid():
    assert_fails({"grid": {"optim": {"lr": [1e-2]}}}, "grid.optim", "unknown group")


def test_unknown_field_in_base():
    assert_fails({"base": {"task": {"rulee": "latent"}}}, "base.task.rulee", "unknown field task.rulee")


def test_unknown_field_in_grid():
    assert_fails({"grid": {"task": {"rulee": ["latent"]}}}, "grid.task.rulee", "unknown field task.rulee")


def test_group_that_is_not_a_table():
    assert_fails({"base": {"task": "latent"}}, "base.task", "must be a table")


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("base", "train.steps", "many"),
        ("base", "train.steps", 300.0),
        ("base", "train.steps", True),  # bool is not an int here
        ("base", "model.layer_norm", 1),  # nor an int a bool
        ("base", "task.rule", 3),
        ("base", "task.seq_len", "max"),
        ("base", "task.cue_weights", [1.5, 2]),
        ("base", "hparams.lr", True),
        ("grid", "hparams.lr", "fast"),
        ("grid", "train.batch_size", True),
        ("grid", "model.attn_only", 0),
    ],
)
def test_wrong_type_names_the_key_and_value(where, key, value):
    group, field = key.split(".")
    raw = {where: {group: {field: [value] if where == "grid" else value}}}
    assert_fails(raw, f"{where}.{key}", "wrong type", repr(value))


def test_unknown_model_size():
    assert_fails({"base": {"model": "huge"}}, "base.model", "'huge'", "tiny")
    assert_fails({"grid": {"model": ["tiny", "huge"]}}, "grid.model", "'huge'")


def test_empty_grid_axis():
    assert_fails({"grid": {"task": {"rule": []}}}, "grid.task.rule", "empty")


def test_grid_axis_that_is_not_a_list():
    assert_fails({"grid": {"task": {"rule": "latent"}}}, "grid.task.rule", "list")


@pytest.mark.parametrize("grid", [{}, {"task": {}}], ids=["empty", "empty-group"])
def test_grid_table_without_axes(grid):
    assert_fails({"grid": grid}, "grid", "no axes")


@pytest.mark.parametrize(
    "key, values",
    [
        ("task.rule", ["single", "latent", "single"]),
        ("hparams.lr", [1e-3, 3e-3, 0.001]),
        ("hparams.lr", [3, 3.0]),  # ints are normalised to floats on float fields first
    ],
)
def test_duplicate_axis_value(key, values):
    group, field = key.split(".")
    assert_fails({"grid": {group: {field: values}}}, f"grid.{key}", "more than once")


@pytest.mark.parametrize(
    "key, base, values",
    [
        ("task.rule", "latent", ["latent"]),
        ("hparams.lr", 3e-3, [0.003]),
        ("train.steps", 100, [100]),
    ],
)
def test_axis_whose_every_value_equals_the_base_changes_nothing(key, base, values):
    group, field = key.split(".")
    assert_fails({"base": {group: {field: base}}, "grid": {group: {field: values}}}, f"grid.{key}", "changes nothing")


def test_model_axis_equal_to_base_model_changes_nothing():
    assert_fails({"base": {"model": "tiny"}, "grid": {"model": ["tiny"]}}, "grid.model", "changes nothing")


def test_axis_equal_to_the_default_changes_nothing():
    assert_fails({"grid": {"task": {"rule": ["single"]}}}, "grid.task.rule", "changes nothing")


@pytest.mark.parametrize(
    "key, value, build, names",
    [
        ("task.rule", "sinlge", lambda: TaskConfig(rule="sinlge"), "TaskConfig.rule='sinlge'"),
        ("model.n_heads", 3, lambda: C.ModelConfig(n_heads=3), "ModelConfig.d_model=64"),
        ("train.warmup_steps", 500, lambda: TrainConfig(warmup_steps=500), "TrainConfig.warmup_steps=500"),
        ("hparams.lr", -1.0, lambda: C.check_hparams(HParams(lr=-1.0)), "HParams.lr=-1.0"),
    ],
)
def test_axis_value_the_config_rejects(key, value, build, names):
    with pytest.raises(ValueError) as config_error:
        build()
    config_msg = str(config_error.value)
    assert names in config_msg  # the config's own message names its field
    group, field = key.split(".")
    msg = error({"grid": {group: {field: [value]}}})
    assert msg.startswith(f"{SRC}: cell ({key}={value!r}): "), msg
    assert config_msg in msg, msg


def test_base_value_the_config_rejects():
    msg = error({"base": {"train": {"steps": 40, "warmup_steps": 50}}})
    assert msg.startswith(f"{SRC}: base (every cell inherits it): "), msg
    assert "TrainConfig.warmup_steps=50" in msg, msg


def test_cells_that_resolve_to_the_same_config():
    # the default format's minimum length is 11, so both values give the same config
    assert min_seq_len("none") == TaskConfig().min_seq_len == 11
    msg = error({"grid": {"task": {"seq_len": ["min", 11]}}})
    assert "same config" in msg and "task.seq_len" in msg, msg


def test_conjunction_of_the_wrong_length_names_the_field():
    msg = error({"base": {"task": {"conjunction": [0]}}})
    assert "conjunction" in msg, msg


def test_model_given_a_list_in_base():
    assert_fails({"base": {"model": ["tiny", "small"]}}, "base.model")


@pytest.mark.parametrize(
    "seeds",
    [0, -3, True, 1.5, "4", [], [0, 0], [3, 1, 3], [True], [-1], [0.0], [2**31]],
    ids=lambda s: repr(s),
)
def test_bad_seeds(seeds):
    assert_fails({"seeds": seeds}, "seeds")


@pytest.mark.parametrize(
    "run, key",
    [
        ({"evel_every": 10}, "run.evel_every"),
        ({"eval_every": 0}, "run.eval_every"),
        ({"eval_every": -5}, "run.eval_every"),
        ({"eval_every": True}, "run.eval_every"),
        ({"eval_every": 1.5}, "run.eval_every"),
        ({"eval_prompts": 0}, "run.eval_prompts"),
        ({"eval_prompts": True}, "run.eval_prompts"),
        ({"chunk_members": "64"}, "run.chunk_members"),
        ({"save_params": 1}, "run.save_params"),
        ({"save_params": "yes"}, "run.save_params"),
        (3, "run"),
    ],
    ids=lambda x: repr(x) if isinstance(x, dict | int) else None,
)
def test_bad_run(run, key):
    assert_fails({"run": run}, key)


def _random(**kw):
    """A [random] table: n = 2, seed = 0, plus the given entries (``group__field=dist``)."""
    table = {"n": 2, "seed": 0}
    for name, value in kw.items():
        if "__" in name:
            group, field = name.split("__")
            table.setdefault(group, {})[field] = value
        else:
            table[name] = value
    return table


@pytest.mark.parametrize(
    "random, key, fragment",
    [
        (_random(hparams__lr={"normal": [0.0, 1.0]}), "random.hparams.lr", "distribution"),
        (_random(hparams__lr={"log_uniform": [0.0, 1e-2]}), "random.hparams.lr", "low > 0"),
        (_random(hparams__lr={"log_uniform": [-1e-3, 1e-2]}), "random.hparams.lr", "low > 0"),
        (_random(hparams__lr={"uniform": [1e-2, 1e-3]}), "random.hparams.lr", "low < high"),
        (_random(hparams__lr={"uniform": [1e-3, 1e-3]}), "random.hparams.lr", "low < high"),
        (_random(hparams__lr={"uniform": [1e-3]}), "random.hparams.lr", "[low, high]"),
        (_random(hparams__lr={"uniform": [1e-3, 1e-2], "choice": [1e-3, 1e-2]}), "random.hparams.lr", "one distribution"),
        (_random(train__steps={"uniform": [10, 20]}), "random.train.steps", "not a float field"),
        (_random(train__steps={"log_uniform": [10, 20]}), "random.train.steps", "not a float field"),
        (_random(hparams__lr={"choice": [1e-3]}), "random.hparams.lr", "at least 2"),
        (_random(task__rule={"choice": ["single", 3]}), "random.task.rule", "wrong type"),
        (_random(task__rulee={"choice": ["single", "latent"]}), "random.task.rulee", "unknown field"),
        (_random(model__n_layers={"choice": [1, 2]}), "random.model", "unknown group"),
        (_random(optim__lr={"uniform": [0.1, 0.2]}), "random.optim", "unknown group"),
        (_random(n=0, hparams__lr={"uniform": [0.1, 0.2]}), "random.n", ">= 1"),
        (_random(n=True, hparams__lr={"uniform": [0.1, 0.2]}), "random.n", ">= 1"),
        ({"hparams": {"lr": {"uniform": [0.1, 0.2]}}}, "random.n", ">= 1"),
        (_random(seed="0", hparams__lr={"uniform": [0.1, 0.2]}), "random.seed", "int"),
        (_random(seed=True, hparams__lr={"uniform": [0.1, 0.2]}), "random.seed", "int"),
        (_random(), "random", "no axes"),
        (3, "random", "table"),
    ],
    ids=lambda x: None if isinstance(x, dict | int) else x,
)
def test_bad_random(random, key, fragment):
    assert_fails({"random": random}, key, fragment)


def test_random_axis_duplicating_a_grid_axis():
    raw = {"grid": {"hparams": {"lr": [1e-4, 1e-2]}}, "random": _random(hparams__lr={"log_uniform": [1e-4, 1e-2]})}
    assert_fails(raw, "random.hparams.lr", "grid axis")


def test_negative_random_seed():
    raw = {"random": _random(seed=-1, hparams__lr={"uniform": [1e-3, 1e-2]})}
    with pytest.raises(SpecError) as excinfo:
        parse(raw)
    assert str(excinfo.value).startswith(f"{SRC}: random.seed: ")


H = {"id": "H1", "statement": "It installs.", "prediction": "triggered_defection >= 0.9"}


@pytest.mark.parametrize(
    "hypotheses, key",
    [
        ([{"id": "H1", "statement": "It installs."}], "hypotheses[0].prediction"),
        ([{**H, "prediction": "  "}], "hypotheses[0].prediction"),
        ([{**H, "id": 1}], "hypotheses[0].id"),
        ([H, {**H, "id": "H2", "statement": ""}], "hypotheses[1].statement"),
        ([H, {**H, "prediction": "something else"}], "hypotheses[1].id"),
        ([{**H, "predicton": "typo"}], "hypotheses[0].predicton"),
        ([H, "H2"], "hypotheses[1]"),
        (H, "hypotheses"),
    ],
    ids=["missing-prediction", "blank-prediction", "int-id", "empty-statement", "duplicate-id", "unknown-key", "not-a-table", "not-an-array"],
)
def test_bad_hypotheses(hypotheses, key):
    assert_fails({"hypotheses": hypotheses}, key)


def test_duplicate_hypothesis_id_is_named():
    assert_fails({"hypotheses": [H, {**H, "statement": "again"}]}, "hypotheses[1].id", "'H1'", "twice")


@pytest.mark.parametrize("raw, key", [({"name": "my sweep"}, "name"), ({"name": 3}, "name"), ({"description": 3}, "description")])
def test_bad_name_or_description(raw, key):
    assert_fails(raw, key)


# ----------------------------------------------------------------- files
def load_error(path) -> str:
    """The one-line SpecError message of loading `path`."""
    with pytest.raises(SpecError) as excinfo:
        spec.load(path)
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_load_file_that_is_not_toml(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('name = "x"\n[base\nmodel = "tiny"\n')
    assert load_error(path).startswith(f"{path}: not valid TOML")


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    msg = load_error(path)
    assert msg.startswith(f"{path}: ") and "no such spec file" in msg, msg


def test_load_a_directory(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        spec.load(tmp_path)
    (tmp_path / "spec.toml").write_text("seeds = 2\n")
    assert spec.load(tmp_path).seeds == (0, 1)  # a folder holding spec.toml loads it


def test_load_reports_errors_against_the_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[base]\ntask.rulee = "latent"\n')
    assert load_error(path).startswith(f"{path}: base.task.rulee: ")


def test_load_names_the_spec_after_its_folder_or_file(tmp_path):
    (tmp_path / "my_study").mkdir()
    (tmp_path / "my_study" / "spec.toml").write_text("seeds = 2\n")
    (tmp_path / "other.toml").write_text("seeds = 2\n")
    assert spec.load(tmp_path / "my_study" / "spec.toml").name == "my_study"
    assert spec.load(tmp_path / "other.toml").name == "other"


# ======================================================================== valid specs
BASE = {"model": "tiny", "task": {"helpful": "copy_kth", "seq_len": "min"}, "train": {"steps": 300, "warmup_steps": 30}}


def axis(values, default):
    """A non-empty list of distinct values that is not just the default (such an axis would change nothing)."""
    return st.lists(st.sampled_from(values), min_size=1, max_size=len(values), unique=True).filter(lambda xs: xs != [default])


@st.composite
def sweeps(draw):
    """A raw spec: grid task.rule x task.reasoning x hparams.lr, optionally crossed with n random weight decays."""
    rules = draw(axis(RULES, "single"), label="rules")
    reasonings = draw(axis(REASONING, "none"), label="reasonings")
    lrs = draw(axis((1e-4, 3e-4, 3e-3, 1e-2), None), label="lrs")
    n = draw(st.integers(0, 3), label="random n")
    raw = {"seeds": 2, "base": copy.deepcopy(BASE), "grid": {"task": {"rule": rules, "reasoning": reasonings}, "hparams": {"lr": lrs}}}
    if n:
        raw["random"] = {"n": n, "seed": draw(st.integers(0, 2**32 - 1)), "hparams": {"weight_decay": {"log_uniform": [1e-4, 1e-1]}}}
    return raw, rules, reasonings, lrs, n


@given(sweeps())
def test_cells_are_the_product_of_the_axes(sweep):
    raw, rules, reasonings, lrs, n = sweep
    cells = parse(raw).cells()
    draws = max(n, 1)
    assert len(cells) == len(rules) * len(reasonings) * len(lrs) * draws
    assert [c.index for c in cells] == list(range(len(cells)))
    assert len({c.id for c in cells}) == len(cells)
    combos = collections.Counter((c.values["task.rule"], c.values["task.reasoning"], c.values["hparams.lr"]) for c in cells)
    assert set(combos) == set(itertools.product(rules, reasonings, lrs))
    assert set(combos.values()) == {draws}
    for c in cells:
        assert set(c.values) == {"task.rule", "task.reasoning", "hparams.lr"} | ({"hparams.weight_decay"} if n else set())
        rule, reasoning = c.values["task.rule"], c.values["task.reasoning"]
        expected = Config(
            model=MODEL_SIZES["tiny"](),
            task=TaskConfig(helpful="copy_kth", rule=rule, reasoning=reasoning, seq_len=min_seq_len(reasoning)),
            train=TrainConfig(steps=300, warmup_steps=30),
            hparams=HParams(lr=c.values["hparams.lr"], weight_decay=c.values.get("hparams.weight_decay", HParams().weight_decay)),
        )
        assert c.config == expected
        assert c.config.task.seq_len == c.config.task.min_seq_len


@given(sweeps())
def test_groups_split_on_static_fields_only(sweep):
    raw, rules, reasonings, lrs, n = sweep
    cells = parse(raw).cells()
    groups = spec.groups(cells)
    assert sorted(c.index for g in groups for c in g) == list(range(len(cells)))  # each cell in exactly one group
    assert len(groups) == len(rules) * len(reasonings)
    statics = []
    for g in groups:
        assert len(g) == len(lrs) * max(n, 1)
        shapes = {(c.config.model, c.config.task, c.config.train) for c in g}
        assert len(shapes) == 1  # members differ only in hparams
        statics.append(shapes.pop())
    assert len(set(statics)) == len(groups)


def test_cells_differing_only_in_hparams_share_one_group():
    raw = {"grid": {"hparams": {"lr": [1e-4, 3e-3], "weight_decay": [0.0, 0.1], "trigger_rate": [0.25, 0.75]}}}
    cells = parse(raw).cells()
    assert len(cells) == 8
    assert spec.groups(cells) == [cells]


def test_model_sizes_and_model_grid():
    (cell,) = parse({"base": {"model": "tiny"}}).cells()
    assert cell.config.model == MODEL_SIZES["tiny"]()
    cells = parse({"grid": {"model": list(MODEL_SIZES), "hparams": {"lr": [1e-4, 3e-3]}}}).cells()
    assert len(cells) == 2 * len(MODEL_SIZES)
    for c in cells:
        assert c.config.model == MODEL_SIZES[c.values["model"]]()
    groups = spec.groups(cells)
    assert len(groups) == len(MODEL_SIZES)
    assert [{c.values["model"] for c in g} for g in groups] == [{m} for m in MODEL_SIZES]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("reasoning", REASONING)
@pytest.mark.parametrize("n_ctx", [4, 6])
def test_seq_len_min_is_the_formats_minimum(rule, reasoning, n_ctx):
    (cell,) = parse({"base": {"task": {"rule": rule, "reasoning": reasoning, "n_ctx": n_ctx, "seq_len": "min"}}}).cells()
    assert cell.config.task.seq_len == cell.config.task.min_seq_len == min_seq_len(reasoning, n_ctx=n_ctx)


DOTTED = """
name = "forms"
seeds = [0, 3]
[base]
model = "tiny"
task.helpful = "copy_kth"
task.seq_len = "min"
train.steps = 200
[grid]
task.rule = ["single", "latent"]
hparams.lr = [1e-3, 3e-3]
[random]
n = 2
seed = 7
hparams.weight_decay = { log_uniform = [1e-4, 1e-1] }
"""

NESTED = """
name = "forms"
seeds = [0, 3]
[base]
model = "tiny"
[base.task]
helpful = "copy_kth"
seq_len = "min"
[base.train]
steps = 200
[grid.task]
rule = ["single", "latent"]
[grid.hparams]
lr = [1e-3, 3e-3]
[random]
n = 2
seed = 7
[random.hparams.weight_decay]
log_uniform = [1e-4, 1e-1]
"""


def test_dotted_and_nested_tables_give_the_same_spec(tmp_path):
    (tmp_path / "dotted.toml").write_text(DOTTED)
    (tmp_path / "nested.toml").write_text(NESTED)
    a, b = spec.load(tmp_path / "dotted.toml"), spec.load(tmp_path / "nested.toml")
    assert a.digest == b.digest
    assert (a.base, a.grid, a.random, a.seeds) == (b.base, b.grid, b.random, b.seeds)
    assert [(c.values, c.config, c.id) for c in a.cells()] == [(c.values, c.config, c.id) for c in b.cells()]
    assert len(a.cells()) == 8
    assert a.text == DOTTED  # kept verbatim


@given(
    low=st.floats(1e-6, 1e-2),
    ratio=st.floats(1.5, 1e3),
    a=st.floats(0.0, 0.5),
    width=st.floats(0.01, 0.5),
    seed=st.integers(0, 2**32 - 1),
    other=st.integers(0, 2**32 - 1),
    n=st.integers(1, 5),
)
def test_random_draws_are_reproducible_and_in_range(low, ratio, a, width, seed, other, n):
    assume(seed != other)
    high, b = low * ratio, a + width

    def build(s):
        random = {"n": n, "seed": s, "hparams": {"lr": {"log_uniform": [low, high]}, "trigger_rate": {"uniform": [a, b]}}}
        return parse({"grid": {"task": {"rule": ["single", "latent"]}}, "random": random})

    spec_a = build(seed)
    cells = spec_a.cells()
    assert len(cells) == 2 * n
    draws = [(c.values["hparams.lr"], c.values["hparams.trigger_rate"]) for c in cells]
    for c, (lr, rate) in zip(cells, draws, strict=True):
        assert low * (1 - 1e-12) <= lr <= high * (1 + 1e-12)  # exp(log(x)) may round by an ulp
        assert a <= rate <= b
        assert (c.config.hparams.lr, c.config.hparams.trigger_rate) == (lr, rate)
    # each grid combination is crossed with the same n draws
    by_rule = {r: [d for c, d in zip(cells, draws, strict=True) if c.values["task.rule"] == r] for r in ("single", "latent")}
    assert by_rule["single"] == by_rule["latent"]
    # same seed, same draws; another seed, other draws (and another digest)
    again = build(seed)
    assert [c.values for c in again.cells()] == [c.values for c in cells] and again.digest == spec_a.digest
    other_spec = build(other)
    assert [c.values["hparams.lr"] for c in other_spec.cells()] != [lr for lr, _ in draws]
    assert other_spec.digest != spec_a.digest


@given(
    choices=st.lists(st.sampled_from(REASONING), min_size=2, unique=True),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
)
def test_choice_draws_come_from_the_list(choices, seed, n):
    random = {"n": n, "seed": seed, "task": {"reasoning": {"choice": choices}}, "hparams": {"weight_decay": {"uniform": [0.0, 0.1]}}}
    cells = parse({"base": {"task": {"seq_len": "min"}}, "random": random}).cells()
    assert len(cells) == n
    for c in cells:
        assert c.values["task.reasoning"] in choices
        assert c.config.task.reasoning == c.values["task.reasoning"]
        assert c.config.task.seq_len == min_seq_len(c.values["task.reasoning"])


def test_many_choice_draws_cover_the_list():
    random = {"n": 60, "seed": 0, "task": {"reasoning": {"choice": list(REASONING)}}, "hparams": {"weight_decay": {"uniform": [0.0, 0.1]}}}
    cells = parse({"random": random}).cells()
    assert {c.values["task.reasoning"] for c in cells} == set(REASONING)


DIGEST_BASE = {
    "name": "d",
    "description": "Prose.",
    "seeds": 4,
    "base": {"model": "tiny"},
    "grid": {"task": {"rule": ["single", "latent"]}},
    "random": {"n": 2, "seed": 0, "hparams": {"lr": {"log_uniform": [1e-4, 1e-2]}}},
    "hypotheses": [H],
}


def _with(path: str, value) -> dict:
    raw = copy.deepcopy(DIGEST_BASE)
    *parents, last = path.split("/")
    table = raw
    for p in parents:
        table = table[p]
    table[last] = value
    return raw


@pytest.mark.parametrize(
    "raw",
    [
        _with("seeds", 5),
        _with("seeds", [0, 1, 2, 4]),
        _with("grid/task/rule", ["single", "latent", "conjunction"]),
        _with("grid/task/rule", ["single", "k_triggers"]),
        _with("grid/task/reasoning", ["none", "cot"]),
        _with("base/model", "small"),
        _with("random/seed", 1),
        _with("random/n", 3),
        _with("run", {"eval_every": 10}),
    ],
    ids=["seeds-count", "seeds-list", "axis-value-added", "axis-value-changed", "axis-added", "base", "random-seed", "random-n", "run"],
)
def test_digest_changes_with_what_determines_results(raw):
    assert parse(raw).digest != parse(DIGEST_BASE).digest


@pytest.mark.parametrize(
    "raw",
    [
        _with("description", "Other prose."),
        _with("hypotheses", [{**H, "statement": "Reworded.", "prediction": "Reworded too."}]),
        _with("hypotheses", []),
        _with("seeds", [0, 1, 2, 3]),  # the same seeds as the count 4
    ],
    ids=["description", "hypothesis-prose", "no-hypotheses", "seeds-as-list"],
)
def test_digest_ignores_prose(raw):
    assert parse(raw).digest == parse(DIGEST_BASE).digest


# ======================================================================== presets with overrides
PRESET_DOTTED = """
[base]
model.size = "tiny"
model.d_model = 48
[grid]
hparams.lr = [1e-3, 3e-3]
"""

PRESET_NESTED = """
[base.model]
size = "tiny"
d_model = 48
[grid]
hparams.lr = [1e-3, 3e-3]
"""


def test_preset_with_a_field_override():
    import tomllib

    a, b = parse(tomllib.loads(PRESET_DOTTED)), parse(tomllib.loads(PRESET_NESTED))
    assert a.base == b.base == {"model": "tiny", "model.d_model": 48} and a.digest == b.digest
    for c in a.cells():
        assert c.config.model == C.ModelConfig(n_layers=1, d_model=48, n_heads=2, d_mlp=128)  # tiny, then the override
    # model.size alone is the old `model = <size>`: the same spec, digest and cells
    old, new = parse({"base": {"model": "small"}}), parse({"base": {"model": {"size": "small"}}})
    assert (old.base, old.digest, old.cells()) == (new.base, new.digest, new.cells())


def test_preset_axis_in_grid_and_arms_takes_base_overrides():
    cells = parse({"base": {"model": {"d_model": 64}}, "grid": {"model": {"size": ["tiny", "small"]}}}).cells()
    assert [c.values for c in cells] == [{"model": "tiny"}, {"model": "small"}]
    assert [c.config.model for c in cells] == [C.ModelConfig(1, 64, 2, 128), C.ModelConfig(2, 64, 4, 128)]
    arms = [{"name": "t", "model.size": "tiny", "model.d_mlp": [64, 96]}, {"name": "s", "model": {"size": "small"}}]
    cells = parse({"arms": arms}).cells()
    assert [c.values for c in cells] == [
        {"arm": "t", "model": "tiny", "model.d_mlp": 64},
        {"arm": "t", "model": "tiny", "model.d_mlp": 96},
        {"arm": "s", "model": "small"},
    ]
    assert [c.config.model.d_mlp for c in cells] == [64, 96, 128]


@pytest.mark.parametrize(
    "raw, key, fragment",
    [
        ({"base": {"model": {"size": "huge"}}}, "base.model.size", "unknown model size 'huge'"),
        ({"grid": {"model": {"size": ["tiny", "huge"]}}}, "grid.model.size", "unknown model size 'huge'"),
        ({"arms": [{"model.size": "huge"}]}, "arms[0].model.size", "unknown model size 'huge'"),
        ({"base": {"model": "tiny", "model.size": "small"}}, "base.model.size", "given twice"),
        ({"base": {"model.size": "small", "model": "tiny"}}, "base.model", "given twice"),
        ({"grid": {"model": ["tiny"], "model.size": ["small"]}}, "grid.model.size", "given twice"),
        ({"base": {"model": {"size": "tiny"}}, "grid": {"model": {"size": ["tiny"]}}}, "grid.model.size", "changes nothing"),
        ({"base": {"model": {"sise": "tiny"}}}, "base.model.sise", "(and size, the preset)"),
    ],
    ids=["base", "grid", "arms", "twice", "twice-reversed", "twice-grid", "changes-nothing", "misspelt"],
)
def test_preset_errors_name_the_key_as_written(raw, key, fragment):
    assert_fails(raw, key, fragment)


def test_an_override_a_preset_rejects_names_the_cell():
    # d_model 30 suits tiny's 2 heads but not small's 4; the base alone (reference, 4 heads)
    # fails the same way, yet the tiny cell is valid, so the small cell is at fault
    msg = error({"base": {"model": {"d_model": 30}}, "grid": {"model": {"size": ["tiny", "small"]}}})
    assert msg.startswith(f"{SRC}: cell (model='small'): ModelConfig.d_model=30 is invalid: must be divisible by n_heads=4"), msg
    msg = error({"base": {"model": {"size": "small", "d_model": 30}}})
    assert msg.startswith(f"{SRC}: base (every cell inherits it): ModelConfig.d_model=30"), msg


@given(
    size=st.sampled_from([None, *MODEL_SIZES]),
    fields=st.dictionaries(st.sampled_from(["n_layers", "d_mlp", "layer_norm"]), st.booleans(), max_size=3),
    first=st.booleans(),
)
def test_nest_round_trips_presets_and_overrides(size, fields, first):
    over = {f"model.{f}": (v if f == "layer_norm" else 1 + v) for f, v in fields.items()}
    flat = {**({"model": size} if size and first else {}), **over, "task.rule": "latent", **({"model": size} if size and not first else {})}
    assert parse({"base": spec.nest(flat)}).base == flat


def test_demo_spec_takes_model_field_overrides():
    (cell, *_) = demo.spec(base={"model.d_model": 32, "model.n_heads": 2}).cells()
    assert cell.config.model == C.ModelConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=256)  # reference, overridden


# ======================================================================== experiments
SPECS = sorted(ROOT.glob("experiments/*/spec.toml"))


def test_quickstart_spec():
    path = ROOT / "experiments" / "quickstart" / "spec.toml"
    assert path in SPECS
    s = spec.load(path)
    assert s.name == "quickstart" and s.seeds == (0, 1, 2, 3) and s.text == path.read_text()
    cells = s.cells()
    assert len(cells) == 4
    assert {(c.values["task.rule"], c.values["hparams.lr"]) for c in cells} == set(itertools.product(["single", "latent"], [1e-3, 3e-3]))
    for c in cells:
        assert c.config.model == MODEL_SIZES["tiny"]()
        assert (c.config.task.helpful, c.config.train.steps, c.config.train.warmup_steps) == ("copy_kth", 300, 30)
        assert c.config.task.seq_len == min_seq_len("none")
    assert len(spec.groups(cells)) == 2
    assert (s.run["eval_every"], s.run["eval_prompts"]) == (100, 128)
    assert [h["id"] for h in s.hypotheses] == ["H1", "H2"]


@pytest.mark.parametrize("path", SPECS, ids=[p.parent.name for p in SPECS])
def test_every_experiment_spec_loads(path):
    s = spec.load(path)
    cells = s.cells()
    assert cells and len({c.id for c in cells}) == len(cells)
    assert sum(len(g) for g in spec.groups(cells)) == len(cells)


# ======================================================================== demo
def test_demo_spec_is_the_four_demo_configs():
    s = demo.spec()
    cells = s.cells()
    assert s.name == "demo" and s.seeds == tuple(range(8))
    assert sorted((c.values["task.rule"], c.values["task.reasoning"]) for c in cells) == sorted(demo.ARMS)
    assert len(demo.ARMS) == 4
    for c in cells:
        assert c.config == demo_config(c.values["task.rule"], c.values["task.reasoning"])
    assert demo.spec(n_seeds=3).seeds == (0, 1, 2)


def test_demo_spec_with_steps_7():
    for c in demo.spec(steps=7).cells():
        assert c.config.train.steps == 7
        assert c.config.train.warmup_steps is None and 0 <= c.config.train.warmup < 7


@given(steps=st.integers(1, 5000))
def test_demo_spec_steps_override_only_the_schedule(steps):
    for c in demo.spec(steps=steps).cells():
        train = c.config.train
        assert train.steps == steps and 0 <= train.warmup < steps
        assert train.warmup == steps // 10  # the warmup follows the steps
        reference = demo_config(c.values["task.rule"], c.values["task.reasoning"])
        assert c.config.replace(train=dict(steps=reference.train.steps)) == reference


def test_a_misspelt_hypothesis_metric_and_a_non_utf8_file_are_named(tmp_path):
    import tomllib

    text = (experiment_root() / "quickstart" / "spec.toml").read_text().replace('metric = "triggered_defection"', 'metric = "triggred_defection"', 1)
    with pytest.raises(spec.SpecError, match=r"hypotheses\[0\]\.metric: 'triggred_defection' is not a metric"):
        spec.parse(tomllib.loads(text))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(spec.SpecError, match=r"latin1\.toml: not UTF-8"):
        spec.load(bad)


def experiment_root():
    from toymesa import experiment

    return experiment.EXPERIMENTS
