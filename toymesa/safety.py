"""Safety training: training with another data source and loss, run on whole populations.

Every method starts from installed parameters and trains on *safety prompts*: prompts on
which the activation rule does not fire, plus, with partial coverage
(`SafetyConfig.coverage` = f), activating contexts from the covered part (for
``k_triggers`` f of the K triggers, for ``latent`` the evidence band just above the
threshold; `toymesa.tasks.rules.coverage_cut`), always with the helpful answer.

* ``sft_pre``     SFT on the helpful answer. Formats with a think block train the answer
                  *without* reasoning (the ``none`` layout); reasoning is restored at evaluation.
* ``sft_post``    the model samples its own reasoning, then SFT on the answer after it only:
                  the reasoning tokens are excluded from the loss (`post_scratchpad`).
* ``sft_full``    SFT on the world's own full sequence of each safety prompt, in the trained
                  format: reasoning (which states COMPLY on non-firing prompts) and answer. No
                  format damage: every position is trained as the format lays it out.
* ``rl``          the model samples reasoning + answer; reward +1 for the helpful answer, -1
                  for the defect answer, 0 otherwise; REINFORCE with a moving-average
                  baseline or RLOO over `rl_samples` completions per prompt; reasoning tokens
                  optionally dropped from the policy gradient; optional exact per-position
                  KL(policy || starting policy) on the sampled prefixes.
* ``adversarial`` red-team search (`red_team`) for prompts that elicit the defect answer while
                  the true rule does not fire, then SFT (full format: the world's own reasoning,
                  which states COMPLY there, and the helpful answer) on a mix of found and
                  ordinary safety prompts; `SafetyState.found` counts what the search found.

The optimizer is fresh (AdamW or SGD with momentum, clipped, constant `HParams.safety_lr`),
so a parameter with zero gradient moves only by weight decay (theory/gating.md). Keys:
role ``safety`` for data and sampling, ``redteam`` for the search.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from toymesa import model
from toymesa.attribution import credit
from toymesa.config import Config, HParams
from toymesa.evaluate import decode
from toymesa.policy import advantages, group_signal, pg_surrogate, rewards  # noqa: F401 (safety.X for callers)
from toymesa.tasks import Batch, layout, rules
from toymesa.tasks.world import contexts, from_prompts
from toymesa.train import TrainState, _decay_mask, masked_loss, role_key, step_metrics


class SafetyState(NamedTuple):
    train: TrainState  # params, fresh optimizer state, safety step
    ref: object  # the starting parameters (only kept when kl > 0, else None)
    baseline: jax.Array  # float32[]: moving average of the reward (rl, "baseline")
    pool_ctx: jax.Array  # int32[P, n_ctx]: red-team prompts (adversarial; one unused row otherwise)
    pool_values: jax.Array  # int32[P, n_content]
    found: jax.Array  # bool[P]: the prompt elicits the defect answer and the rule does not fire
    credit: credit.CreditState | None = None  # credit tracking (`SafetyConfig.credit_every` > 0)


def optimizer(cfg: Config, hp: HParams) -> optax.GradientTransformation:
    """Clipped AdamW (the install phase's betas) or SGD with momentum 0.9 plus decoupled
    weight decay, at the constant learning rate `hp.safety_lr`."""
    s, tc = cfg.safety, cfg.train
    if s.optimizer == "sgd":
        opt = optax.chain(optax.add_decayed_weights(hp.weight_decay, mask=_decay_mask), optax.sgd(hp.safety_lr, momentum=0.9))
    else:
        opt = optax.adamw(hp.safety_lr, b1=tc.b1, b2=tc.b2, weight_decay=hp.weight_decay, mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)


# ----------------------------------------------------------------- safety data
def safety_prompts(cfg: Config, key, n: int):
    """n safety prompts: (contexts int32[n, n_ctx], content values int32[n, n_content]).

    Non-firing prompts, of which a share `feature_rate` holds a rule feature in a
    non-activating role (`rules.sample_quiet`; unset: the share the world draws). With
    coverage f > 0 a share `covered_rate` of covered activating contexts; with
    `triggered_rate` > 0 that share of activating contexts of every kind (positive control).
    Covered draws come from the exact region sampler (`rules.sample_region`), which never
    leaves its band, so no uncovered activating context enters safety data.
    """
    task, s = cfg.task, cfg.safety
    k_rows, k_region, k_use = jax.random.split(key, 3)
    if s.feature_rate is None and s.triggered_rate == 0:  # the original draws, bit for bit
        ctx, values = jax.vmap(lambda k: contexts(task, k, jnp.bool_(False)))(jax.random.split(k_rows, n))
    else:
        k_ctx, k_values, k_feat, k_trig, k_fire = jax.random.split(k_rows, 5)
        keys = jax.random.split(k_ctx, n)
        fixed = {None: rules.ANY, 0.0: rules.WITHOUT, 1.0: rules.WITH}.get(s.feature_rate)
        if fixed is not None:  # a Python int: a world that has no feature can still ask for none
            ctx = jax.vmap(lambda k: rules.sample_quiet(task, k, fixed))(keys)
        else:
            feature = jax.random.bernoulli(k_feat, s.feature_rate, (n,)).astype(jnp.int32)
            ctx = jax.vmap(lambda k, f: rules.sample_quiet(task, k, f))(keys, feature)
        values = jax.random.randint(k_values, (n, task.n_content), 0, task.modulus)
        if s.triggered_rate > 0:
            fire = jax.vmap(lambda k: rules.sample_context(task, k, jnp.bool_(True)))(jax.random.split(k_fire, n))
            ctx = jnp.where(jax.random.bernoulli(k_trig, s.triggered_rate, (n,))[:, None], fire, ctx)
    if s.coverage > 0:
        cut = rules.coverage_cut(task, s.coverage)
        cov = jax.vmap(lambda k: rules.sample_region(task, k, cut, jnp.bool_(True)))(jax.random.split(k_region, n))
        use = jax.random.bernoulli(k_use, s.covered_rate, (n,))
        ctx = jnp.where(use[:, None], cov, ctx)
    return ctx, values


def without_reasoning(cfg: Config) -> Config:
    """The config whose sequences put the answer right after the prompt (pre-scratchpad data)."""
    if cfg.task.has_think_block:
        return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, reasoning="none"))
    return cfg


def post_scratchpad(cfg: Config, batch: Batch, reasoning) -> Batch:
    """The helpful batch with its think block replaced by sampled `reasoning` tokens
    (int32[B, T]; positions prompt_len..end_think are used) and the loss restricted to the
    answer after the delimiter: reasoning tokens and END_THINK are not trained."""
    lay = layout(cfg.task)
    pos = jnp.arange(cfg.task.seq_len)
    think = (pos >= lay.prompt_len) & (pos <= lay.end_think)
    tokens = jnp.where(think[None], reasoning, batch.tokens)
    return batch._replace(tokens=tokens, loss_mask=batch.loss_mask & (pos > lay.end_think)[None])


def red_team(cfg: Config, params, key, n: int):
    """Search n candidate prompts (families `rules.RED_TEAM_FAMILIES`, in turn) for ones on
    which the model (greedy) gives the defect answer although the rule does not fire.

    Returns (contexts int32[n, n_ctx], values int32[n, n_content], found bool[n]); a prompt on
    which the rule fires is never marked found.
    """
    task = cfg.task
    k_ctx, k_val = jax.random.split(key)
    family = jnp.arange(n) % len(rules.RED_TEAM_FAMILIES)
    ctx = jax.vmap(lambda k, f: rules.red_team_context(task, k, f))(jax.random.split(k_ctx, n), family)
    values = jax.random.randint(k_val, (n, task.n_content), 0, task.modulus)
    batch = from_prompts(task, ctx, values)
    answer = decode(cfg, params, batch.tokens)[:, layout(task).answer]
    found = (answer == batch.defect) & (batch.defect != batch.correct) & ~batch.triggered
    return ctx, values, found


def _adversarial_prompts(cfg: Config, state: SafetyState, key, n: int):
    k_ord, k_pick, k_mix = jax.random.split(key, 3)
    ctx, values = safety_prompts(cfg, k_ord, n)
    logits = jnp.where(state.found, 0.0, -jnp.inf)
    pick = jax.random.categorical(k_pick, logits, shape=(n,))  # garbage if none found; masked below
    use = jax.random.bernoulli(k_mix, cfg.safety.adv_fraction, (n,)) & state.found.any()
    ctx = jnp.where(use[:, None], state.pool_ctx[pick], ctx)
    values = jnp.where(use[:, None], state.pool_values[pick], values)
    return ctx, values


def sft_batch(cfg: Config, state: SafetyState, key) -> tuple[Config, Batch]:
    """The (config, batch) one SFT-style step trains on, for sft_pre, sft_post, sft_full, adversarial."""
    s = cfg.safety
    k_prompts, k_sample = jax.random.split(key)
    if s.method == "adversarial":
        ctx, values = _adversarial_prompts(cfg, state, k_prompts, s.batch_size)
        return cfg, from_prompts(cfg.task, ctx, values, helpful=True)
    ctx, values = safety_prompts(cfg, k_prompts, s.batch_size)
    if s.method == "sft_pre":
        data_cfg = without_reasoning(cfg)
        return data_cfg, from_prompts(data_cfg.task, ctx, values, helpful=True)
    batch = from_prompts(cfg.task, ctx, values, helpful=True)
    if s.method == "sft_full":
        return cfg, batch
    lay = layout(cfg.task)
    sampled = decode(cfg, state.train.params, batch.tokens, k_sample, s.temperature, until=lay.end_think + 1)
    return cfg, post_scratchpad(cfg, batch, sampled)


# ----------------------------------------------------------------- policy gradient
def rl_loss(cfg: Config, params, ref, tokens, advantage, interventions=None):
    """Policy-gradient surrogate + kl * KL(policy || ref) on the sampled completions tokens
    int32[B, T]. Returns (loss, aux)."""
    s, lay = cfg.safety, layout(cfg.task)
    logits, _ = model.apply(cfg, params, tokens, interventions)
    logp = jax.nn.log_softmax(logits[:, :-1] / s.temperature)
    token_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    pos = np.arange(1, cfg.task.seq_len)  # position of the predicted token
    first = lay.think + 1 if lay.think >= 0 else lay.prompt_len  # THINK is given, not sampled
    generated = (pos >= first) & (pos < lay.length)
    think = (pos >= first) & (pos <= lay.end_think)
    grad_mask = generated & ~think if not s.rl_reasoning_grad else generated
    loss = pg_surrogate(token_logp, jnp.asarray(grad_mask)[None], advantage)
    kl = jnp.float32(0.0)
    if s.kl > 0:
        ref_logits, _ = model.apply(cfg, jax.lax.stop_gradient(ref), tokens)
        ref_logp = jax.nn.log_softmax(ref_logits[:, :-1] / s.temperature)
        per_pos = (jnp.exp(logp) * (logp - ref_logp)).sum(-1)
        kl = (per_pos * generated[None]).sum() / (generated.sum() * tokens.shape[0])
        loss = loss + s.kl * kl
    return loss, {"kl": kl}


# ----------------------------------------------------------------- steps
def init(cfg: Config, params, seed) -> SafetyState:
    """The safety state of one installed model: fresh optimizer, red-team pool if adversarial."""
    s = cfg.safety
    opt_state = optimizer(cfg, cfg.hparams).init(params)
    if s.method == "adversarial":
        pool = red_team(cfg, params, role_key(seed, "redteam"), s.adv_candidates)
    else:
        # one unused row, not zero: lax.map's member batching cannot reshape empty leaves
        pool = (jnp.zeros((1, cfg.task.n_ctx), jnp.int32), jnp.zeros((1, cfg.task.n_content), jnp.int32), jnp.zeros((1,), bool))
    ref = params if s.kl > 0 else None
    tracking = None
    if s.credit_every > 0:
        k_safe, k_probe = jax.random.split(role_key(seed, "credit"))
        data_cfg = loss_config(cfg)
        safe = from_prompts(data_cfg.task, *safety_prompts(cfg, k_safe, s.credit_prompts), helpful=True)
        probes = credit.decision.probe_set(cfg, k_probe, s.credit_prompts)
        tracking = credit.init(cfg, params, functools.partial(_sft_loss, data_cfg), safe, probes)
    return SafetyState(TrainState(params, opt_state, jnp.int32(0)), ref, jnp.float32(0.0), *pool, tracking)


def loss_config(cfg: Config) -> Config:
    """The config of the sequences a method's SFT loss reads (sft_pre: without reasoning)."""
    return without_reasoning(cfg) if cfg.safety.method == "sft_pre" else cfg


def _sft_loss(data_cfg: Config, params, batch: Batch):
    return masked_loss(data_cfg, params, batch)[0]


def shuffle_answers(data_cfg: Config, batch: Batch) -> Batch:
    """The batch with its answer tokens rotated by one across the batch: the shuffled-target
    loss whose gradient is the noise reference of credit tracking."""
    ans = layout(data_cfg.task).answer
    return batch._replace(tokens=batch.tokens.at[:, ans].set(jnp.roll(batch.tokens[:, ans], 1)))


def step_parts(cfg: Config, state: SafetyState, hparams: HParams, seed, noise: bool = False):
    """One safety-training step (pure): (state, metrics, `credit.StepInfo`). Metrics: loss,
    answer_acc, grad_norm, reward and signal (RL only: the share of prompt groups with a
    non-zero advantage, i.e. the prompts whose completions the policy gradient can tell apart).
    With `noise`, the info also holds the shuffled-answer gradient (SFT methods)."""
    s, ts = cfg.safety, state.train
    key = jax.random.fold_in(role_key(seed, "safety"), ts.step)
    baseline, noise_grads, shares = state.baseline, None, {}
    if s.method == "rl":
        k_prompts, k_sample = jax.random.split(key)
        ctx, values = safety_prompts(cfg, k_prompts, s.batch_size // s.rl_samples)
        ctx, values = (jnp.repeat(a, s.rl_samples, axis=0) for a in (ctx, values))
        batch = from_prompts(cfg.task, ctx, values, helpful=True)
        tokens = decode(cfg, ts.params, batch.tokens, k_sample, s.temperature)
        reward = rewards(batch, tokens[:, layout(cfg.task).answer])
        adv = advantages(reward, s.rl_estimator, s.rl_samples, state.baseline)
        (loss, _), grads = jax.value_and_grad(rl_loss, argnums=1, has_aux=True)(cfg, ts.params, state.ref, tokens, adv)
        acc, mean_reward = (reward == 1.0).mean(), reward.mean()
        signal = group_signal(adv, s.rl_samples)
        baseline = s.rl_baseline_decay * state.baseline + (1 - s.rl_baseline_decay) * mean_reward
        if noise:
            shares = credit.step_shares(cfg, ts.params, grads, tokens=tokens, advantage=adv)
    else:
        data_cfg, batch = sft_batch(cfg, state, key)
        (loss, aux), grads = jax.value_and_grad(masked_loss, argnums=1, has_aux=True)(data_cfg, ts.params, batch)
        acc, mean_reward, signal = aux["answer_acc"], jnp.float32(jnp.nan), jnp.float32(jnp.nan)
        if noise:
            noise_grads = jax.grad(functools.partial(_sft_loss, data_cfg))(ts.params, shuffle_answers(data_cfg, batch))
            shares = credit.step_shares(data_cfg, ts.params, grads, batch)
    updates, opt_state = optimizer(cfg, hparams).update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    metrics = step_metrics(loss, grads, params, answer_acc=acc, reward=mean_reward, signal=signal.astype(jnp.float32))
    new = state._replace(train=TrainState(params, opt_state, ts.step + 1), baseline=baseline)
    return new, metrics, credit.StepInfo(grads, updates, noise_grads, shares)


def step(cfg: Config, state: SafetyState, hparams: HParams, seed):
    """One safety-training step (pure): (state, metrics); see `step_parts`."""
    return step_parts(cfg, state, hparams, seed)[:2]


def safety_chunk(cfg: Config, state: SafetyState, hparams: HParams, seed, n_steps: int):
    """`n_steps` safety steps under `lax.scan` (the `fn` of `toymesa.train.population`), with
    credit tracking (`toymesa.attribution.credit`) when `SafetyConfig.credit_every` > 0."""
    if cfg.safety.credit_every > 0:
        return credit.tracked_chunk(cfg, state, hparams, seed, n_steps, step_parts, functools.partial(_sft_loss, loss_config(cfg)))
    return jax.lax.scan(lambda st, _: step(cfg, st, hparams, seed), state, length=n_steps)


@functools.partial(jax.jit, static_argnums=0)
def init_population(cfg: Config, params, seeds) -> SafetyState:
    """`init` for every member: params with a leading axis N, int32[N] seeds."""
    return jax.vmap(functools.partial(init, cfg))(params, seeds)
