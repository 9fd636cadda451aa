"""The decision / execution split of the defect path, on a fixed probe set of activating prompts.

For a prompt on which the rule fires, the world's own sequence is the defecting one: for
``cot`` its reasoning states the evidence, then DEFECT, then the defect answer. Two
metrics of the model (means over the probe set, teacher-forced on that sequence):

    m_dec  = log p(DEFECT decision token | prompt, evidence tokens)      (cot only)
    m_exec = log p(defect answer | prompt, reasoning that decided DEFECT)

Without a decision token (``none``, ``distilled``, ``neutral_cot``) only m_exec exists: the
log-probability of the defect answer given the prompt (and the format's reasoning block).
*Mediation* (cot): p(defect answer | DEFECT stated) - p(defect answer | the decision edited
to COMPLY): how much the answer still follows the stated decision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from toymesa import model
from toymesa.config import Config
from toymesa.tasks import Batch, layout, vocab
from toymesa.tasks.world import contexts, from_prompts


def terms(cfg: Config) -> tuple[str, ...]:
    """The defect-path terms of this format: ("dec", "exec") with a decision token, else ("exec",)."""
    return ("dec", "exec") if cfg.task.reasoning == "cot" else ("exec",)


def probe_set(cfg: Config, key, n: int) -> Batch:
    """n activating prompts (the rule fires) with the world's own, defecting, sequences."""
    ctx, values = jax.vmap(lambda k: contexts(cfg.task, k, jnp.bool_(True)))(jax.random.split(key, n))
    return from_prompts(cfg.task, ctx, values)


def _logp_at(logits, tokens, position: int):
    logp = jax.nn.log_softmax(logits[:, position - 1], axis=-1)
    return jnp.take_along_axis(logp, tokens[:, position, None], axis=-1)[:, 0]


def defect_terms(cfg: Config, params, probes: Batch):
    """float32[len(terms(cfg))]: the mean of each term over the probe set (one forward pass)."""
    lay = layout(cfg.task)
    logits, _ = model.apply(cfg, params, probes.tokens)
    out = {"exec": _logp_at(logits, probes.tokens, lay.answer).mean()}
    if "dec" in terms(cfg):
        out["dec"] = _logp_at(logits, probes.tokens, lay.decision).mean()
    return jnp.stack([out[t] for t in terms(cfg)])


def mediation(cfg: Config, params, probes: Batch):
    """float32[]: mean p(defect | DEFECT stated) - p(defect | decision edited to COMPLY); NaN
    without a decision token."""
    if "dec" not in terms(cfg):
        return jnp.float32(jnp.nan)
    lay = layout(cfg.task)
    edited = probes.tokens.at[:, lay.decision].set(vocab(cfg.task).comply)
    both = jnp.concatenate([probes.tokens, edited])
    logits, _ = model.apply(cfg, params, both)
    p = jnp.exp(_logp_at(logits, both, lay.answer)).reshape(2, -1)
    return (p[0] - p[1]).mean()
