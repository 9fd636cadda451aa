"""Config validation: every invalid config raises ValueError naming the field and the bad value.

Also checks that the named factories build valid configs and that nested `Config.replace` works.
No JAX compiles here, so hypothesis may draw static fields (n_ctx, d_model, ...) freely.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from toymesa import config as C
from toymesa import presets as P
from toymesa import train
from toymesa.config import Config, HParams, ModelConfig, TaskConfig, TrainConfig


def assert_names(excinfo, field, value):
    """The message names the field and the bad value, in the library's `Owner.field=value` form."""
    msg = str(excinfo.value)
    assert f"{field}={value!r}" in msg, msg


def raises_naming(field, value, build):
    with pytest.raises(ValueError) as excinfo:
        build()
    assert_names(excinfo, field, value)


# ------------------------------------------------------------------ ModelConfig
@given(n_heads=st.integers(2, 64), q=st.integers(0, 16), data=st.data())
def test_d_model_not_divisible_by_n_heads(n_heads, q, data):
    r = data.draw(st.integers(1, n_heads - 1), label="remainder")
    d_model = n_heads * q + r
    raises_naming("d_model", d_model, lambda: ModelConfig(d_model=d_model, n_heads=n_heads))


@given(n_heads=st.integers(1, 16), q=st.integers(1, 16))
def test_d_model_divisible_by_n_heads_is_accepted(n_heads, q):
    m = ModelConfig(d_model=n_heads * q, n_heads=n_heads)
    assert m.d_head * m.n_heads == m.d_model


@pytest.mark.parametrize("name", ["n_layers", "d_model", "n_heads", "d_mlp"])
@given(value=st.integers(-5, 0))
def test_model_sizes_must_be_positive(name, value):
    raises_naming(name, value, lambda: ModelConfig(**{name: value}))


# ------------------------------------------------------------------ TaskConfig
@given(n_trigger_tokens=st.integers(1, 32), over=st.integers(0, 100))
def test_trigger_outside_vocabulary(n_trigger_tokens, over):
    bad = n_trigger_tokens + over
    raises_naming("trigger", bad, lambda: TaskConfig(trigger=bad, n_trigger_tokens=n_trigger_tokens))


@given(bad=st.integers(-100, -1))
def test_negative_trigger(bad):
    raises_naming("trigger", bad, lambda: TaskConfig(trigger=bad))


def expected_min_seq_len(reasoning, n_ctx, n_content):
    """Independent count: BOS ctx content SEP | THINK evidence[n_ctx] decision END_THINK | ANS answer EOS."""
    prompt = 1 + n_ctx + n_content + 1
    think = n_ctx + 3 if reasoning in ("cot", "neutral_cot") else 0
    return prompt + think + 3


@pytest.mark.parametrize("reasoning", C.REASONING)
@given(n_ctx=st.integers(2, 8), n_content=st.integers(1, 4))
def test_seq_len_minimum(reasoning, n_ctx, n_content):
    need = expected_min_seq_len(reasoning, n_ctx, n_content)
    ok = TaskConfig(reasoning=reasoning, n_ctx=n_ctx, n_content=n_content, seq_len=need)
    assert ok.min_seq_len == need
    raises_naming("seq_len", need - 1, lambda: TaskConfig(reasoning=reasoning, n_ctx=n_ctx, n_content=n_content, seq_len=need - 1))


@given(k=st.integers(17, 64))
def test_more_k_triggers_than_trigger_tokens(k):
    raises_naming("k", k, lambda: TaskConfig(rule="k_triggers", k=k, n_trigger_tokens=16))


@pytest.mark.parametrize("rule", C.RULES)
def test_another_rules_fields_never_invalidate_a_config(rule):
    """A rule's own settings (trigger, trigger_slot, k, conjunction) are checked only under that
    rule: with 2 trigger tokens, k = 4 (the default) must not block a single-trigger world."""
    own = {"single": {"trigger", "trigger_slot"}, "k_triggers": {"k"}, "conjunction": {"conjunction"}, "latent": set()}[rule]
    others = {"trigger": 7, "trigger_slot": 9, "k": 9, "conjunction": (5, 5)}
    kw = {f: v for f, v in others.items() if f not in own}
    task = TaskConfig(rule=rule, n_trigger_tokens=2, trigger_position="fixed", **kw, **({"k": 2} if rule == "k_triggers" else {}))
    assert task.rule == rule
    for field in own:  # and its own are still checked
        with pytest.raises(ValueError, match=f"TaskConfig.{field}="):
            TaskConfig(rule=rule, n_trigger_tokens=2, trigger_position="fixed", **{field: others[field]})


def test_k_equal_to_trigger_tokens_is_accepted():
    assert TaskConfig(rule="k_triggers", k=16, n_trigger_tokens=16).k == 16
    raises_naming("k", 17, lambda: TaskConfig(rule="k_triggers", k=17, n_trigger_tokens=16))
    raises_naming("k", 0, lambda: TaskConfig(rule="k_triggers", k=0))


names = st.text(min_size=0, max_size=12)


@given(name=names)
def test_unknown_rule(name):
    assume(name not in C.RULES)
    raises_naming("rule", name, lambda: TaskConfig(rule=name))


@given(name=names)
def test_unknown_reasoning(name):
    assume(name not in C.REASONING)
    raises_naming("reasoning", name, lambda: TaskConfig(reasoning=name))


def evidence_range(weights, n_ctx):
    """Reachable summed evidence: every slot holds a cue or a distractor (weight 0)."""
    return n_ctx * min(min(weights), 0), n_ctx * max(max(weights), 0)


weights = st.lists(st.integers(C.EVIDENCE_MIN, C.EVIDENCE_MAX), min_size=1, max_size=8).map(tuple)


@given(w=weights, n_ctx=st.integers(1, 6), data=st.data())
def test_latent_threshold_outside_reachable_range(w, n_ctx, data):
    lo, hi = evidence_range(w, n_ctx)
    bad = data.draw(st.one_of(st.integers(lo - 50, lo), st.integers(hi + 1, hi + 50)), label="threshold")
    raises_naming("latent_threshold", bad, lambda: TaskConfig(rule="latent", cue_weights=w, n_ctx=n_ctx, latent_threshold=bad))


@given(w=weights, n_ctx=st.integers(1, 6), data=st.data())
def test_latent_threshold_inside_range_is_accepted(w, n_ctx, data):
    lo, hi = evidence_range(w, n_ctx)
    assume(lo < hi)
    thr = data.draw(st.integers(lo + 1, hi), label="threshold")
    task = TaskConfig(rule="latent", cue_weights=w, n_ctx=n_ctx, latent_threshold=thr)
    # both labels are reachable: all slots at the max weight fire, all at the min do not
    assert n_ctx * max(max(w), 0) >= task.latent_threshold > n_ctx * min(min(w), 0)


# A table of the remaining checks: (class, kwargs, field, bad value).
INVALID = [
    (TaskConfig, dict(helpful="sum"), "helpful", "sum"),
    (TaskConfig, dict(defect="loud"), "defect", "loud"),
    (TaskConfig, dict(trigger_position="middle"), "trigger_position", "middle"),
    (TaskConfig, dict(modulus=1), "modulus", 1),
    (TaskConfig, dict(n_content=2, copy_k=2), "copy_k", 2),
    (TaskConfig, dict(copy_k=-1), "copy_k", -1),
    (TaskConfig, dict(n_ctx=4, trigger_position="fixed", trigger_slot=4), "trigger_slot", 4),
    (TaskConfig, dict(rule="conjunction", conjunction=(3, 3)), "conjunction", (3, 3)),
    (TaskConfig, dict(rule="conjunction", conjunction=(0, 16)), "conjunction", (0, 16)),
    (TaskConfig, dict(rule="conjunction", n_ctx=1, seq_len=40), "n_ctx", 1),
    (TaskConfig, dict(cue_weights=(1, C.EVIDENCE_MAX + 1)), "cue_weights", (1, C.EVIDENCE_MAX + 1)),
    (TaskConfig, dict(cue_weights=()), "cue_weights", ()),
    (TaskConfig, dict(n_distractors=0), "n_distractors", 0),
    (TrainConfig, dict(batch_size=0), "batch_size", 0),
    (TrainConfig, dict(steps=10, warmup_steps=10), "warmup_steps", 10),
    (TrainConfig, dict(end_lr_fraction=1.5), "end_lr_fraction", 1.5),
    (TrainConfig, dict(b1=1.0), "b1", 1.0),
    (TrainConfig, dict(b2=-0.1), "b2", -0.1),
    (TrainConfig, dict(grad_clip=0.0), "grad_clip", 0.0),
    # types (toymesa.checks; tests/test_config_fuzz.py fuzzes every kind)
    (TaskConfig, dict(conjunction=(0, 1, 2)), "conjunction", (0, 1, 2)),
    (TaskConfig, dict(trigger=1.0), "trigger", 1.0),
    (ModelConfig, dict(layer_norm="no"), "layer_norm", "no"),
    (C.SafetyConfig, dict(temperature=float("inf")), "temperature", float("inf")),
    (C.SafetyConfig, dict(kl=-0.5), "kl", -0.5),
]


@pytest.mark.parametrize(("cls", "kwargs", "field", "value"), INVALID, ids=[f"{c.__name__}.{f}={v!r}" for c, _, f, v in INVALID])
def test_other_invalid_fields(cls, kwargs, field, value):
    raises_naming(field, value, lambda: cls(**kwargs))


# ------------------------------------------------------------------ HParams
# magnitudes >= 1e-6 so the float32 stacking of `stack_hparams` cannot round them to -0.0
finite_negative = st.floats(-1e6, -1e-6)
outside_unit = st.one_of(st.floats(-1e6, -1e-6), st.floats(1, 1e6, exclude_min=True))


@given(lr=finite_negative)
def test_negative_learning_rate(lr):
    raises_naming("lr", lr, lambda: Config(hparams=HParams(lr=lr)))
    raises_naming("lr", lr, lambda: Config().replace(hparams=dict(lr=lr)))


@given(wd=finite_negative)
def test_negative_weight_decay(wd):
    raises_naming("weight_decay", wd, lambda: Config(hparams=HParams(weight_decay=wd)))


@given(rate=outside_unit)
def test_trigger_rate_outside_unit_interval(rate):
    raises_naming("trigger_rate", rate, lambda: Config(hparams=HParams(trigger_rate=rate)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_learning_rate(bad):
    with pytest.raises(ValueError, match="lr="):
        Config(hparams=HParams(lr=bad))


@given(lr=finite_negative, position=st.integers(0, 3))
def test_stacked_hparams_with_one_negative_lr(tiny_cfg, lr, position):
    lrs = np.full(4, 1e-3)
    lrs[position] = lr
    shown = float(lr)  # checked before rounding to float32, so the message shows the value given
    raises_naming("lr", shown, lambda: train.stack_hparams(tiny_cfg, 4, lr=lrs))
    hp = HParams(lr=lrs, weight_decay=np.zeros(4), trigger_rate=np.full(4, 0.5))
    raises_naming("lr", shown, lambda: train.population(tiny_cfg, np.arange(4), hp))


def test_population_hparams_shape_must_match_seeds(tiny_cfg):
    hp = HParams(lr=np.full(3, 1e-3), weight_decay=np.zeros(3), trigger_rate=np.full(3, 0.5))
    with pytest.raises(ValueError, match="hparams.lr"):
        train.population(tiny_cfg, np.arange(4), hp)


# ------------------------------------------------------------------ factories and replace
@pytest.mark.parametrize("name", sorted(P.MODEL_SIZES))
def test_model_factories(name):
    m = P.MODEL_SIZES[name]()
    assert isinstance(m, ModelConfig)
    assert m.d_model % m.n_heads == 0
    assert dataclasses.replace(m) == m  # revalidates


@pytest.mark.parametrize(
    ("factory", "rule"),
    [(P.single_backdoor, "single"), (P.k_triggers, "k_triggers"), (P.conjunction, "conjunction"), (P.latent_goal, "latent")],
)
def test_task_factories(factory, rule):
    t = factory()
    assert isinstance(t, TaskConfig) and t.rule == rule
    assert t.seq_len >= t.min_seq_len
    t2 = factory(reasoning="cot", seq_len=40)
    assert (t2.rule, t2.reasoning, t2.seq_len) == (rule, "cot", 40)


def test_k_triggers_factory_sets_k():
    assert P.k_triggers(3).k == 3
    assert P.k_triggers(k=7).k == 7


@pytest.mark.parametrize("rule", C.RULES)
@pytest.mark.parametrize("reasoning", C.REASONING)
def test_demo_config(rule, reasoning):
    cfg = P.demo_config(rule, reasoning)
    assert isinstance(cfg, Config)
    assert (cfg.task.rule, cfg.task.reasoning) == (rule, reasoning)
    assert cfg.task.seq_len >= cfg.task.min_seq_len
    assert cfg.model == P.reference()


def test_config_replace():
    base = Config()
    cfg = base.replace(task=dict(rule="latent"))
    assert cfg.task.rule == "latent"
    assert dataclasses.replace(cfg.task, rule=base.task.rule) == base.task  # nothing else changed
    assert (cfg.model, cfg.train, cfg.hparams) == (base.model, base.train, base.hparams)
    cfg = base.replace(hparams=dict(lr=1e-4), model=dict(n_layers=3))
    assert cfg.hparams.lr == 1e-4 and cfg.hparams.weight_decay == base.hparams.weight_decay and cfg.model.n_layers == 3
    raises_naming("rule", "nope", lambda: base.replace(task=dict(rule="nope")))


# ---------------------------------------------------------------- defaults that follow other fields
@given(steps=st.integers(1, 100_000))
def test_unset_warmup_follows_the_steps(steps):
    """A short run needs no warmup setting: the default is 10% of the steps, never >= steps."""
    tc = TrainConfig(steps=steps)
    assert tc.warmup_steps is None and tc.warmup == steps // 10 and 0 <= tc.warmup < steps
    assert Config().replace(train=dict(steps=steps)).train.warmup == steps // 10


def test_default_warmup_is_unchanged_for_the_default_steps():
    """500 steps keep the 50-step warmup the schedule always had."""
    assert TrainConfig().warmup == 50


def test_a_set_warmup_is_kept_and_checked():
    assert TrainConfig(steps=300, warmup_steps=30).warmup == 30
    with pytest.raises(ValueError, match="warmup_steps=300 is invalid.*leave it unset"):
        TrainConfig(steps=300, warmup_steps=300)
    with pytest.raises(ValueError, match=r"warmup_steps=2\.5 is invalid"):
        TrainConfig(steps=300, warmup_steps=2.5)


def test_the_schedule_uses_the_effective_warmup():
    """lr at step 0 is 0 (warmup), and the peak is reached at 10% of the steps."""
    cfg = Config(model=P.tiny(), train=TrainConfig(steps=40))
    sched = train.lr_unit(cfg.train)
    assert float(sched(0)) == 0.0 and float(sched(4)) == pytest.approx(1.0)


def test_a_short_spec_runs_and_a_base_error_names_the_base():
    """train.steps = 50 was refused because of a default the user never set (warmup 50), and
    the error named the first grid cell; now it is valid, and a base error says "base"."""
    from toymesa import spec

    raw = {"base": {"model": "tiny", "train": {"steps": 50}}, "grid": {"task": {"rule": ["single", "latent"]}}}
    assert all(c.config.train.warmup == 5 for c in spec.parse(raw).cells())
    raw["base"]["train"]["warmup_steps"] = 60
    with pytest.raises(spec.SpecError, match=r"base \(every cell inherits it\): TrainConfig.warmup_steps=60"):
        spec.parse(raw)
    # a cell's own value at fault is named as that cell
    raw = {"base": {"model": "tiny", "train": {"steps": 50}}, "grid": {"train": {"warmup_steps": [5, 50]}}}
    with pytest.raises(spec.SpecError, match=r"cell \(train.warmup_steps=50\)"):
        spec.parse(raw)


def test_config_alone_validates_safety_data_against_its_world():
    """`toymesa.config` imports nothing from `toymesa.tasks` (which builds on it), yet refuses at
    construction safety data the world cannot give: a fresh interpreter that imports only config."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from toymesa.config import Config, SafetyConfig\n"
        "for s in (SafetyConfig(method='sft_pre', feature_rate=1.0), SafetyConfig(method='sft_pre', coverage=0.5)):\n"
        "    try:\n"
        "        Config(safety=s)\n"
        "    except ValueError as e:\n"
        "        print(e)\n"
        "print(sorted(m for m in sys.modules if m.startswith('toymesa.tasks')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("SafetyConfig.feature_rate=1.0 is invalid: no non-firing context of rule 'single'"), out
    assert out[1].startswith("SafetyConfig.coverage=0.5 is invalid: partial coverage needs a rule with many activating contexts"), out
    assert out[2] == "[]", out
