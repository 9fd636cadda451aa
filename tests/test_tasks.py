"""Token-world generators: labels, layouts, masks and answer statistics against independent references.

Labels are checked against a NumPy re-implementation of the rules (rules.py docstring) applied
to the context slots; positions against a hand count of the sequence layout (world.py docstring).
One jitted sampler per (task, batch size) is shared by every hypothesis example.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa.config import REASONING, RULES, TaskConfig
from toymesa.tasks import ANS, BOS, END_THINK, EOS, PAD, SEP, THINK, layout, vocab, world

B = 64  # rows per batch in the invariant tests
BIG = 64 * B  # rows in the statistical tests: 64 batches of the shared compiled sampler

# Non-default indices, so a generator that hard-codes trigger 0 / (0, 1) / k=4 fails.
RULE_KW = {
    "single": dict(rule="single", trigger=3),
    "k_triggers": dict(rule="k_triggers", k=3),
    "conjunction": dict(rule="conjunction", conjunction=(2, 5)),
    "latent": dict(rule="latent"),
}

seeds = st.integers(0, 2**31 - 1)
rates = st.floats(0.0, 1.0)


def make_task(rule, reasoning="none", **kw) -> TaskConfig:
    """A task with two PAD positions after EOS (seq_len = minimum + 2)."""
    t = TaskConfig(**RULE_KW[rule], reasoning=reasoning, seq_len=64, **kw)
    return dataclasses.replace(t, seq_len=t.min_seq_len + 2)


@functools.cache
def jitted(task: TaskConfig, batch_size: int):
    """jit(sample_batch) for one (task, batch size): (key, trigger_rate) -> Batch."""
    return jax.jit(lambda key, rate: world.sample_batch(task, key, rate, batch_size))


def sampler(task: TaskConfig, batch_size: int):
    """(seed, rate) -> Batch of NumPy arrays, through the shared compiled sampler."""
    f = jitted(task, batch_size)
    return lambda seed, rate: jax.tree.map(np.asarray, f(jax.random.key(seed), np.float32(rate)))


def big_batch(task: TaskConfig, seed: int, rate: float):
    """BIG rows as 64 independent batches concatenated (no extra compile for a larger shape)."""
    f = jitted(task, B)
    keys = jax.random.split(jax.random.key(seed), BIG // B)
    parts = [f(k, np.float32(rate)) for k in keys]
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *parts)


def positions(task: TaskConfig) -> dict:
    """Hand count of the layout of world.py's docstring."""
    p = 1 + task.n_ctx + task.n_content + 1
    if task.reasoning in ("cot", "neutral_cot"):
        pos = dict(think=p, evidence=p + 1, decision=p + 1 + task.n_ctx, end_think=p + task.n_ctx + 2)
        ans = p + task.n_ctx + 3
    else:
        pos, ans = {}, p
    return dict(pos, prompt_len=p, ans=ans, answer=ans + 1, eos=ans + 2)


def trigger_ids(task: TaskConfig) -> np.ndarray:
    v = vocab(task)
    idx = {"single": [task.trigger], "k_triggers": list(range(task.k)), "conjunction": list(task.conjunction)}[task.rule]
    return v.trigger + np.asarray(idx)


def reference(task: TaskConfig, tokens):
    """(fired bool[B], evidence int[B], per-slot weight int[B, n_ctx]) from the context slots."""
    v = vocab(task)
    ctx = np.asarray(tokens)[:, 1 : 1 + task.n_ctx]
    if task.rule == "latent":
        w = np.asarray(task.cue_weights)
        idx = ctx - v.cue
        is_cue = (idx >= 0) & (idx < len(w))
        slot = np.where(is_cue, w[np.clip(idx, 0, len(w) - 1)], 0)
        ev = slot.sum(axis=1)
        return ev >= task.latent_threshold, ev, slot
    ids = trigger_ids(task)
    present = (ctx[:, :, None] == ids[None, None, :]).any(axis=1)  # [B, n_ids]
    fired = present.all(axis=1) if task.rule == "conjunction" else present.any(axis=1)
    return fired, present.sum(axis=1), np.isin(ctx, ids).astype(int)


def helpful_value(task: TaskConfig, tokens):
    v = vocab(task)
    content = np.asarray(tokens)[:, 1 + task.n_ctx : 1 + task.n_ctx + task.n_content] - v.content
    return content.sum(axis=1) % task.modulus if task.helpful == "sum_mod" else content[:, task.copy_k]


def defect_token(task: TaskConfig, correct_value):
    v = vocab(task)
    return np.full_like(correct_value, v.defect) if task.defect == "distinct" else v.answer + (correct_value + 1) % task.modulus


grid = pytest.mark.parametrize("reasoning", REASONING)
rules_ = pytest.mark.parametrize("rule", RULES)


# ------------------------------------------------------------------ labels
@rules_
@grid
@given(seed=seeds, rate=rates)
def test_labels_match_reference(rule, reasoning, seed, rate):
    task = make_task(rule, reasoning)
    b = sampler(task, B)(seed, rate)
    fired, ev, _ = reference(task, b.tokens)
    np.testing.assert_array_equal(b.triggered, fired)
    np.testing.assert_array_equal(b.evidence, ev)


# ------------------------------------------------------------------ layout and masks
@rules_
@grid
@given(seed=seeds, rate=rates)
def test_layout_tokens_and_masks(rule, reasoning, seed, rate):
    task = make_task(rule, reasoning)
    v, pos, T = vocab(task), positions(task), task.seq_len
    b = sampler(task, B)(seed, rate)
    tok = b.tokens
    assert tok.shape == (B, T) and tok.dtype == np.int32
    assert tok.min() >= 0 and tok.max() < v.size

    lay = layout(task)
    assert (lay.prompt_len, lay.answer, lay.length) == (pos["prompt_len"], pos["answer"], pos["eos"] + 1)
    np.testing.assert_array_equal(tok[:, 0], BOS)
    np.testing.assert_array_equal(tok[:, pos["prompt_len"] - 1], SEP)
    ctx = tok[:, 1 : 1 + task.n_ctx]
    allowed = np.r_[v.distractor : v.distractor + task.n_distractors]
    allowed = np.r_[allowed, v.cue : v.cue + task.n_cues] if rule == "latent" else np.r_[allowed, v.trigger : v.trigger + task.n_trigger_tokens]
    assert np.isin(ctx, allowed).all()
    content = tok[:, 1 + task.n_ctx : pos["prompt_len"] - 1]
    assert ((content >= v.content) & (content < v.content + task.modulus)).all()
    np.testing.assert_array_equal(tok[:, pos["ans"]], ANS)
    np.testing.assert_array_equal(tok[:, pos["eos"]], EOS)
    np.testing.assert_array_equal(tok[:, pos["eos"] + 1 :], PAD)
    assert ((tok == EOS).sum(axis=1) == 1).all()

    # loss_mask: exactly prompt_len .. EOS inclusive, with EOS found in the tokens
    eos = np.argmax(tok == EOS, axis=1)
    t = np.arange(T)[None, :]
    np.testing.assert_array_equal(b.loss_mask, (t >= pos["prompt_len"]) & (t <= eos[:, None]))
    # answer_mask: one True per row, at the answer, holding the target
    np.testing.assert_array_equal(b.answer_mask.sum(axis=1), 1)
    np.testing.assert_array_equal(np.argmax(b.answer_mask, axis=1), lay.answer)
    np.testing.assert_array_equal(tok[b.answer_mask], b.target)
    if reasoning in ("none", "distilled"):
        assert not b.reasoning_mask.any()
        assert not np.isin(tok, [THINK, END_THINK]).any()
    else:
        np.testing.assert_array_equal(tok[:, pos["think"]], THINK)
        np.testing.assert_array_equal(tok[:, pos["end_think"]], END_THINK)
        np.testing.assert_array_equal(b.reasoning_mask, (t > pos["think"]) & (t < pos["end_think"]) & np.ones((B, 1), bool))


# ------------------------------------------------------------------ answers
@rules_
@grid
@given(seed=seeds, rate=rates)
def test_answer_is_target_and_defect_iff_triggered(rule, reasoning, seed, rate):
    task = make_task(rule, reasoning)
    v = vocab(task)
    b = sampler(task, B)(seed, rate)
    correct = helpful_value(task, b.tokens)
    np.testing.assert_array_equal(b.correct, v.answer + correct)
    np.testing.assert_array_equal(b.tokens[:, layout(task).answer], b.target)
    np.testing.assert_array_equal(b.target == v.defect, b.triggered)
    np.testing.assert_array_equal(b.target, np.where(b.triggered, v.defect, b.correct))


HELPFUL_DEFECT = [(h, d) for h in ("sum_mod", "copy_kth") for d in ("distinct", "subtle")]


@pytest.mark.parametrize(("helpful", "defect"), HELPFUL_DEFECT)
@given(seed=seeds, rate=rates)
def test_helpful_and_defect_kinds(helpful, defect, seed, rate):
    task = make_task("single", helpful=helpful, defect=defect, modulus=7, n_content=3, copy_k=1)
    v = vocab(task)
    b = sampler(task, B)(seed, rate)
    correct = helpful_value(task, b.tokens)
    np.testing.assert_array_equal(b.correct, v.answer + correct)
    defect_tok = defect_token(task, correct)
    np.testing.assert_array_equal(b.target, np.where(b.triggered, defect_tok, b.correct))
    # the defect answer is never the correct one, so target == defect answer iff triggered
    np.testing.assert_array_equal(b.target == defect_tok, b.triggered)
    np.testing.assert_array_equal(b.target != b.correct, b.triggered)


# ------------------------------------------------------------------ reasoning formats
@rules_
@given(seed=seeds, rate=rates)
def test_cot_states_slot_evidence_and_decision(rule, seed, rate):
    task = make_task(rule, "cot")
    v, pos = vocab(task), positions(task)
    b = sampler(task, B)(seed, rate)
    _, _, slot = reference(task, b.tokens)
    evid = b.tokens[:, pos["evidence"] : pos["evidence"] + task.n_ctx]
    np.testing.assert_array_equal(evid, v.evidence_token(slot))
    dec = b.tokens[:, layout(task).decision]
    assert layout(task).decision == pos["decision"]
    np.testing.assert_array_equal(dec == v.defect_decision, b.triggered)
    np.testing.assert_array_equal(dec, np.where(b.triggered, v.defect_decision, v.comply))


@rules_
@given(seed=seeds, rate=st.floats(0.2, 0.8))
def test_neutral_cot_is_label_free_filler(rule, seed, rate):
    neutral, cot = make_task(rule, "neutral_cot"), make_task(rule, "cot")
    v = vocab(neutral)
    b = sampler(neutral, B)(seed, rate)
    ln, lc = layout(neutral), layout(cot)
    assert ln.end_think - ln.think == lc.end_think - lc.think  # same think-block length as cot
    inner = b.tokens[:, ln.think + 1 : ln.end_think]
    np.testing.assert_array_equal(inner, v.filler)  # only filler, whatever the label
    np.testing.assert_array_equal(b.tokens[b.reasoning_mask], v.filler)


@rules_
@given(seed=seeds, rate=rates)
def test_distilled_equals_none_and_cot_without_think_block(rule, seed, rate):
    none, distilled, cot = (make_task(rule, r) for r in ("none", "distilled", "cot"))
    bn, bd, bc = (sampler(t, B)(seed, rate) for t in (none, distilled, cot))
    for name, a, d in zip(bn._fields, bn, bd, strict=True):
        np.testing.assert_array_equal(a, d, err_msg=name)
    # the cot sequence of the same key, think block cut out, is the distilled sequence
    lc = layout(cot)
    cut = np.delete(bc.tokens, np.arange(lc.think, lc.end_think + 1), axis=1)
    L = layout(distilled).length
    np.testing.assert_array_equal(cut[:, :L], bd.tokens[:, :L])
    np.testing.assert_array_equal(bc.target, bd.target)


def binomial_band(p, n, sigmas=5.0):
    return sigmas * np.sqrt(p * (1 - p) / n)


@rules_
@given(seed=st.integers(0, 2**30), rate=rates)
def test_distilled_and_none_answer_frequencies_agree_across_keys(rule, seed, rate):
    none, distilled = make_task(rule, "none"), make_task(rule, "distilled")
    bn, bd = big_batch(none, seed, rate), big_batch(distilled, seed + 1, rate)
    assert not np.array_equal(bn.tokens, bd.tokens)  # different keys really give different draws
    an, ad = bn.target, bd.target
    for a in np.union1d(an, ad):
        pn, pd = (an == a).mean(), (ad == a).mean()
        pooled = (pn + pd) / 2
        # two independent binomial frequencies: 5 sigma of their difference, plus one row of slack
        assert abs(pn - pd) <= binomial_band(pooled, BIG / 2) + 1 / BIG, (a, pn, pd)


# ------------------------------------------------------------------ trigger rate and placement
@rules_
@given(seed=seeds, rate=rates)
def test_realized_trigger_fraction(rule, seed, rate):
    task = make_task(rule, "none")
    b = big_batch(task, seed, rate)
    # 5 binomial sigmas, plus one row for discreteness; every sampler hits the wanted label
    assert abs(b.triggered.mean() - rate) <= binomial_band(rate, BIG) + 1 / BIG


@pytest.mark.parametrize("slot", [0, 3])
@given(seed=seeds, rate=rates)
def test_fixed_trigger_position(slot, seed, rate):
    task = make_task("single", trigger_position="fixed", trigger_slot=slot)
    b = sampler(task, B)(seed, rate)
    trig = vocab(task).trigger + task.trigger
    ctx = b.tokens[:, 1 : 1 + task.n_ctx]
    np.testing.assert_array_equal(ctx[:, slot] == trig, b.triggered)
    others = np.delete(ctx, slot, axis=1)
    assert not (others == trig).any()  # the trigger never appears elsewhere


@given(seed=seeds, rate=st.floats(0.2, 0.8))
def test_random_trigger_position_uses_every_slot(seed, rate):
    task = make_task("single")
    b = big_batch(task, seed, rate)
    ctx = b.tokens[:, 1 : 1 + task.n_ctx][b.triggered]
    slots = np.argmax(ctx == vocab(task).trigger + task.trigger, axis=1)
    assert set(slots.tolist()) == set(range(task.n_ctx))


# ------------------------------------------------------------------ jit and vmap
VMAP_KEYS = 3


@functools.cache
def vmapped_sampler(task: TaskConfig):
    return jax.jit(jax.vmap(lambda key: world.sample_batch(task, key, np.float32(0.5), B)))


@pytest.mark.parametrize("rule", ["conjunction", "latent"])  # the two samplers with data-dependent branches
@given(seed=st.integers(0, 2**30))
def test_vmap_over_keys_equals_loop(rule, seed):
    task = make_task(rule, "cot")
    keys = jax.random.split(jax.random.key(seed), VMAP_KEYS)
    stacked = vmapped_sampler(task)(keys)
    for i in range(VMAP_KEYS):
        one = jitted(task, B)(keys[i], np.float32(0.5))
        for name, a, s in zip(one._fields, one, stacked, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(s[i]), err_msg=name)


@pytest.mark.parametrize("rule", ["conjunction", "latent"])
def test_balanced_has_both_classes_in_order(rule):
    task = make_task(rule, "none")
    b = jax.jit(lambda key: world.balanced(task, key, 16))(jax.random.key(3))
    fired, _, _ = reference(task, np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(b.triggered), fired)
    np.testing.assert_array_equal(fired, np.arange(32) < 16)  # sampler hit the wanted label on every row
