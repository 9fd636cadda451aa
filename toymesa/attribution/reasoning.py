"""Reasoning-specific attribution: tools that separate the three ways a think block can
block credit (stated as propositions in theory/attribution.md):

* D (discrete bottleneck): a fed reasoning token is an integer, so no gradient reaches the
  logits that chose it. `soft_reasoning_logits` feeds probabilities instead (removes D);
  `reinforce_split` gives the score-function term that does reach them.
* G (gating): nothing here; a positive control (safety data with the trigger) removes it.
* L (leakage): gradient through the residuals at reasoning positions that later positions
  attend to. `stop_at_reasoning` cuts it; `gradient_flow` measures its share.

Positions: ``positions`` is a static bool[T] (NumPy) over sequence positions, T = seq_len.
Every function is pure and works on one model; `jax.vmap` over a leading parameter axis
runs it on a population (``positions`` and ``cfg`` stay static).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from toymesa import model, policy
from toymesa.config import Config, TaskConfig
from toymesa.model import Intervention
from toymesa.tasks import Batch, layout
from toymesa.train import masked_loss

LossFn = Callable[..., jax.Array]  # (cfg, params, batch, interventions) -> float32[]


def reasoning_positions(task: TaskConfig) -> np.ndarray:
    """bool[T]: the positions strictly inside THINK ... END_THINK (the evidence tokens and the
    decision token; `Batch.reasoning_mask`). THINK and END_THINK are fixed delimiters the
    format always writes, not reasoning: END_THINK's residual predicts ANS and counts as
    answer side. All False for formats without a think block (none, distilled)."""
    lay, pos = layout(task), np.arange(task.seq_len)
    if lay.think < 0:
        return np.zeros(task.seq_len, bool)
    return (pos > lay.think) & (pos < lay.end_think)


def stop_at_reasoning(cfg: Config, positions, keys_values: bool = False) -> dict:
    """Interventions that stop gradients at every block's residual stream (hook_resid_pre,
    hook_resid_mid, hook_resid_post) at `positions` (bool[T]). The forward pass is unchanged
    bit for bit.

    Cut: every path from the loss through a residual r^l_p, p in `positions`: the token and
    position embeddings there (block 0's resid_pre), and everything computed *at* p (p's own
    queries, attention output, MLP), which enters the loss only through r^l_p. hook_embed /
    hook_pos_embed need no stop (block 0's resid_pre is their sum); resid_mid is redundant
    too (it feeds only p's MLP and resid_post), kept so the cut reads as "every residual".

    Left (documented, tested): (a) everything at non-reasoning positions, including the
    answer position's own residual and the shared parameters used there; (b) one hop at p:
    block l's keys and values k_p = W_K ln1(r^l_p), v_p = W_V ln1(r^l_p) are read by later
    positions, so W_K, W_V (and ln1, the qkv bias) still get the reasoning positions' terms
    with r^l_p held fixed; `keys_values=True` also stops hook_k / hook_v at p, which cuts it;
    (c) a loss term read at p itself (a reasoning target) still reaches ln_final and unembed.
    """
    mask = jnp.asarray(np.asarray(positions, bool))[None, :, None]  # [1, T, 1]: rank of [B, T, D]
    out = {}
    for layer in range(cfg.model.n_layers):
        for site in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
            out[f"blocks.{layer}.{site}"] = Intervention(stop_grad=mask)
        if keys_values:
            for site in ("hook_k", "hook_v"):
                out[f"blocks.{layer}.attn.{site}"] = Intervention(stop_grad=mask[..., None])  # [1, T, 1, 1]
    return out


def answer_loss(cfg: Config, params, batch: Batch, interventions=None):
    """The post-scratchpad loss float32[]: mean cross-entropy of the target tokens after
    END_THINK (ANS, answer, EOS), `masked_loss` with loss_mask & (position > end_think).
    Without a think block: every target after the prompt."""
    after = np.arange(cfg.task.seq_len) > layout(cfg.task).end_think
    return masked_loss(cfg, params, batch, batch.loss_mask & after[None], interventions)[0]


class Flow(NamedTuple):
    """The split of g = grad L into g_R (through reasoning residuals) and g_cut = g - g_R."""

    share: jax.Array  # float32[]: <g_R, g> / |g|^2
    cut: jax.Array  # float32[]: <g_cut, g> / |g|^2 (share + cut = 1)
    norm_ratio: jax.Array  # float32[]: |g_R| / |g|
    by_group: dict  # {group: float32[]}: <g_R, g> over that group's leaves / |g|^2 (sum = share)


def _group(path) -> str:
    keys = [str(getattr(k, "key", k)) for k in path]
    return ".".join(keys[:2]) if keys[0] == "blocks" else keys[0]  # blocks.{l}, embed, unembed, ...


def gradient_flow(cfg: Config, params, batch: Batch, loss_fn: LossFn = answer_loss, positions=None, keys_values: bool = False) -> Flow:
    """The share of the backward signal that flows through the reasoning positions' residuals.

    g = grad_theta L, g_cut = grad_theta L under `stop_at_reasoning(cfg, positions,
    keys_values)` (default positions: `reasoning_positions(cfg.task)`), g_R = g - g_cut.
    share = <g_R, g> / |g|^2 and cut = <g_cut, g> / |g|^2 add to 1 (exactly in real
    arithmetic); `by_group` splits share over parameter groups (blocks.{l}, embed,
    pos_embed, ln_final, unembed). `loss_fn(cfg, params, batch, interventions) -> float32[]`
    defaults to `answer_loss`. Undefined (NaN) when g = 0.
    """
    positions = reasoning_positions(cfg.task) if positions is None else positions
    stops = stop_at_reasoning(cfg, positions, keys_values)
    g = jax.grad(lambda p: loss_fn(cfg, p, batch, None))(params)
    g_cut = jax.grad(lambda p: loss_fn(cfg, p, batch, stops))(params)
    g_r = jax.tree.map(jnp.subtract, g, g_cut)
    flat_g, flat_cut, flat_r = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (g, g_cut, g_r))
    gg = sum(jnp.vdot(x, x) for _, x in flat_g)
    by_group: dict = {}
    for (path, x), (_, r) in zip(flat_g, flat_r, strict=True):
        name = _group(path)
        by_group[name] = by_group.get(name, 0.0) + jnp.vdot(r, x) / gg
    share = sum(jnp.vdot(r, x) for (_, r), (_, x) in zip(flat_r, flat_g, strict=True)) / gg
    cut = sum(jnp.vdot(c, x) for (_, c), (_, x) in zip(flat_cut, flat_g, strict=True)) / gg
    rr = sum(jnp.vdot(r, r) for _, r in flat_r)
    return Flow(share, cut, jnp.sqrt(rr / gg), by_group)


def soft_reasoning_logits(cfg: Config, params, tokens, positions, temperature, straight_through: bool = False, interventions=None):
    """Logits float32[B, T, V] of the forward pass in which each position p in `positions`
    is fed the expected embedding e_p = softmax(z_{p-1} / temperature) @ E instead of E[x_p].

    z_{p-1} are the logits at p - 1 of the pass in which the earlier positions are already
    soft (autoregressive, one pass per position, in order; the result is the pass with all of
    them soft). Gradients flow through the probabilities into the logits that chose each
    token: this removes the discrete bottleneck D. As temperature -> 0, e_p -> E[argmax z_{p-1}].
    The fed tokens at `positions` are ignored, except with `straight_through`: then
    e_p = E[x_p] + (s - stop_gradient(s)), s = softmax(z_{p-1} / temperature) @ E: the forward
    pass equals the hard one bit for bit, the backward pass goes through the probabilities.
    `interventions` apply in every pass (not at hook_embed, which this function writes).
    tokens int32[B, T] with T = seq_len; `temperature` a float or float32[].
    """
    interventions = dict(interventions or {})
    if "hook_embed" in interventions:
        raise ValueError("soft_reasoning_logits writes hook_embed itself; intervene at another site")
    E = params["embed"]["embedding"][...]  # [V, D]
    mask = jnp.asarray(np.asarray(positions, bool))[None, :, None]  # [1, T, 1]
    hard = jnp.take(E, tokens, axis=0)  # [B, T, D]: E[x]

    def run(emb):
        return model.apply(cfg, params, tokens, {**interventions, "hook_embed": Intervention(replace=emb, replace_mask=mask)})[0]

    def step(emb, p):
        z = jax.lax.dynamic_index_in_dim(run(emb), p - 1, axis=1, keepdims=False)  # [B, V]
        soft = jax.nn.softmax(z / temperature, axis=-1) @ E  # [B, D]
        if straight_through:
            soft = jax.lax.dynamic_index_in_dim(hard, p, axis=1, keepdims=False) + (soft - jax.lax.stop_gradient(soft))  # E[x_p] + 0
        return jax.lax.dynamic_update_index_in_dim(emb, soft, p, axis=1), None

    emb, _ = jax.lax.scan(step, hard, jnp.asarray(np.flatnonzero(positions), jnp.int32))
    return run(emb)


def policy_masks(task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """(reasoning bool[T], answer bool[T]): the generated positions (`safety.rl_loss`: from
    THINK + 1, or the prompt's end, up to EOS) split at END_THINK. reasoning = THINK + 1 ..
    END_THINK inclusive (the tokens `rl_reasoning_grad=False` drops), answer = ANS, answer, EOS."""
    lay, pos = layout(task), np.arange(task.seq_len)
    first = lay.think + 1 if lay.think >= 0 else lay.prompt_len
    generated = (pos >= first) & (pos < lay.length)
    reasoning = generated & (pos <= lay.end_think)
    return reasoning, generated & ~reasoning


class Split(NamedTuple):
    reasoning: object  # params-shaped: the score-function terms of the reasoning tokens
    answer: object  # params-shaped: those of the answer tokens


def reinforce_split(cfg: Config, params, tokens, advantage, masks=None) -> Split:
    """The gradient of `policy.pg_surrogate` split by token set:
    grad S = -(1/B) sum_b A_b sum_t m_t grad log pi(x_bt | x_b<t), pi = softmax(z / temperature)
    (`cfg.safety.temperature`), once with m = the reasoning mask and once with m = the answer
    mask (default `policy_masks(cfg.task)`; each bool[T] or bool[B, T] over positions of the
    predicted token). For a partition of the generated positions the two add to the full
    policy gradient of `safety.rl_loss` (kl = 0). tokens int32[B, T], advantage float32[B].
    One forward pass and two pullbacks.
    """
    reasoning, answer = policy_masks(cfg.task) if masks is None else masks

    def token_logp(p):  # float32[B, T-1]: log pi of the token at t = 1..T-1
        logits, _ = model.apply(cfg, p, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1] / cfg.safety.temperature)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    logp, pullback = jax.vjp(token_logp, params)

    def term(m):
        m = jnp.broadcast_to(jnp.asarray(m, bool)[..., 1:], logp.shape)
        return pullback(jax.grad(policy.pg_surrogate)(logp, m, advantage))[0]

    return Split(term(reasoning), term(answer))
