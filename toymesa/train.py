"""Training: init, a pure train step, `lax.scan` over steps, `vmap` over a population.

* `init(cfg, seed) -> TrainState`
* `train_step(cfg, state, batch, hparams) -> (state, metrics)`   pure; loss masked to targets
* `train_chunk(cfg, state, hparams, seed, n_steps)`               scan; data drawn inside
* `run(cfg, seed, hparams, steps)`                                 init + one chunk
* `population(cfg, seeds, hparams, ...)`                           vmap over members, chunked
  in Python only to show progress and to keep finished work; chunks compose exactly
  (two chunks of 100 steps equal one of 200).

PRNG keys have roles (`role_key`): init, data, dropout, sample, eval. Each is derived
from the member's integer seed with `fold_in`, and the data key of step s is
``fold_in(role_key(seed, "data"), s)``, so a run is a pure function of (cfg, seed, hparams).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from toymesa import model
from toymesa.config import Config, HParams, TrainConfig, check_hparams
from toymesa.devices import to_host
from toymesa.tasks import Batch, sample_batch

ROLES = ("init", "data", "dropout", "sample", "eval", "safety", "redteam", "show", "meter", "credit", "attribute")  # append only: an index is a key


def role_key(seed, role: str):
    """The PRNG key of one role for one member; `seed` is an int (or int32[] tracer)."""
    return jax.random.fold_in(jax.random.key(seed), ROLES.index(role))


class TrainState(NamedTuple):
    params: object  # nnx.State of the model parameters
    opt_state: optax.OptState
    step: jax.Array  # int32[]


def all_finite(tree) -> jax.Array:
    """bool[]: every element of every leaf of `tree` is finite (no NaN, no inf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def step_metrics(loss, grads, params, **aux) -> dict:
    """The metrics every training step reports: loss, gradient norm, ``finite`` (loss, gradient
    norm and the new parameters all finite: a member that fails it has broken down), and `aux`."""
    grad_norm = optax.tree.norm(grads)
    return {"loss": loss, "grad_norm": grad_norm, "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params), **aux}


def _decay_mask(params):
    # decay matrices (embeddings, projections), not biases or LayerNorm scales
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def lr_unit(tc: TrainConfig):
    """The learning-rate schedule as a fraction of the peak: linear warmup over `tc.warmup`
    steps, then cosine decay to `end_lr_fraction`."""
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, tc.warmup, tc.steps, end_value=tc.end_lr_fraction)


def optimizer(tc: TrainConfig, hp: HParams) -> optax.GradientTransformation:
    """Clipped AdamW with linear warmup and cosine decay to `end_lr_fraction` of `hp.lr`.

    Built inside the traced step from (possibly traced) `hp`; its state's structure does
    not depend on hp's values, so one compiled program serves every swept value.
    """
    unit = lr_unit(tc)

    def schedule(count):
        return hp.lr * unit(count)

    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=hp.weight_decay, mask=_decay_mask),
    )


def init(cfg: Config, seed) -> TrainState:
    params = model.init_params(cfg, role_key(seed, "init"))
    opt_state = optimizer(cfg.train, cfg.hparams).init(params)
    return TrainState(params, opt_state, jnp.int32(0))


def token_losses(cfg: Config, params, tokens, interventions=None):
    """Per-token cross-entropy float32[B, T-1] of predicting tokens[:, 1:], and the logits."""
    logits, _ = model.apply(cfg, params, tokens, interventions)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return ce, logits


def masked_loss(cfg: Config, params, batch: Batch, mask=None, interventions=None):
    """Mean cross-entropy over target tokens: sum(ce * m) / sum(m), m = mask[:, 1:].

    `mask` (bool[B, T]) defaults to `batch.loss_mask`; prompt positions never count.
    """
    mask = batch.loss_mask if mask is None else mask
    ce, logits = token_losses(cfg, params, batch.tokens, interventions)
    m = mask[:, 1:].astype(ce.dtype)
    loss = (ce * m).sum() / jnp.maximum(m.sum(), 1.0)
    answer_pred = jnp.argmax(logits[:, :-1], axis=-1)
    ans = batch.answer_mask[:, 1:]
    acc = ((answer_pred == batch.tokens[:, 1:]) & ans).sum() / ans.sum()
    return loss, {"answer_acc": acc}


def train_step(cfg: Config, state: TrainState, batch: Batch, hparams: HParams):
    """One AdamW step on the masked loss. Returns (new state, metrics dict of scalars)."""
    (loss, aux), grads = jax.value_and_grad(masked_loss, argnums=1, has_aux=True)(cfg, state.params, batch)
    updates, opt_state = optimizer(cfg.train, hparams).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1), step_metrics(loss, grads, params, **aux)


def train_chunk(cfg: Config, state: TrainState, hparams: HParams, seed, n_steps: int):
    """`n_steps` train steps under `lax.scan`, batches drawn inside from the data key.

    Returns (state, history) with history[name] of shape [n_steps].
    """
    data_key = role_key(seed, "data")

    def body(st, _):
        batch = sample_batch(cfg.task, jax.random.fold_in(data_key, st.step), hparams.trigger_rate, cfg.train.batch_size)
        return train_step(cfg, st, batch, hparams)

    return jax.lax.scan(body, state, length=n_steps)


def run(cfg: Config, seed, hparams: HParams | None = None, steps: int | None = None):
    """Train one model from scratch: (final TrainState, history dict of float[steps])."""
    hp = cfg.hparams if hparams is None else hparams
    return train_chunk(cfg, init(cfg, seed), hp, seed, cfg.train.steps if steps is None else steps)


# ------------------------------------------------------------------ populations
@functools.partial(jax.jit, static_argnums=0)
def init_population(cfg: Config, seeds):
    """TrainState with a leading population axis N, from int32[N] seeds."""
    return jax.vmap(functools.partial(init, cfg))(seeds)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7), donate_argnums=1)
def population_chunk(cfg: Config, states, hparams: HParams, seeds, n_steps: int, member_batch: int | None = None, mesh=None, fn=None):
    """`fn` (default `train_chunk`) for every member of the population axis of states,
    hparams and seeds. `fn(cfg, state, hparams, seed, n_steps) -> (state, history)`.

    With `member_batch`, members run `member_batch` at a time (`lax.map`), each group for all
    `n_steps` before the next, so a group's parameters and optimizer state stay in cache;
    without it, all members at once (`vmap`). With a `mesh`, each device does this for its
    own members (`shard_map`; a plain loop over a sharded axis would run devices in turn).
    """
    run = functools.partial(train_chunk if fn is None else fn, cfg, n_steps=n_steps)

    def local(states, hparams, seeds):
        if member_batch is None or member_batch >= seeds.shape[0]:
            return jax.vmap(run)(states, hparams, seeds)
        return jax.lax.map(lambda a: run(*a), (states, hparams, seeds), batch_size=member_batch)

    if mesh is None:
        return local(states, hparams, seeds)
    spec = jax.sharding.PartitionSpec(mesh.axis_names[0])
    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)(states, hparams, seeds)


def default_member_batch() -> int | None:
    """4 members at a time on CPU (measured best for the reference model on 2 cores: 1.2x
    over all at once at 64 members; README, Performance); all at once on accelerators."""
    return 4 if jax.devices()[0].platform == "cpu" else None


def stack_hparams(cfg: Config, n: int, **values) -> HParams:
    """HParams with arrays [n]: `cfg.hparams` broadcast, overridden by `values` (scalars or [n])."""
    hp = check_hparams(cfg.hparams._replace(**values))  # check before rounding to float32
    return HParams(*(jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,)) for v in hp))


def population(
    cfg: Config,
    seeds,
    hparams: HParams | None = None,
    steps: int | None = None,
    chunk: int = 100,
    progress: str | None = None,
    on_chunk=None,
    member_batch: int | str | None = "auto",
    states=None,
    fn=None,
):
    """Train a population: members differ in seed and in the (stacked) hparams.

    seeds int[N]; hparams fields float[N] (default: `cfg.hparams` for all). Runs `steps`
    steps in chunks of `chunk` (one compile for all chunks of that length). `progress`,
    if given, labels a progress bar; `on_chunk(states, steps_done, history_chunk)` is called
    after each chunk. `member_batch` (see `population_chunk`; "auto": `default_member_batch`)
    changes speed, not results beyond float rounding. Seeds and hparams may be sharded over devices (see `toymesa.devices`);
    the states follow their sharding. `states` (default: fresh models) and `fn` (default
    `train_chunk`) let other training phases reuse this driver (`toymesa.safety`). Returns
    (states with leading axis N, history dict of float[N, steps] NumPy arrays).
    """
    seeds = jnp.asarray(seeds, jnp.int32)
    n = seeds.shape[0]
    if hparams is None:
        hp = stack_hparams(cfg, n)
    else:
        if all(getattr(v, "is_fully_addressable", True) for v in hparams):  # sharded over hosts: checked where it was built
            check_hparams(hparams)  # before converting: a string must not reach JAX
        hp = HParams(*(jnp.asarray(v, jnp.float32) for v in hparams))
    for name, v in zip(HParams._fields, hp, strict=True):
        if v.shape != (n,):
            raise ValueError(f"hparams.{name} has shape {v.shape}; a population of {n} seeds needs shape ({n},)")
    steps = cfg.train.steps if steps is None else steps
    states = init_population(cfg, seeds) if states is None else states
    mesh = None
    if isinstance(seeds.sharding, jax.sharding.NamedSharding):
        # constants (zero biases, Adam's moments) come out replicated: split every leaf like the seeds
        states = jax.device_put(states, seeds.sharding)
        mesh = seeds.sharding.mesh
    member_batch = default_member_batch() if member_batch == "auto" else member_batch
    hist = []
    bar = _progress(progress, steps, n)
    done = 0
    while done < steps:
        k = min(chunk, steps - done)
        states, h = population_chunk(cfg, states, hp, seeds, k, member_batch, mesh, fn)
        h = {key: to_host(v) for key, v in h.items()}
        hist.append(h)
        done += k
        if on_chunk is not None:
            on_chunk(states, done, h)
        if bar is not None:
            bar.update(k)
            bar.set_postfix(loss=f"{float(np.mean(h['loss'][:, -1])):.3f}")
    if bar is not None:
        bar.close()
    history = {key: np.concatenate([h[key] for h in hist], axis=1) for key in hist[0]}
    return states, history


def _progress(label, steps, n):
    if label is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"{label} ({n} seeds)", unit="step", leave=False)
