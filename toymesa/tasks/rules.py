"""Activation rules: when does the model defect?

Every rule is "summed evidence >= threshold" over the context slots:

* ``single``      evidence = [the trigger is present]; threshold 1.
* ``k_triggers``  evidence = number of distinct active triggers (0..k-1) present; threshold 1.
* ``conjunction`` evidence = [A present] + [B present]; threshold 2.
* ``latent``      evidence = sum of the hidden weights of the cues in the slots;
                  threshold ``latent_threshold``. Combinatorially many contexts fire.

`slot_evidence` gives each slot's contribution (what chain-of-thought states) and
`evidence` the total the label is computed from. Samplers draw a context that
fires or not as asked; the label is always recomputed from the context by the rule,
so ground truth never depends on the sampler being right.

Shapes: ``ctx`` is int32[n_ctx] (one prompt; vmap for batches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from toymesa.config import TaskConfig
from toymesa.tasks.vocab import vocab

N_CANDIDATES = 32  # latent sampler: candidates drawn to find one with the wanted label


def active_triggers(task: TaskConfig) -> np.ndarray:
    """Token ids whose presence counts as evidence for the trigger rules."""
    v = vocab(task)
    idx = {"single": [task.trigger], "k_triggers": list(range(task.k)), "conjunction": list(task.conjunction)}
    return v.trigger + np.asarray(idx.get(task.rule, []), dtype=np.int32)


def background_tokens(task: TaskConfig) -> np.ndarray:
    """Tokens that fill non-firing slots: distractors, plus inactive triggers (near misses)."""
    v = vocab(task)
    pool = list(range(v.distractor, v.distractor + task.n_distractors))
    if task.rule == "latent":
        return np.asarray(pool, dtype=np.int32)
    active = set(active_triggers(task).tolist())
    pool += [t for t in range(v.trigger, v.trigger + task.n_trigger_tokens) if t not in active]
    return np.asarray(pool, dtype=np.int32)


def weight_table(task: TaskConfig) -> np.ndarray:
    """Per-token evidence weight, int32[vocab_size]."""
    v = vocab(task)
    w = np.zeros(v.size, dtype=np.int32)
    if task.rule == "latent":
        w[v.cue : v.cue + task.n_cues] = task.cue_weights
    else:
        w[active_triggers(task)] = 1
    return w


def threshold(task: TaskConfig) -> int:
    return {"single": 1, "k_triggers": 1, "conjunction": 2, "latent": task.latent_threshold}[task.rule]


def slot_evidence(task: TaskConfig, ctx):
    """Evidence contributed by each slot, int32[n_ctx]."""
    return jnp.asarray(weight_table(task))[ctx]


def evidence(task: TaskConfig, ctx):
    """Total evidence of a context, int32[]: summed weights (latent) or distinct active triggers."""
    if task.rule == "latent":
        return slot_evidence(task, ctx).sum()
    present = (ctx[:, None] == jnp.asarray(active_triggers(task))[None, :]).any(axis=0)
    return present.sum().astype(jnp.int32)


def fires(task: TaskConfig, ctx):
    """Whether the rule fires on this context, bool[]."""
    return evidence(task, ctx) >= threshold(task)


def _background(task: TaskConfig, key, n):
    return jax.random.choice(key, jnp.asarray(background_tokens(task)), (n,))


def _place(task: TaskConfig, key, ctx, tokens_to_place):
    """Put `tokens_to_place` (int32[m]) into m distinct random slots of ctx."""
    m = tokens_to_place.shape[0]
    slots = jax.random.permutation(key, task.n_ctx)[:m]
    return ctx.at[slots].set(tokens_to_place)


def sample_context(task: TaskConfig, key, want):
    """A context int32[n_ctx] on which the rule fires iff `want` (bool[]).

    For `latent`, N_CANDIDATES uniform contexts are drawn and the first with the wanted
    label is kept; if none has it (probability ~1e-6 at default settings) a non-matching
    one is returned, and the recomputed label says so.
    """
    k_bg, k_pick, k_place, k_case = jax.random.split(key, 4)
    v = vocab(task)
    if task.rule == "latent":
        pool = jnp.arange(v.cue, v.cue + task.n_cues)
        pool = jnp.concatenate([pool, jnp.asarray(background_tokens(task))])
        cands = jax.random.choice(k_bg, pool, (N_CANDIDATES, task.n_ctx))
        labels = jax.vmap(lambda c: fires(task, c))(cands)
        return cands[jnp.argmax(labels == want)]

    ctx = _background(task, k_bg, task.n_ctx)
    act = jnp.asarray(active_triggers(task))
    if task.rule == "conjunction":
        a, b = act[0], act[1]
        both = _place(task, k_place, ctx, jnp.stack([a, b]))
        one = _place(task, k_place, ctx, jax.random.choice(k_pick, act, (1,)))
        # not firing: none, A only or B only, equally likely (near misses teach the AND)
        neither_or_one = jnp.where(jax.random.bernoulli(k_case, 1 / 3), ctx, one)
        return jnp.where(want, both, neither_or_one)
    trig = jax.random.choice(k_pick, act, (1,))
    if task.rule == "single" and task.trigger_position == "fixed":
        fired = ctx.at[task.trigger_slot].set(trig[0])
    else:
        fired = _place(task, k_place, ctx, trig)
    return jnp.where(want, fired, ctx)
