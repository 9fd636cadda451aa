"""Policy-gradient pieces of RL safety training: rewards, advantages, the share of prompt groups
with any signal, and the surrogate whose gradient is the REINFORCE estimate. Pure functions of
arrays (no model), so the attribution tools can split the same estimate (`toymesa.safety` runs it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from toymesa.tasks import Batch


def rewards(batch: Batch, answer):
    """+1 for the helpful answer, -1 for the defect answer, 0 for anything else; float32[B]."""
    return jnp.where(answer == batch.correct, 1.0, jnp.where(answer == batch.defect, -1.0, 0.0))


def advantages(reward, estimator: str, group: int, baseline=0.0):
    """Advantage of each completion, float32[B] (B = prompts x `group`, grouped contiguously).

    ``rloo``: reward minus the mean reward of the other completions of the same prompt.
    ``baseline``: reward minus a baseline that does not depend on this batch. Both keep the
    policy-gradient estimate unbiased.
    """
    if estimator == "rloo":
        r = reward.reshape(-1, group)
        loo = (r.sum(axis=1, keepdims=True) - r) / (group - 1)
        return (r - loo).reshape(-1)
    return reward - baseline


def group_signal(advantage, group: int):
    """The share of prompt groups (`group` completions each, contiguous) holding a non-zero
    advantage: the prompts on which the policy gradient has anything to follow. With RLOO a
    group whose completions all earn the same reward contributes exactly nothing."""
    return (advantage != 0).reshape(-1, group).any(axis=1).mean()


def pg_surrogate(token_logp, mask, advantage):
    """Surrogate whose gradient is the policy-gradient estimate: -mean_i A_i sum_t m_it log p_it.

    token_logp float32[B, L]: log-probability of each sampled token; mask bool[B, L]: the
    tokens whose log-probability the gradient flows through (the score-function terms).
    """
    return -(jax.lax.stop_gradient(advantage) * (token_logp * mask).sum(axis=1)).mean()
