"""Credit tracking: training-path attribution computed inside the safety-training scan.

Loss-change allocation (Lan et al. 2019) for each tracked metric m (the safety loss on a fixed
set of safety prompts, and the defect-path terms of `decision`), with no checkpoints stored:

    ΔM = Σ_s ⟨θ_{s+1} - θ_s, ½ (∇m(θ_s) + ∇m(θ_{s+1}))⟩,      residual = m(θ_T) - m(θ_0) - ΔM,

summed over tracked points s every `credit_every` = k safety steps (and the end of every
compiled chunk). The trapezoid rule is exact for quadratic m; otherwise the residual is
O(‖θ_{s+1} - θ_s‖³) per interval, so it grows with k: it is recorded, never hidden. ΔM splits
exactly by parameter group (`group_names`) and by term. At each tracked point s the first safety
step of the interval also gives the alignments

    cos(-g_safe, ∇m),  cos(Δθ_update, ∇m),  cos(-g_shuffled, ∇m)

with g_safe the step's minibatch gradient at θ_s, the update the optimizer's actual step, and
g_shuffled the gradient of the same loss with its answers shuffled across the batch (the noise
reference; SFT methods only, NaN for RL).

History keys (arrays over steps, NaN off the tracked steps): ``credit.{term}`` m(θ),
``credit.{term}.dM.{group}`` ΔM accumulated since θ_0, ``credit.{term}.residual``,
``credit.{term}.cos_grad`` / ``.cos_update`` / ``.cos_noise``, ``credit.mediation`` (cot),
``credit.share.{name}`` (`step_shares` of the interval's first step: gradient flow through
reasoning positions, token-group and REINFORCE splits).
Terms: ``safe`` plus `decision.terms`. Tracking never changes training: the safety step,
its data and keys are the same with and without it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from toymesa.attribution import decision, gradients, reasoning
from toymesa.config import Config
from toymesa.tasks import Batch, layout
from toymesa.train import masked_loss


class StepInfo(NamedTuple):
    """What one safety step exposes to credit tracking (returned by `toymesa.safety.step_parts`)."""

    grads: object  # the minibatch gradient at the step's starting parameters
    updates: object  # the optimizer's update (θ_{t+1} - θ_t)
    noise_grads: object  # gradient of the same loss with shuffled answers (None: not defined)
    shares: dict  # {name: float32[]}: `step_shares` of the step's gradient


class CreditState(NamedTuple):
    safe: Batch  # fixed safety prompts (helpful sequences in the safety data's format)
    probes: Batch  # fixed activating prompts (defecting sequences)
    params: object  # θ at the last tracked point
    grads: object  # float32[n_terms, ...] leaves: ∇m of every term there
    value0: jax.Array  # float32[n_terms]: m(θ_0)
    dM: jax.Array  # float32[n_terms, n_groups]: ΔM accumulated since θ_0


def group_names(cfg: Config) -> tuple[str, ...]:
    layers = range(cfg.model.n_layers)
    mlp = () if cfg.model.attn_only else tuple(f"mlp{i}" for i in layers)
    return ("embed", *(f"attn{i}" for i in layers), *mlp, "norm", "unembed")


def _group_of(path) -> str:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if keys[0] in ("embed", "pos_embed"):
        return "embed"
    if keys[0] == "unembed":
        return "unembed"
    if keys[0] == "blocks" and keys[2] in ("attn", "mlp"):
        return f"{keys[2]}{keys[1]}"
    return "norm"  # ln1, ln2, ln_final


def group_index(cfg: Config, params) -> list[int]:
    """The group (index into `group_names`) of every parameter leaf, in leaf order."""
    names = group_names(cfg)
    return [names.index(_group_of(path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def grouped_dot(cfg: Config, a, b):
    """float32[n_groups]: ⟨a, b⟩ restricted to each parameter group (pytrees like params)."""
    idx = group_index(cfg, a)
    dots = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return jnp.stack([sum((d for d, i in zip(dots, idx, strict=True) if i == g), jnp.float32(0)) for g in range(len(group_names(cfg)))])


def interval_dM(cfg: Config, delta, g_old, g_new):
    """float32[n_groups]: the trapezoid credit ⟨Δθ, ½(∇m(θ_s) + ∇m(θ_{s+1}))⟩ of one interval, by group."""
    return grouped_dot(cfg, delta, jax.tree.map(lambda a, b: (a + b) / 2, g_old, g_new))


def share(part, whole):
    """⟨part, whole⟩ / ‖whole‖²: the share of `whole` that `part` carries (shares of a partition add to 1)."""
    return optax.tree.vdot(part, whole) / jnp.maximum(optax.tree.vdot(whole, whole), 1e-30)


def step_shares(data_cfg: Config, params, grads, batch: Batch | None = None, tokens=None, advantage=None) -> dict:
    """Where one safety step's gradient comes from, as shares of it (each ⟨part, g⟩/‖g‖²):

    * SFT on sequences with a think block: ``flow`` (the part through the reasoning positions'
      residuals, `reasoning.gradient_flow`) and ``tokens_reasoning`` / ``tokens_answer`` (the
      gradients of the loss terms at reasoning / answer targets, `gradients.token_group_grads`;
      with the other targets they add to the whole);
    * RL (`tokens`, `advantage`): ``pg_reasoning`` / ``pg_answer``, the score-function terms of
      the reasoning and answer tokens (`reasoning.reinforce_split`; with the KL term they add to 1).
    Empty for SFT without a think block (nothing to split)."""
    if tokens is not None:
        split = reasoning.reinforce_split(data_cfg, params, tokens, advantage)
        return {"pg_reasoning": share(split.reasoning, grads), "pg_answer": share(split.answer, grads)}
    lay = layout(data_cfg.task)
    if lay.think < 0:
        return {}
    flow = reasoning.gradient_flow(data_cfg, params, batch, lambda c, p, b, iv: masked_loss(c, p, b, None, iv)[0])
    pos = np.arange(data_cfg.task.seq_len)
    groups = np.stack([(pos > lay.think) & (pos <= lay.end_think), pos > lay.end_think])
    g = gradients.token_group_grads(data_cfg, params, batch, jnp.asarray(groups))
    parts = [jax.tree.map(lambda x, i=i: x[i], g) for i in range(2)]
    return {"flow": flow.share, "tokens_reasoning": share(parts[0], grads), "tokens_answer": share(parts[1], grads)}


def cosine(a, b):
    """cos of the angle between two pytrees (0 when either is zero)."""
    ab, na, nb = optax.tree.vdot(a, b), optax.tree.norm(a), optax.tree.norm(b)
    return jnp.where((na > 0) & (nb > 0), ab / jnp.maximum(na * nb, 1e-30), 0.0)


def term_names(cfg: Config) -> tuple[str, ...]:
    return ("safe", *decision.terms(cfg))


def terms_and_grads(cfg: Config, safe_loss, params, probes: Batch, safe: Batch):
    """(float32[n_terms] values, ∇ of each: leaves [n_terms, ...]); one forward per data set, and
    one backward per term through its own data set only."""
    v_safe, g_safe = jax.value_and_grad(safe_loss)(params, safe)
    terms, vjp = jax.vjp(lambda p: decision.defect_terms(cfg, p, probes), params)
    (g_terms,) = jax.vmap(vjp)(jnp.eye(terms.shape[0], dtype=terms.dtype))
    grads = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), g_safe, g_terms)
    return jnp.concatenate([v_safe[None], terms]), grads


def init(cfg: Config, params, safe_loss, safe: Batch, probes: Batch) -> CreditState:
    """The tracking state at θ_0. `safe_loss(params, batch) -> float32[]` is the safety loss."""
    v, g = terms_and_grads(cfg, safe_loss, params, probes, safe)
    return CreditState(safe, probes, params, g, v, jnp.zeros((v.shape[0], len(group_names(cfg))), jnp.float32))


def track(cfg: Config, c: CreditState, params, safe_loss, first: StepInfo):
    """Close the interval θ_s -> params: (new CreditState, {history key: float32[]}).
    `first` is the first safety step of the interval (taken at θ_s)."""
    v, g = terms_and_grads(cfg, safe_loss, params, c.probes, c.safe)
    delta = jax.tree.map(lambda new, old: new - old, params, c.params)
    names, groups = term_names(cfg), group_names(cfg)
    out = {"credit.mediation": decision.mediation(cfg, params, c.probes)}
    dM = []
    for i, t in enumerate(names):
        g_old, g_new = (jax.tree.map(lambda x, i=i: x[i], tree) for tree in (c.grads, g))
        dM.append(c.dM[i] + interval_dM(cfg, delta, g_old, g_new))
        out[f"credit.{t}"] = v[i]
        out.update({f"credit.{t}.dM.{name}": dM[i][j] for j, name in enumerate(groups)})
        out[f"credit.{t}.residual"] = v[i] - c.value0[i] - dM[i].sum()
        out[f"credit.{t}.cos_grad"] = cosine(jax.tree.map(jnp.negative, first.grads), g_old)
        out[f"credit.{t}.cos_update"] = cosine(first.updates, g_old)
        noise = jnp.float32(jnp.nan) if first.noise_grads is None else cosine(jax.tree.map(jnp.negative, first.noise_grads), g_old)
        out[f"credit.{t}.cos_noise"] = noise
    out.update({f"credit.share.{k}": v for k, v in first.shares.items()})
    return c._replace(params=params, grads=g, dM=jnp.stack(dM)), out


def tracked_chunk(cfg: Config, state, hparams, seed, n_steps: int, step_parts, safe_loss):
    """`n_steps` safety steps with credit tracking every `cfg.safety.credit_every` steps and at the
    end. `step_parts(cfg, state, hparams, seed, noise) -> (state, metrics, StepInfo)`; `state.credit` is
    the CreditState. Returns (state, history) like `toymesa.safety.safety_chunk`, with the
    credit keys NaN except on the last step of each tracked interval."""
    k = cfg.safety.credit_every

    def interval(st, length: int):
        st, m0, first = step_parts(cfg, st, hparams, seed, noise=True)
        st, ms = jax.lax.scan(lambda s, _: step_parts(cfg, s, hparams, seed)[:2], st, length=length - 1)
        metrics = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), m0, ms)
        credit, rec = track(cfg, st.credit, st.train.params, safe_loss, first)
        return st._replace(credit=credit), (metrics, rec)

    def spread(rec, length):  # record at the last step of each interval: [n, length], NaN before
        return jax.tree.map(lambda r: jnp.concatenate([jnp.full((*r.shape, length - 1), jnp.nan, r.dtype), r[..., None]], axis=-1), rec)

    q, r = divmod(n_steps, k)
    parts = []
    if q:
        state, (m, rec) = jax.lax.scan(lambda s, _: interval(s, k), state, length=q)
        parts.append({**m, **spread(rec, k)})
        parts[-1] = jax.tree.map(lambda x: x.reshape(-1), parts[-1])
    if r:
        state, (m, rec) = interval(state, r)
        parts.append({**m, **jax.tree.map(lambda x: x[0], spread(jax.tree.map(lambda x: x[None], rec), r))})
    return state, {key: jnp.concatenate([p[key] for p in parts]) for key in parts[0]}


def share_names(cfg: Config) -> tuple[str, ...]:
    """The `step_shares` this config records."""
    s = cfg.safety
    if s.method == "rl":
        return ("pg_reasoning", "pg_answer")
    has_think = cfg.task.has_think_block and s.method != "sft_pre"
    return ("flow", "tokens_reasoning", "tokens_answer") if has_think else ()


def history_keys(cfg: Config) -> list[str]:
    """Every credit history key of this config, in a stable order."""
    keys = ["credit.mediation", *(f"credit.share.{k}" for k in share_names(cfg))]
    for t in term_names(cfg):
        keys += [f"credit.{t}", *(f"credit.{t}.dM.{g}" for g in group_names(cfg)), f"credit.{t}.residual"]
        keys += [f"credit.{t}.{c}" for c in ("cos_grad", "cos_update", "cos_noise")]
    return keys
