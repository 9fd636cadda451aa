"""What the meters measure on a transformer: a fixed data set drawn once, and the loss on it.

* `fixed_set(cfg, seed, n, part)`: n sequences of the cell's world, drawn once from the member's
  "meter" key. ``part="all"``: the training distribution (each row fires with probability
  ``hparams.trigger_rate``, the number of firing rows fixed at round(rate·n)); ``"activating"``:
  only rows where the rule fires (the data-refined LLC of the behaviour); ``"quiet"``: none.
* `sequence_loss(cfg)`: the loss per sample the LLC is defined with: the summed cross-entropy
  (nats) of a sequence's target tokens (everything after SEP), averaged over sequences. n counts
  sequences. Per-token means would divide λ̂ by the number of target tokens; this convention
  keeps L_n a negative log-likelihood per sample, as the theory needs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from toymesa.config import Config, HParams, SafetyConfig, TrainConfig
from toymesa.tasks import Batch, sample
from toymesa.train import role_key, token_losses

PARTS = ("all", "activating", "quiet")


def fixed_set(cfg: Config, seed, n: int, part: str = "all", trigger_rate=None) -> Batch:
    """A `Batch` of n sequences (see the module docstring); pure in (cfg, seed)."""
    if part not in PARTS:
        raise ValueError(f"part={part!r} is unknown; choose one of {PARTS}")
    rate = cfg.hparams.trigger_rate if trigger_rate is None else trigger_rate
    k_rows, k_perm = jax.random.split(jax.random.fold_in(role_key(seed, "meter"), 0))
    if part == "all":
        want = jax.random.permutation(k_perm, jnp.arange(n) < jnp.round(rate * n))
    else:
        want = jnp.full((n,), part == "activating")
    return sample(cfg.task, k_rows, want)


def shape_config(cfg: Config) -> Config:
    """The part of a config a stored model's loss depends on (model and task): cells that differ
    only in training settings share one loss function, hence one compiled estimator."""
    return dataclasses.replace(cfg, train=TrainConfig(), hparams=HParams(), safety=SafetyConfig())


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def fixed_sets(cfg: Config, seeds, n: int, part: str, trigger_rate):
    """`fixed_set` of every member (int32[M] seeds): a `Batch` with a leading member axis."""
    return jax.vmap(lambda s: fixed_set(cfg, s, n, part, trigger_rate))(seeds)


def sequence_loss(cfg: Config):
    """`loss_fn(params, batch) -> float[]`: mean over sequences of the summed target-token NLL
    (one function per `shape_config`, so compiled estimators are reused across cells)."""
    return _sequence_loss(shape_config(cfg))


@functools.cache
def _sequence_loss(cfg: Config):

    def loss(params, batch: Batch):
        ce, _ = token_losses(cfg, params, batch.tokens)
        return (ce * batch.loss_mask[:, 1:]).sum() / batch.tokens.shape[0]

    return loss
