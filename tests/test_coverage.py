"""Partial coverage and evidence against brute force: every context of a small task is enumerated
and the rules of `toymesa.tasks.rules` (module and `coverage_cut` / `covered` docstrings) are
recomputed in NumPy from the token ids and the cue weights.

* k_triggers: the covered triggers are indices 0..cut-1 with cut = round(fraction * k); a
  context is covered iff it fires and holds no active trigger >= cut; evidence counts
  *distinct* active triggers (a repeated trigger is one piece of evidence).
* latent: evidence is the sum of the cue weights over the slots (a repeated cue counts every
  time); the covered band is [threshold, cut) with cut the firing level whose covered share
  P(evidence < cut | fires), under the sampler's uniform slots, is closest to the fraction.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toymesa import safety
from toymesa.config import Config, SafetyConfig, TaskConfig
from toymesa.presets import tiny
from toymesa.tasks import layout, rules, vocab

K_TASK = TaskConfig(rule="k_triggers", k=4, n_trigger_tokens=5, n_distractors=2)  # 11 context tokens: 11^4 contexts
LATENT = TaskConfig(rule="latent")  # cue weights (3, 2, 1, -1), threshold 3, 12 pool tokens: 12^4 contexts
# Cue weights (3, -1), threshold 1: a third of the contexts fire, but the band just above the
# threshold (evidence 1 = 3 - 1 - 1) holds 1% of them, so the latent region sampler often misses it.
RARE_BAND = TaskConfig(rule="latent", cue_weights=(3, -1), latent_threshold=1)


def _all_contexts(tokens, n_ctx):
    return np.asarray(list(itertools.product(tokens, repeat=n_ctx)), np.int32)


def _vmap(f, ctx):
    return np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(ctx)))


def _k_reference(task, ctx):
    """(evidence, fires, index of each slot's active trigger or -1) by hand."""
    idx = ctx - vocab(task).trigger
    idx = np.where((idx >= 0) & (idx < task.k), idx, -1)
    present = np.stack([(idx == i).any(1) for i in range(task.k)], axis=1)
    ev = present.sum(1)
    return ev, ev >= 1, idx


def _latent_reference(task, ctx):
    """(evidence, fires) by hand: the cue weights summed over the slots (other tokens weigh 0)."""
    i = ctx - vocab(task).cue
    w = np.asarray(task.cue_weights)
    ev = np.where((i >= 0) & (i < task.n_cues), w[np.clip(i, 0, task.n_cues - 1)], 0).sum(1)
    return ev, ev >= task.latent_threshold


@pytest.fixture(scope="module")
def k_contexts():
    return _all_contexts(rules.context_tokens(K_TASK), K_TASK.n_ctx)


@pytest.fixture(scope="module")
def latent_contexts():
    # the sampler's slots are uniform over latent_pool, so each enumerated context is equally likely
    return _all_contexts(rules.latent_pool(LATENT), LATENT.n_ctx)


# ----------------------------------------------------------------- evidence
def test_evidence_counts_distinct_triggers_and_every_cue():
    v = vocab(K_TASK)
    t, d = v.trigger, v.distractor
    ev = lambda task, ctx: int(rules.evidence(task, jnp.asarray(ctx, jnp.int32)))
    assert ev(K_TASK, [t, t, t + 1, d]) == 2  # trigger 0 twice, trigger 1 once
    assert ev(K_TASK, [t + 3, t + 3, t + 3, t + 3]) == 1
    assert ev(K_TASK, [t + 4, d, d, t + 4]) == 0  # trigger 4 is not active (k = 4)
    single = TaskConfig(rule="single", trigger=2)
    assert ev(single, [d, t + 2, t + 2, d]) == 1
    # conjunction: the pair (0, 1) must co-occur; one half twice is still one piece of evidence
    conj = TaskConfig(rule="conjunction")
    assert ev(conj, [t, t, d, d]) == 1 and not rules.fires(conj, jnp.asarray([t, t, d, d]))
    assert ev(conj, [t, d, t + 1, t]) == 2 and rules.fires(conj, jnp.asarray([t, d, t + 1, t]))
    # latent: weights (3, 2, 1, -1) summed per slot, repeats included
    c = vocab(LATENT).cue
    assert ev(LATENT, [c, c, d, d]) == 6
    assert ev(LATENT, [c + 3, c + 3, c + 2, c + 1]) == -1 + -1 + 1 + 2
    assert ev(LATENT, [c + 2, c + 2, c + 2, d]) == 3 and rules.fires(LATENT, jnp.asarray([c + 2, c + 2, c + 2, d]))


def test_k_triggers_evidence_and_label_on_every_context(k_contexts):
    ev, fires, _ = _k_reference(K_TASK, k_contexts)
    np.testing.assert_array_equal(_vmap(lambda c: rules.evidence(K_TASK, c), k_contexts), ev)
    np.testing.assert_array_equal(_vmap(lambda c: rules.fires(K_TASK, c), k_contexts), fires)
    assert (ev >= 2).any() and fires.mean() < 1  # repeats and multiple triggers really occur


def test_latent_evidence_and_firing_distribution_on_every_context(latent_contexts):
    ev, fires = _latent_reference(LATENT, latent_contexts)
    np.testing.assert_array_equal(_vmap(lambda c: rules.evidence(LATENT, c), latent_contexts), ev)
    np.testing.assert_array_equal(_vmap(lambda c: rules.fires(LATENT, c), latent_contexts), fires)
    levels, counts = np.unique(ev[fires], return_counts=True)
    dist = rules.latent_firing_distribution(LATENT)
    assert sorted(dist) == levels.tolist()
    np.testing.assert_allclose([dist[e] for e in levels], counts / fires.sum(), rtol=1e-12)


# ----------------------------------------------------------------- k_triggers coverage
@pytest.mark.parametrize("fraction, cut", [(0.25, 1), (0.5, 2), (0.75, 3), (0.6, 2), (0.65, 3)])
def test_k_triggers_coverage_covers_the_first_triggers(k_contexts, fraction, cut):
    assert rules.coverage_cut(K_TASK, fraction) == cut
    assert rules.covered_share(K_TASK, fraction) == cut / K_TASK.k
    _, fires, idx = _k_reference(K_TASK, k_contexts)
    want = fires & ~(idx >= cut).any(1)
    np.testing.assert_array_equal(_vmap(lambda c: rules.covered(K_TASK, cut, c), k_contexts), want)
    # contexts with one active trigger: exactly the triggers 0..cut-1 are covered
    one = (idx >= 0).sum(1) == 1
    covered_triggers = set(idx[one & want].max(1).tolist())
    assert covered_triggers == set(range(cut))


@pytest.mark.parametrize("fraction", [0.1, 0.9, 0.125])
def test_k_triggers_coverage_must_leave_both_parts_nonempty(fraction):
    with pytest.raises(ValueError, match="covers between 1 and 3"):
        rules.coverage_cut(K_TASK, fraction)


def test_k_triggers_region_sampler_draws_each_part_and_the_share_matches_the_sampler():
    cut, keys = 2, jax.random.split(jax.random.key(0), 512)
    for want in (True, False):
        ctx = np.asarray(jax.jit(jax.vmap(lambda k, w=want: rules.sample_region(K_TASK, k, cut, jnp.bool_(w))))(keys))
        _, fires, idx = _k_reference(K_TASK, ctx)
        assert fires.all() and ((idx >= 0).sum(1) == 1).all()  # one active trigger each
        assert set(idx.max(1).tolist()) == (set(range(cut)) if want else set(range(cut, K_TASK.k)))
        np.testing.assert_array_equal(_vmap(lambda c: rules.covered(K_TASK, cut, c), ctx), want)
    # covered_share is the covered share of the sampler's activating contexts
    firing = np.asarray(jax.jit(jax.vmap(lambda k: rules.sample_context(K_TASK, k, jnp.bool_(True))))(keys))
    share = _vmap(lambda c: rules.covered(K_TASK, cut, c), firing).mean()
    assert abs(share - rules.covered_share(K_TASK, 0.5)) < 5 * np.sqrt(0.25 / 512)


# ----------------------------------------------------------------- latent coverage
def _brute_cut(ev, fires, fraction):
    """The cut of the docstring by enumeration: the firing level c > threshold whose covered
    share P(evidence < c | fires) is closest to the fraction (the first of ties)."""
    levels = np.unique(ev[fires])
    shares = [(ev[fires] < c).mean() for c in levels[1:]]
    best = int(np.argmin(np.abs(np.asarray(shares) - fraction)))
    return int(levels[1:][best]), shares[best]


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.8, 0.9, 0.99999])
def test_latent_coverage_band_and_share_by_enumeration(latent_contexts, fraction):
    ev, fires = _latent_reference(LATENT, latent_contexts)
    cut, share = _brute_cut(ev, fires, fraction)
    assert rules.coverage_cut(LATENT, fraction) == cut
    assert rules.covered_share(LATENT, fraction) == pytest.approx(share, rel=1e-12)
    cov = _vmap(lambda c: rules.covered(LATENT, cut, c), latent_contexts)
    np.testing.assert_array_equal(cov, fires & (ev < cut))
    # the covered band is the levels threshold .. cut - 1, and nothing else
    assert set(ev[cov].tolist()) == set(range(LATENT.latent_threshold, cut))
    assert cov.sum() / fires.sum() == pytest.approx(rules.covered_share(LATENT, fraction), rel=1e-12)


def test_latent_coverage_cut_on_a_second_weight_table():
    ctx = _all_contexts(rules.latent_pool(RARE_BAND), RARE_BAND.n_ctx)
    ev, fires = _latent_reference(RARE_BAND, ctx)
    for fraction in (0.01, 0.2, 0.5, 0.8, 0.95):
        cut, share = _brute_cut(ev, fires, fraction)
        assert rules.coverage_cut(RARE_BAND, fraction) == cut
        assert rules.covered_share(RARE_BAND, fraction) == pytest.approx(share, rel=1e-12)


def test_latent_region_sampler_hits_its_band():
    cut = rules.coverage_cut(LATENT, 0.75)  # band {3, 4}
    keys = jax.random.split(jax.random.key(1), 256)
    for want in (True, False):
        ctx = np.asarray(jax.jit(jax.vmap(lambda k, w=want: rules.sample_region(LATENT, k, cut, jnp.bool_(w))))(keys))
        ev, fires = _latent_reference(LATENT, ctx)
        hit = fires & ((ev < cut) == want)
        assert hit.mean() >= 0.98, (want, hit.mean())  # a miss (no candidate in the band) is rare here


# ----------------------------------------------------------------- safety data
def test_safety_prompts_hit_a_rare_covered_band_every_time():
    """A covered band rare under uniform slots (the old rejection sampler missed it about half
    the time and fell back to non-firing rows) is drawn exactly: every row asked for it gets it."""
    cfg = Config(model=tiny(), task=RARE_BAND, safety=SafetyConfig(method="sft_pre", coverage=0.01, covered_rate=1.0))
    cut = rules.coverage_cut(RARE_BAND, 0.01)
    assert cut == 2  # covered band: evidence 1 exactly
    ctx, _ = jax.jit(lambda key: safety.safety_prompts(cfg, key, 2048))(jax.random.key(2))
    ev, fires = _latent_reference(RARE_BAND, np.asarray(ctx))
    assert not (fires & (ev >= cut)).any()  # no uncovered activating context, over 2048 rows
    np.testing.assert_array_equal(ev[fires], 1)
    all_ev, _ = _latent_reference(RARE_BAND, _all_contexts(rules.latent_pool(RARE_BAND), RARE_BAND.n_ctx))
    assert (all_ev == 1).mean() < 0.02  # rare under uniform slots
    assert fires.all()  # covered_rate = 1: every row asked for the band, and got it


def test_safety_sft_batch_trains_the_helpful_answer_on_covered_activating_contexts():
    task = TaskConfig(rule="k_triggers", k=4, reasoning="none")
    cfg = Config(model=tiny(), task=task, safety=SafetyConfig(method="sft_pre", coverage=0.5, covered_rate=0.5, batch_size=256))
    batch = jax.jit(lambda key: safety.sft_batch(cfg, None, key)[1])(jax.random.key(4))
    assert 0.3 < float(batch.triggered.mean()) < 0.7
    _, _, idx = _k_reference(task, np.asarray(batch.tokens)[:, 1 : 1 + task.n_ctx])
    assert (idx < 2).all()  # only covered triggers 0, 1
    np.testing.assert_array_equal(batch.target, batch.correct)
    np.testing.assert_array_equal(batch.tokens[:, layout(task).answer], batch.correct)
