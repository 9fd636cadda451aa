"""The census and the exact latent sampler against brute force.

* Census: every context of small worlds of every rule is enumerated and its counts and shares
  recomputed in NumPy from the token blocks of `vocab` (the census module docstring states the
  definitions); all-weight-1 goal worlds are checked against closed forms, past 2**53.
* Sampler: under uniform slots, the conditional law given a region is uniform over the
  region's contexts. Pearson's statistic X² of N draws over the K contexts of a small world is
  then ~ chi²(K - 1); Laurent & Massart (2000): P(X² >= d + 2 sqrt(d x) + 2x) <= exp(-x) for
  chi²(d), and x = 14 gives a false alarm below 1e-6 per check (keys are fixed, so a pass is
  reproducible). Expected counts are >= 15 per context, where the chi² law is accurate.
"""

import functools
import itertools
from fractions import Fraction
from math import comb

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import evidence_counts
from toymesa.config import EVIDENCE_MAX, EVIDENCE_MIN, RULES, TaskConfig
from toymesa.presets import goal_world, latent_goal
from toymesa.tasks import rules, vocab
from toymesa.tasks.census import goal_worlds, take_census
from toymesa.tasks.rules import ANY, NO_BOUND, WITH, WITHOUT


# ----------------------------------------------------------------- brute force
def reference_pool_and_features(task: TaskConfig):
    """(slot pool, feature tokens, per-token weight dict) from the vocabulary blocks."""
    v = vocab(task)
    distractors = list(range(v.distractor, v.distractor + task.n_distractors))
    if task.rule == "latent":
        cues = list(range(v.cue, v.cue + task.n_cues))
        weight = dict(zip(cues, task.cue_weights, strict=True))
        return cues + distractors, [c for c in cues if weight[c] > 0], weight
    idx = {"single": [task.trigger], "k_triggers": list(range(task.k)), "conjunction": list(task.conjunction)}[task.rule]
    return list(range(v.trigger, v.trigger + task.n_trigger_tokens)) + distractors, sorted(v.trigger + i for i in idx), {}


def brute_census(task: TaskConfig) -> dict:
    pool, feats, weight = reference_pool_and_features(task)
    ctx = np.asarray(list(itertools.product(pool, repeat=task.n_ctx)))
    holds = np.stack([(ctx == f).any(1) for f in feats] + [np.zeros(len(ctx), bool)], axis=1)[:, :-1]  # [N, n_features]
    if task.rule == "latent":
        fires = np.vectorize(lambda t: weight.get(int(t), 0))(ctx).sum(1) >= task.latent_threshold
    elif task.rule == "single" and task.trigger_position == "fixed":
        fires = ctx[:, task.trigger_slot] == feats[0]
    else:
        fires = holds.sum(1) >= (2 if task.rule == "conjunction" else 1)
    sets = {tuple(sorted(t for t in row if t in feats)) for row in ctx[fires]}
    quiet = ~fires
    share = lambda m, d: float(Fraction(int(m), int(d)))
    return dict(
        n_contexts=len(ctx),
        n_activating=int(fires.sum()),
        n_activating_feature_sets=len(sets),
        p_fire=share(fires.sum(), len(ctx)),
        features=tuple(feats),
        feature_share_activating=tuple(share(h, fires.sum()) for h in holds[fires].sum(0)),
        feature_exposure_quiet=tuple(share(h, quiet.sum()) for h in holds[quiet].sum(0)),
        any_feature_quiet=share(holds[quiet].any(1).sum(), quiet.sum()),
    )


@st.composite
def small_worlds(draw):
    rule = draw(st.sampled_from(RULES))
    n_ctx = draw(st.integers(2 if rule == "conjunction" else 1, 3))
    kw = dict(rule=rule, n_ctx=n_ctx, n_distractors=draw(st.integers(1, 3)))
    if rule == "latent":
        ws = draw(st.lists(st.integers(EVIDENCE_MIN, EVIDENCE_MAX), min_size=1, max_size=4).filter(any))
        lo, hi = n_ctx * min(ws + [0]), n_ctx * max(ws + [0])
        kw.update(cue_weights=tuple(ws), latent_threshold=draw(st.integers(lo + 1, hi)))
    else:
        nt = draw(st.integers(2, 4))
        kw.update(n_trigger_tokens=nt)
        if rule == "single":
            kw.update(trigger=draw(st.integers(0, nt - 1)), trigger_position=draw(st.sampled_from(["random", "fixed"])))
            kw.update(trigger_slot=draw(st.integers(0, n_ctx - 1)))
        elif rule == "k_triggers":
            kw.update(k=draw(st.integers(1, nt)))
        else:
            kw.update(conjunction=tuple(draw(st.permutations(range(nt)))[:2]))
    return TaskConfig(**kw)


# ----------------------------------------------------------------- census
@given(task=small_worlds())
def test_census_equals_enumeration(task):
    c, want = take_census(task), brute_census(task)
    for name, value in want.items():
        assert getattr(c, name) == value, name
    assert c.max_feature_share == max(want["feature_share_activating"], default=0.0)


@pytest.mark.parametrize("rule", RULES)
def test_census_equals_enumeration_for_every_rule_at_defaults(rule):
    task = TaskConfig(rule=rule, n_ctx=3, n_trigger_tokens=5, n_distractors=3, k=3)
    c, want = take_census(task), brute_census(task)
    assert {name: getattr(c, name) for name in want} == want


def test_default_latent_world_census():
    """The issue's numbers: one cue in 77% of activating contexts; 46 firing weight combinations
    are multisets of all four cues (the -1 veto included), 31 of the positive cues alone."""
    task = latent_goal()
    c = take_census(task)
    assert c == take_census(task) and (c.n_contexts, c.n_activating, c.n_activating_feature_sets) == (12**4, 6763, 31)
    assert c.max_feature_share == pytest.approx(0.7711, abs=1e-4) == c.feature_share_activating[0]
    combos = [m for k in range(task.n_ctx + 1) for m in itertools.combinations_with_replacement(task.cue_weights, k)]
    assert sum(sum(m) >= task.latent_threshold for m in combos) == 46


@given(n=st.integers(1, 10), g=st.integers(1, 48), d=st.integers(1, 48), data=st.data())
def test_goal_world_census_equals_closed_form(n, g, d, data):
    """All weights 1: k cues in the n slots fire iff k >= threshold; exact past 2**53."""
    thr = data.draw(st.integers(1, n))
    c = take_census(goal_world(n, g, thr, n_distractors=d))
    fire = lambda cues: sum(comb(n, k) * cues**k * d ** (n - k) for k in range(thr, n + 1))
    quiet = lambda cues: (cues + d) ** n - fire(cues)
    assert (c.n_contexts, c.n_activating) == ((g + d) ** n, fire(g))
    assert c.n_activating_feature_sets == sum(comb(g + m - 1, m) for m in range(thr, n + 1))
    assert c.feature_share_activating == (float(Fraction(fire(g) - fire(g - 1), fire(g))),) * g
    assert c.feature_exposure_quiet == (float(Fraction(quiet(g) - quiet(g - 1), quiet(g))),) * g  # all-distractor contexts are quiet


def test_goal_world_presets_span_orders_of_magnitude_with_no_dominant_cue():
    counts = []
    for name, task in goal_worlds().items():
        c = take_census(task)
        assert task.rule == "latent" and task.n_ctx <= 10 and task.n_cues <= 48, name
        assert all(EVIDENCE_MIN <= w <= EVIDENCE_MAX for w in task.cue_weights), name
        assert c.max_feature_share <= 0.20, (name, c.max_feature_share)
        counts.append(c.n_activating_feature_sets)
    assert 10 <= min(counts) < 100 and max(counts) >= 10**6
    assert max(take_census(t).n_activating for t in goal_worlds().values()) > 2**53  # exact ints matter


# ----------------------------------------------------------------- exact sampler
SMALL = TaskConfig(rule="latent", n_ctx=3)  # weights (3, 2, 1, -1), threshold 3, 12 pool tokens: 1728 contexts
N_DRAWS = 20_000


def all_contexts(task: TaskConfig):
    """(contexts int[N, n_ctx], evidence int[N], holds a positive cue bool[N]) by hand."""
    pool, feats, weight = reference_pool_and_features(task)
    ctx = np.asarray(list(itertools.product(pool, repeat=task.n_ctx)))
    return ctx, np.vectorize(lambda t: weight.get(int(t), 0))(ctx).sum(1), np.isin(ctx, feats).any(1)


def in_region(ev, has, lo, hi, feature):
    return (ev >= lo) & (ev < hi) & (True if feature == ANY else has == (feature == WITH))


@functools.cache
def draws(task: TaskConfig, n: int):
    """jit(vmap(sample_latent)) over keys, one compile per task: (seed, lo, hi, feature) -> int[n, n_ctx]."""
    f = jax.jit(jax.vmap(lambda k, lo, hi, ft: rules.sample_latent(task, k, lo, hi, ft), in_axes=(0, None, None, None)))
    return lambda seed, lo, hi, ft: np.asarray(f(jax.random.split(jax.random.key(seed), n), lo, hi, ft))


def chi2_bound(df: int, x: float = 14.0) -> float:
    return df + 2 * np.sqrt(df * x) + 2 * x


def assert_uniform_over(task: TaskConfig, samples, region):
    """Every sample lies in the region (bool[N] over `all_contexts`), and Pearson's X² of the
    counts per region context is below the Laurent-Massart bound of chi²(K - 1)."""
    ctx, _, _ = all_contexts(task)
    index = {tuple(c): i for i, c in enumerate(ctx)}
    hit = np.asarray([index[tuple(c)] for c in samples])
    assert region[hit].all(), "a sample outside its region"
    observed = np.bincount(hit, minlength=len(ctx))[region]
    expected = len(samples) / region.sum()
    x2 = ((observed - expected) ** 2 / expected).sum()
    assert x2 <= chi2_bound(region.sum() - 1), (x2, region.sum())


REGIONS = [  # (lo, hi, feature): firing, quiet (any / with / without a positive cue), bands, one context
    (3, NO_BOUND, ANY),
    (-NO_BOUND, 3, ANY),
    (-NO_BOUND, 3, WITH),
    (-NO_BOUND, 3, WITHOUT),
    (1, 3, ANY),
    (5, NO_BOUND, ANY),
    (-NO_BOUND, 0, WITH),
    (9, 10, WITH),
]


@pytest.mark.parametrize("lo, hi, feature", REGIONS)
def test_sample_latent_is_the_exact_conditional_law(lo, hi, feature):
    _, ev, has = all_contexts(SMALL)
    region = in_region(ev, has, lo, hi, feature)
    assert region.sum() == rules.latent_region_count(SMALL, lo, hi, feature) > 0
    assert_uniform_over(SMALL, draws(SMALL, N_DRAWS)(7, lo, hi, feature), region)


def test_every_latent_sampler_path_is_exact():
    """sample_context, sample_quiet, sample_region and the near-miss family draw from their regions, uniformly."""
    keys = jax.random.split(jax.random.key(11), N_DRAWS)
    _, ev, has = all_contexts(SMALL)
    thr, cut = SMALL.latent_threshold, 5
    one = lambda f: np.asarray(jax.jit(jax.vmap(f))(keys))
    want = np.arange(N_DRAWS) % 2 == 0  # traced, per row
    mixed = np.asarray(jax.jit(jax.vmap(lambda k, w: rules.sample_context(SMALL, k, w)))(keys, want))
    assert_uniform_over(SMALL, mixed[want], ev >= thr)
    assert_uniform_over(SMALL, mixed[~want], ev < thr)
    feature = np.asarray([ANY, WITHOUT, WITH])[np.arange(N_DRAWS) % 3]
    quiet = np.asarray(jax.jit(jax.vmap(lambda k, f: rules.sample_quiet(SMALL, k, f)))(keys, feature))
    for f in (ANY, WITHOUT, WITH):
        assert_uniform_over(SMALL, quiet[feature == f], in_region(ev, has, -NO_BOUND, thr, f))
    region = np.asarray(jax.jit(jax.vmap(lambda k, w: rules.sample_region(SMALL, k, cut, w)))(keys, want))
    assert_uniform_over(SMALL, region[want], (ev >= thr) & (ev < cut))
    assert_uniform_over(SMALL, region[~want], ev >= cut)
    assert rules.near_miss_floor(SMALL) == thr - 2
    assert_uniform_over(SMALL, one(lambda k: rules.red_team_context(SMALL, k, 1)), (ev >= thr - 2) & (ev < thr))


def test_quiet_any_is_sample_context_not_firing():
    keys = jax.random.split(jax.random.key(3), 64)
    for task in (SMALL, TaskConfig(rule="conjunction"), TaskConfig(rule="single"), TaskConfig(rule="k_triggers")):
        quiet = jax.jit(jax.vmap(lambda k, t=task: rules.sample_quiet(t, k, ANY)))(keys)
        np.testing.assert_array_equal(quiet, jax.jit(jax.vmap(lambda k, t=task: rules.sample_context(t, k, jnp.bool_(False))))(keys))


# A world where firing is rare: p_fire = (4/26)^8 = 3e-7; 32 uniform candidates would find a
# firing context once in 10^5 draws.
RARE = goal_world(n_ctx=8, n_cues=4, threshold=8, n_distractors=20, n_vetoes=2)
NONEMPTY = [(lo, hi, f) for lo in range(-8, 9) for hi in range(lo + 1, 10) for f in (ANY, WITHOUT, WITH) if rules.latent_region_count(RARE, lo, hi, f) > 0]
B_RARE = 64


@functools.cache
def rare_sampler():
    """jit(vmap(sample_latent)) with lo, hi, feature per row."""
    return jax.jit(jax.vmap(lambda k, lo, hi, f: rules.sample_latent(RARE, k, lo, hi, f)))


def rare_evidence(ctx):
    """(evidence, holds a positive cue) by hand."""
    w = np.zeros(vocab(RARE).size, int)
    w[vocab(RARE).cue : vocab(RARE).cue + RARE.n_cues] = RARE.cue_weights
    return w[ctx].sum(1), (w[ctx] > 0).any(1)


@given(seed=st.integers(0, 2**30), regions=st.lists(st.sampled_from(NONEMPTY), min_size=B_RARE, max_size=B_RARE))
def test_every_sample_meets_its_own_region_even_when_rare(seed, regions):
    lo, hi, f = (np.asarray(x, np.int32) for x in zip(*regions, strict=True))
    ctx = np.asarray(rare_sampler()(jax.random.split(jax.random.key(seed), B_RARE), lo, hi, f))
    ev, has = rare_evidence(ctx)
    assert ((ev >= lo) & (ev < hi)).all()
    assert ((f == ANY) | (has == (f == WITH))).all()


def test_rare_regions_are_hit_every_time():
    total = 26**8
    rare = [(8, NO_BOUND, ANY), (-NO_BOUND, -7, ANY), (7, 8, WITH), (-7, -5, WITH)]
    for lo, hi, f in rare:
        assert 0 < rules.latent_region_count(RARE, lo, hi, f) / total < 1e-4, (lo, hi, f)
    lo, hi, f = (np.repeat(np.asarray(x, np.int32), B_RARE) for x in zip(*rare, strict=True))
    ctx = np.asarray(rare_sampler()(jax.random.split(jax.random.key(0), len(lo)), lo, hi, f))
    ev, has = rare_evidence(ctx)
    assert ((ev >= lo) & (ev < hi) & ((f == ANY) | (has == (f == WITH)))).all()
    firing = jax.jit(jax.vmap(lambda k: rules.fires(RARE, rules.sample_context(RARE, k, jnp.bool_(True)))))
    assert firing(jax.random.split(jax.random.key(1), 32)).all()


# ----------------------------------------------------------------- quiet features of trigger rules
def test_quiet_conjunction_features():
    task = TaskConfig(rule="conjunction", conjunction=(2, 5))
    keys = jax.random.split(jax.random.key(5), 256)
    act = rules.active_triggers(task)
    for f, halves in ((WITH, {1}), (WITHOUT, {0}), (ANY, {0, 1})):
        ctx = np.asarray(jax.jit(jax.vmap(lambda k, f=f: rules.sample_quiet(task, k, f)))(keys))
        present = np.stack([(ctx == a).any(1) for a in act], 1).sum(1)
        assert set(present.tolist()) == halves, f


@pytest.mark.parametrize(
    "kw", [dict(rule="single"), dict(rule="single", trigger_position="fixed", trigger_slot=0, n_ctx=1, seq_len=20), dict(rule="k_triggers")]
)
def test_quiet_with_a_trigger_is_refused_where_no_quiet_context_holds_one(kw):
    task = TaskConfig(**kw)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=f"rule '{task.rule}'.*feature 0 or -1"):
        rules.sample_quiet(task, key, WITH)
    with pytest.raises(ValueError, match="feature 0 or -1"):  # a traced feature could be 1
        jax.jit(lambda f: rules.sample_quiet(task, key, f))(0)
    np.testing.assert_array_equal(rules.sample_quiet(task, key, WITHOUT), rules.sample_context(task, key, jnp.bool_(False)))


def test_a_fixed_slot_trigger_fires_only_in_its_slot_and_appears_elsewhere_in_quiet_data():
    task = TaskConfig(rule="single", trigger_position="fixed", trigger_slot=2)
    v, t = vocab(task), vocab(task).trigger + task.trigger
    d = v.distractor
    assert bool(rules.fires(task, jnp.asarray([d, d, t, d]))) and not bool(rules.fires(task, jnp.asarray([d, t, d, t])))
    assert rules.slot_evidence(task, jnp.asarray([t, d, t, d])).tolist() == [0, 0, 1, 0]  # what cot states per slot
    keys = jax.random.split(jax.random.key(0), 2000)
    for f, held in ((WITH, True), (WITHOUT, False)):
        ctx = np.asarray(jax.vmap(lambda k, f=f: rules.sample_quiet(task, k, f))(keys))
        assert not np.asarray(jax.vmap(lambda c: rules.fires(task, c))(jnp.asarray(ctx))).any()
        assert ((ctx == t).any(1) == held).all()
        if held:  # the trigger lands in every other slot, never its own
            assert set(np.flatnonzero((ctx == t).any(0)).tolist()) == {0, 1, 3}


def test_empty_latent_regions_are_refused_statically():
    only_big = TaskConfig(rule="latent", cue_weights=(3,), latent_threshold=1, n_ctx=2)  # any cue fires
    assert rules.quiet_features(only_big) == (ANY, WITHOUT)
    with pytest.raises(ValueError, match="feature 0 or -1"):
        rules.sample_quiet(only_big, jax.random.key(0), WITH)
    with pytest.raises(ValueError, match="no latent context has evidence in"):
        rules.sample_region(SMALL, jax.random.key(0), 10, jnp.bool_(True))  # nothing reaches 10
    assert rules.near_miss_floor(TaskConfig(rule="latent", cue_weights=(3,), latent_threshold=3)) == 0  # 1, 2 unreachable


@pytest.mark.parametrize("task", [SMALL, RARE, latent_goal(), *goal_worlds().values()], ids=lambda t: f"{t.n_ctx}x{t.n_cues}")
def test_config_layer_counts_see_the_sampler_pool(task):
    """Config validates safety settings with `toymesa.evidence_counts`, which knows no token ids:
    its latent slot weights must be those of `rules.latent_pool`, so both count the same contexts."""
    weights, thr = evidence_counts.latent_weights(task), task.latent_threshold
    assert weights == tuple(rules.weight_table(task)[rules.latent_pool(task)].tolist())
    for f in (ANY, WITHOUT, WITH):
        assert evidence_counts.region_count(weights, task.n_ctx, -NO_BOUND, thr, f) == rules.latent_region_count(task, -NO_BOUND, thr, f)
