"""Safety training: estimators, masks, red-teaming and coverage, checked against known answers."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import safety, train
from toymesa.config import Config, SafetyConfig, TaskConfig, TrainConfig
from toymesa.model import Intervention
from toymesa.presets import tiny
from toymesa.tasks import layout, rules, vocab

SITE = "ln_final.hook_normalized"  # logits at position t depend only on this site at t


def _cfg(method="sft_pre", reasoning="cot", rule="single", **safety_kw):
    task = TaskConfig(rule=rule, reasoning=reasoning, helpful="copy_kth", k=4)
    task = dataclasses.replace(task, seq_len=task.min_seq_len)
    kw = dict(method=method, steps=3, batch_size=8, adv_candidates=48, rl_samples=4) | safety_kw
    return Config(model=tiny(), task=task, train=TrainConfig(batch_size=8, steps=6, warmup_steps=2), safety=SafetyConfig(**kw))


@pytest.fixture(scope="module")
def params():
    from toymesa import model

    return model.init_params(_cfg(), jax.random.key(0))


# ----------------------------------------------------------------- policy gradient
# A policy over two tokens from {0, 1, 2}: p(a) = softmax(th[0]), p(b | a) = softmax(th[1 + a]).
# Nine sequences: the exact gradient of E[r] is a finite sum.
REWARD = jnp.asarray([[1.0, -1.0, 0.0], [0.0, 2.0, -1.0], [0.5, 0.0, 1.0]])  # r(a, b)


def _logp(th, a, b):
    la = jax.nn.log_softmax(th[0])[a]
    lb = jnp.take_along_axis(jax.nn.log_softmax(th[1 + a], axis=-1), b[:, None], axis=-1)[:, 0]
    return jnp.stack([la, lb], axis=-1)  # [.., 2] per-token log-probabilities


def _exact_grad(th):
    seqs = jnp.asarray(list(itertools.product(range(3), range(3))))

    def value(th):
        p = jnp.exp(_logp(th, seqs[:, 0], seqs[:, 1]).sum(-1))
        return (p * REWARD[seqs[:, 0], seqs[:, 1]]).sum()

    return jax.grad(value)(th)


@jax.jit
def _estimate(th, key, baseline):
    """RLOO (groups of 4) and baseline estimates from 4096 x 4 samples, via safety's functions."""
    n, k = 4096, 4
    k1, k2 = jax.random.split(key)
    a = jax.random.categorical(k1, th[0], shape=(n * k,))
    b = jax.random.categorical(k2, th[1 + a])
    r = REWARD[a, b]
    mask = jnp.ones((n * k, 2), bool)

    def grad_of(adv):
        return jax.grad(lambda t: -safety.pg_surrogate(_logp(t, a, b), mask, adv))(th)

    return grad_of(safety.advantages(r, "rloo", k)), grad_of(safety.advantages(r, "baseline", k, baseline))


@given(st.integers(0, 2**30), st.floats(-1.0, 1.0))
def test_policy_gradient_estimates_converge_to_the_exact_gradient(seed, baseline):
    th = jax.random.normal(jax.random.key(seed), (4, 3))
    exact = _exact_grad(th)
    # average of 8 independent estimates of 16k samples each: error shrinks like 1/sqrt(n)
    ests = [_estimate(th, jax.random.key(seed + i), baseline) for i in range(8)]
    for which in (0, 1):
        est = np.mean([e[which] for e in ests], axis=0)
        np.testing.assert_allclose(est, exact, atol=0.03)
    assert np.abs(exact).max() > 0.03  # the tolerance is below the signal


def test_rloo_advantages_are_reward_minus_leave_one_out_mean():
    r = jnp.asarray([1.0, 0.0, -1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = safety.advantages(r, "rloo", 4)
    np.testing.assert_allclose(adv[:4], [1 - 0.0, 0 - 1 / 3, -1 - 2 / 3, 1 - 0.0])
    np.testing.assert_allclose(adv[4:], 0.0)
    np.testing.assert_allclose(safety.advantages(r, "baseline", 4, 0.5), r - 0.5)


# ----------------------------------------------------------------- gradient masks
@jax.jit(static_argnums=0)
def _sft_batch(cfg, params, key):
    return safety.sft_batch(cfg, safety.init(cfg, params, 0), key)[1]


def _answer_site_grad(cfg, params, batch, data_cfg=None):
    data_cfg = cfg if data_cfg is None else data_cfg
    delta = jnp.zeros((*batch.tokens.shape, cfg.model.d_model))

    def loss(d):
        return train.masked_loss(data_cfg, params, batch, interventions={SITE: Intervention(add=d)})[0]

    return np.abs(np.asarray(jax.grad(loss)(delta))).sum(axis=(0, 2))  # per position


def test_post_scratchpad_sft_leaves_reasoning_tokens_out_of_the_loss(params):
    cfg = _cfg("sft_post")
    lay = layout(cfg.task)
    batch = _sft_batch(cfg, params, jax.random.key(3))
    g = _answer_site_grad(cfg, params, batch)
    # position t predicts token t + 1: reasoning tokens (THINK .. END_THINK) are predicted at
    # prompt_len - 1 .. end_think - 1; the answer block (ANS, answer, EOS) at end_think .. length - 2
    assert np.all(g[lay.prompt_len - 1 : lay.end_think] == 0)
    assert np.all(g[lay.end_think : lay.length - 1] > 0)
    assert not batch.loss_mask[:, : lay.end_think + 1].any()
    # the reasoning is the model's own sample, not the world's: answer block is the helpful one
    np.testing.assert_array_equal(batch.tokens[:, lay.answer], batch.correct)


def test_pre_scratchpad_sft_trains_the_answer_right_after_the_prompt(params):
    cfg = _cfg("sft_pre")
    batch = _sft_batch(cfg, params, jax.random.key(4))
    data_cfg = safety.sft_batch(cfg, safety.init(cfg, params, 0), jax.random.key(4))[0]
    assert data_cfg.task.reasoning == "none"
    np.testing.assert_array_equal(batch.tokens[:, layout(data_cfg.task).answer], batch.correct)


def test_rl_can_drop_reasoning_tokens_from_the_policy_gradient(params):
    lay = layout(_cfg("rl").task)
    tokens = jax.random.randint(jax.random.key(0), (8, _cfg().task.seq_len), 0, vocab(_cfg().task).size)
    adv = jnp.linspace(-1.0, 1.0, 8)
    grads = {}
    for flag in (True, False):
        cfg = _cfg("rl", rl_reasoning_grad=flag)
        delta = jnp.zeros((*tokens.shape, cfg.model.d_model))
        f = lambda d, cfg=cfg: safety.rl_loss(cfg, params, None, tokens, adv, interventions={SITE: Intervention(add=d)})[0]  # noqa: E731
        grads[flag] = np.abs(np.asarray(jax.grad(f)(delta))).sum(axis=(0, 2))
    think = slice(lay.prompt_len, lay.end_think)  # positions predicting the sampled reasoning .. END_THINK
    assert np.all(grads[False][think] == 0) and np.all(grads[True][think] > 0)
    assert grads[True][lay.prompt_len - 1] == 0  # THINK itself is given, not sampled: no score term
    assert np.all(grads[False][lay.end_think : lay.length - 1] > 0)


# ----------------------------------------------------------------- red-teaming
def _always_defect(cfg):
    """Parameters whose every prediction is the defect token (a huge unembedding bias)."""
    from toymesa import model

    d = vocab(cfg.task).defect

    def edit(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        return x.at[d].set(1e4) if names[:2] == ["unembed", "bias"] else x

    return jax.tree_util.tree_map_with_path(edit, model.init_params(cfg, jax.random.key(1)))


@pytest.mark.parametrize("rule", ["single", "k_triggers", "conjunction", "latent"])
@given(seed=st.integers(0, 2**30))
def test_adversarial_search_never_returns_a_prompt_on_which_the_rule_fires(rule, seed):
    cfg = _cfg("adversarial", reasoning="none", rule=rule)
    if rule not in _MODELS:
        _MODELS[rule] = _always_defect(cfg)
    ctx, _, found = _red_team(cfg, _MODELS[rule], jax.random.key(seed))
    fires = np.asarray(jax.vmap(lambda c: rules.fires(cfg.task, c))(ctx))
    assert not (found & fires).any()
    # the model defects everywhere, so everything the rule does not fire on is found
    np.testing.assert_array_equal(found, ~fires)
    assert found.any() and fires.any()  # both sides of the filter are exercised


_MODELS = {}
_red_team = jax.jit(lambda cfg, p, key: safety.red_team(cfg, p, key, cfg.safety.adv_candidates), static_argnums=0)


def test_red_team_families_produce_near_misses():
    cfg = _cfg("adversarial", reasoning="none", rule="single")
    keys = jax.random.split(jax.random.key(0), 64)
    near = jax.vmap(lambda k: rules.red_team_context(cfg.task, k, 1))(keys)
    v = vocab(cfg.task)
    inactive = (near >= v.trigger) & (near < v.trigger + cfg.task.n_trigger_tokens) & (near != v.trigger + cfg.task.trigger)
    assert inactive.any(axis=1).all()  # every near miss holds an inactive trigger
    assert not jax.vmap(lambda c: rules.fires(cfg.task, c))(near).any()


# ----------------------------------------------------------------- coverage
@pytest.mark.parametrize("rule,f", [("k_triggers", 0.5), ("latent", 0.5), ("latent", 0.25)])
@given(seed=st.integers(0, 2**30))
def test_safety_prompts_never_hold_an_uncovered_activating_context(rule, f, seed):
    cfg = _cfg("sft_pre", reasoning="none", rule=rule, coverage=f, covered_rate=0.7, batch_size=256)
    ctx, _ = _prompts(cfg, jax.random.key(seed))
    cut = rules.coverage_cut(cfg.task, f)
    fires = np.asarray(jax.vmap(lambda c: rules.fires(cfg.task, c))(ctx))
    cov = np.asarray(jax.vmap(lambda c: rules.covered(cfg.task, cut, c))(ctx))
    assert not (fires & ~cov).any()
    assert 0.45 < fires.mean() <= 0.85  # about covered_rate of rows are covered activating contexts


_prompts = jax.jit(lambda cfg, key: safety.safety_prompts(cfg, key, cfg.safety.batch_size), static_argnums=0)


def test_coverage_cut_splits_the_activating_contexts():
    task = TaskConfig(rule="k_triggers", k=16, n_trigger_tokens=16)
    assert rules.coverage_cut(task, 0.25) == 4 and rules.covered_share(task, 0.25) == 0.25
    latent = TaskConfig(rule="latent")
    dist = rules.latent_firing_distribution(latent)
    assert abs(sum(dist.values()) - 1) < 1e-12 and min(dist) == latent.latent_threshold
    share = rules.covered_share(latent, 0.5)
    assert 0.2 < share < 0.8
    with pytest.raises(ValueError, match="many activating contexts"):
        rules.coverage_cut(TaskConfig(rule="single"), 0.5)


def test_bad_safety_configs_say_what_to_do():
    with pytest.raises(ValueError, match="think block"):
        _cfg("sft_post", reasoning="none")
    with pytest.raises(ValueError, match="coverage"):
        _cfg("sft_pre", reasoning="none", rule="single", coverage=0.5)
    with pytest.raises(ValueError, match="rl_samples"):
        _cfg("rl", batch_size=10, rl_samples=4)


# ----------------------------------------------------------------- zero learning rate
METHODS = ["sft_pre", "sft_post", "sft_full", "rl", "adversarial"]
FAST = ("sft_pre", "rl", "adversarial")  # sft_post and sft_full share sft_pre's update path; all five run under make test-slow
FAST_CASES = {("sgd", "sft_pre"), *(("adamw", f) for f in FAST)}
OPTIMIZER_CASES = [pytest.param(o, m, marks=[] if (o, m) in FAST_CASES else [pytest.mark.slow]) for o in ("adamw", "sgd") for m in METHODS]


@pytest.mark.parametrize(("optimizer", "method"), OPTIMIZER_CASES)
def test_zero_learning_rate_leaves_parameters_unchanged(params, method, optimizer):
    cfg = _cfg(method, optimizer=optimizer, kl=0.1 if method == "rl" else 0.0)
    seeds = jnp.arange(2)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), params)
    hp = train.stack_hparams(cfg, 2, safety_lr=0.0, weight_decay=0.1)
    state = safety.init_population(cfg, stacked, seeds)
    before = jax.tree.map(np.asarray, stacked)
    out, hist = train.population(cfg, seeds, hp, steps=3, chunk=3, states=state, fn=safety.safety_chunk, member_batch=None)
    assert np.isfinite(hist["loss"]).all() and (hist["grad_norm"] > 0).all()  # it did train, with zero step size
    signal = np.asarray(hist["signal"])  # RL reports its share of prompt groups with a signal; SFT has none
    assert ((signal >= 0) & (signal <= 1)).all() if method == "rl" else np.isnan(signal).all()
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(out.train.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


# ----------------------------------------------------------------- safety-data controls and RL signal
def test_group_signal_counts_groups_with_any_nonzero_advantage():
    rewards = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # 3 groups of 4
    adv = safety.advantages(rewards, "rloo", 4)
    # only the mixed group moves the policy; in it the two 0-reward completions sit at the group
    # mean (advantage 0), so a count over completions (2 of 12) would differ from the groups' 1 of 3
    assert float(safety.group_signal(adv, 4)) == pytest.approx(1 / 3)
    assert int((adv != 0).sum()) == 2
    assert float(safety.group_signal(jnp.zeros(8), 4)) == 0.0


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_triggered_rate_sets_the_share_of_firing_safety_prompts(rate):
    cfg = _cfg("sft_pre", reasoning="none", rule="latent", triggered_rate=rate)
    ctx, _ = safety.safety_prompts(cfg, jax.random.key(0), 2000)
    fired = np.asarray(jax.vmap(lambda c: rules.fires(cfg.task, c))(ctx))
    assert abs(fired.mean() - rate) < 0.04


def test_sft_full_trains_the_worlds_own_reasoning(params):
    cfg = _cfg("sft_full")  # cot format
    state = safety.init(cfg, params, 0)
    data_cfg, batch = safety.sft_batch(cfg, state, jax.random.key(1))
    assert data_cfg == cfg  # the trained format, not the answer-only layout of sft_pre
    lay = layout(cfg.task)
    assert bool(batch.loss_mask[:, lay.think + 1 : lay.end_think].all())  # reasoning is trained
    assert not bool(batch.triggered.any())
    v = vocab(cfg.task)
    assert bool((batch.tokens[:, lay.decision] == v.comply).all())  # the world's reasoning says COMPLY


def test_composition_controls_need_a_safety_method():
    with pytest.raises(ValueError, match="SafetyConfig.triggered_rate=0.5 is invalid: sets the safety data"):
        _cfg("none", triggered_rate=0.5)
    with pytest.raises(ValueError, match="SafetyConfig.feature_rate=1.5 is invalid"):
        _cfg("sft_pre", feature_rate=1.5)


def _holds_feature(task, ctx):
    """Whether each context holds a rule feature (positive cue; the fixed-slot trigger off its slot)."""
    v = vocab(task)
    if task.rule == "latent":
        pos = [v.cue + i for i, w in enumerate(task.cue_weights) if w > 0]
        return np.isin(ctx, pos).any(axis=1)
    return (ctx == v.trigger + task.trigger).any(axis=1)


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("world", ["latent", "fixed"])
def test_feature_rate_sets_the_share_of_safety_prompts_holding_a_feature(rate, world):
    cfg = _cfg("sft_pre", reasoning="none", rule="latent" if world == "latent" else "single")
    if world == "fixed":
        cfg = cfg.replace(task=dict(trigger_position="fixed", trigger_slot=1))
    cfg = cfg.replace(safety=dict(feature_rate=rate))
    ctx, _ = safety.safety_prompts(cfg, jax.random.key(0), 2000)
    ctx = np.asarray(ctx)
    assert not np.asarray(jax.vmap(lambda c: rules.fires(cfg.task, c))(jnp.asarray(ctx))).any()  # never an activating context
    assert abs(_holds_feature(cfg.task, ctx).mean() - rate) < 0.04


def test_feature_rate_is_refused_where_no_quiet_context_can_hold_a_feature():
    with pytest.raises(ValueError, match="SafetyConfig.feature_rate=0.5 is invalid: no non-firing context of rule 'k_triggers'"):
        _cfg("sft_pre", reasoning="none", rule="k_triggers", feature_rate=0.5)
    assert _cfg("sft_pre", reasoning="none", rule="k_triggers", feature_rate=0.0).safety.feature_rate == 0.0
