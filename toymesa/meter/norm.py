"""Parameter norms with the model's rescaling symmetries removed, the norm at a fixed logit
margin, and the critical weight decay: the Gaussian-prior (MAP) half of a two-part code.

* `l2(params)`                       raw Σ w² over every parameter (for contrast)
* `balanced_norm(cfg, params)`       Σ w² minimised over the attention rescalings, LayerNorm-invariant
                                     parts reported apart -> dict of float[] (`PARTS`, total, ...)
* `balance(cfg, params)` / `rescale_heads(cfg, params, qk, vo)`   the minimising point / the symmetry
* `chain_balanced(a)`, `nuclear_product(a, b)`   the two closed forms used per head
* `answer_margins`, `margin_norm(cfg, params, batch, margin)`    the norm at a fixed margin, efficiency
* `critical_weight_decay(cfg, seeds, decays)`    the largest decay that still installs (or keeps) a behaviour

Axes: H heads, D d_model, Dh d_head, V vocabulary, B batch, L factors, S seeds, K decays.
"Norm" means the *squared* Frobenius norm (a sum of squares) unless a square root is written.
Everything except `critical_weight_decay` is a pure JAX function of one model's parameters;
`jax.vmap(functools.partial(balanced_norm, cfg))(params)` measures a population.

**Symmetries removed** (exact: the model computes the same function; `tests/test_meter_norm.py`):

* per head h, W_Q→cW_Q, W_K→W_K/c. The q bias scales with W_Q and the k bias with W_K, so the
  groups are Q̃_h = [W_Q^h; b_Q^h] and K̃_h = [W_K^h; b_K^h] ([D+1, Dh]). The minimum over c > 0 of
  c²‖Q̃‖² + ‖K̃‖²/c² is 2‖Q̃‖‖K̃‖ at c² = ‖K̃‖/‖Q̃‖ (``symmetry="scale"``).
* per head h, W_V→cW_V (with b_V), W_O^h→W_O^h/c (the head's Dh rows of `attn.out.kernel`):
  2‖Ṽ_h‖‖W_O^h‖. The out bias is shared by all heads and belongs to no group.
* ``symmetry="linear"`` removes the larger exact group GL(Dh) per head (Q̃→Q̃G, K̃→K̃G⁻ᵀ;
  Ṽ→ṼG, W_O→G⁻¹W_O): min ‖Q̃G‖² + ‖K̃G⁻ᵀ‖² = 2‖Q̃K̃ᵀ‖_* (nuclear norm; Srebro, Rennie & Jaakkola
  2005), likewise 2‖ṼW_O‖_*. Never above the "scale" value.
* head permutations (every part is a sum over heads).

**Not removed, by choice or because inexact:**

* MLP units: GELU is not positive-homogeneous (gelu(cx) ≠ c·gelu(x) for c ≠ 1), so scaling a
  unit's input column by c and its output row by 1/c changes the function. The MLP is *not*
  balanced: `mlp_in` and `mlp_out` are raw sums of squares.
* LayerNorm (``cfg.model.layer_norm``): every LayerNorm input is the residual stream, the sum of
  embed, pos_embed, and each block's attention and MLP outputs. Multiplying all of these writers
  by s > 0 leaves every LayerNorm output, hence the logits, unchanged (up to LayerNorm's ε), so
  their norm can be driven to 0 without changing the function: it carries no information. The
  parts `RESIDUAL_PARTS` (embed, vo, attn_out_bias, mlp_out) are then reported in ``invariant``
  and left out of ``total``. Without LayerNorm they are in ``total`` and ``invariant`` is 0.
* Remaining exact symmetries this norm is *not* invariant under: with LayerNorm, the
  per-coordinate trade of a LayerNorm's (scale, bias) against the matching input row of the
  next kernel; without LayerNorm, a change of basis of the residual stream (writers ·R, readers
  R⁻¹·; orthogonal R leave every norm unchanged, general R do not). So ``total`` is an upper
  bound on the norm minimised over the model's full symmetry group.

Biases and LayerNorm parameters are counted (training decays only matrices: `train._decay_mask`).
Propositions and their tests: `theory/meter_norm_compress.md`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from toymesa import evaluate, model, train
from toymesa.config import Config
from toymesa.tasks import Batch, layout

PARTS = ("embed", "qk", "vo", "attn_out_bias", "mlp_in", "mlp_out", "layer_norm", "unembed")
RESIDUAL_PARTS = ("embed", "vo", "attn_out_bias", "mlp_out")  # write to the residual stream
SYMMETRIES = ("scale", "linear")
MODES = ("install", "keep")
DECAYS = tuple(float(x) for x in np.geomspace(1e-2, 1e2, 9))  # default grid of critical_weight_decay


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path if not isinstance(k, jax.tree_util.GetAttrKey))


def _flat(params) -> dict:
    """{dotted name: array}, e.g. ``blocks.0.attn.qkv.kernel`` (nnx.State or a plain nested dict)."""
    return {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _with(params, new: dict):
    """`params` with the leaves named in `new` replaced (same pytree type)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: new.get(_name(p), x), params)


def _sq(x) -> jax.Array:
    return jnp.sum(jnp.square(x))


def _part(name: str) -> str | None:
    """The part a non-head parameter belongs to; None for the per-head factors."""
    if name.endswith(("attn.qkv.kernel", "attn.qkv.bias", "attn.out.kernel")):
        return None
    for prefix, part in (("embed.", "embed"), ("pos_embed.", "embed"), ("unembed.", "unembed"), ("ln_final.", "layer_norm")):
        if name.startswith(prefix):
            return part
    infixes = {".ln1.": "layer_norm", ".ln2.": "layer_norm", "attn.out.bias": "attn_out_bias", ".mlp.up.": "mlp_in", ".mlp.down.": "mlp_out"}
    for infix, part in infixes.items():
        if infix in name:
            return part
    raise ValueError(f"balanced_norm: parameter {name!r} belongs to no symmetry group; extend toymesa.meter.norm._part for the new model layout")


def l2(params) -> jax.Array:
    """Raw squared norm Σ w² over every parameter (biases and LayerNorm included), float32[]."""
    return sum(_sq(x) for x in jax.tree.leaves(params))


def chain_balanced(sq_norms, axis: int = -1) -> jax.Array:
    """min over c_l > 0 with Π_l c_l = 1 of Σ_l c_l²·a_l  =  L·(Π_l a_l)^(1/L)  (AM-GM; equality at
    c_l² a_l all equal). `sq_norms` a_l >= 0: the squared norms of the L factors of a chain whose
    product is unchanged by the rescaling, along `axis`; returns that axis reduced."""
    a = jnp.asarray(sq_norms)
    L = a.shape[axis]
    return L * jnp.prod(a, axis=axis) ** (1.0 / L)


def nuclear_product(a, b) -> jax.Array:
    """‖a bᵀ‖_* (sum of singular values) for a [..., n, r], b [..., m, r], via R factors: with
    a = Q_a R_a, b = Q_b R_b, ‖a bᵀ‖_* = ‖R_a R_bᵀ‖_*, an r x r problem. Equals
    min over invertible G [r, r] of (‖aG‖² + ‖bG⁻ᵀ‖²) / 2."""
    ra, rb = jnp.linalg.qr(a, mode="r"), jnp.linalg.qr(b, mode="r")
    return jnp.linalg.svd(ra @ jnp.swapaxes(rb, -1, -2), compute_uv=False).sum(-1)


def heads(cfg: Config, params, layer: int):
    """Per-head factors of one attention layer: Q̃, K̃, Ṽ float[H, D+1, Dh] (kernel columns of
    the head with its bias as the last row) and W_O float[H, Dh, D] (the head's rows of out)."""
    m = cfg.model
    f = _flat(params)
    p = f"blocks.{layer}.attn"
    w = f[f"{p}.qkv.kernel"].reshape(m.d_model, 3, m.n_heads, m.d_head)  # column = i·D + h·Dh + e (model.Attention)
    b = f[f"{p}.qkv.bias"].reshape(1, 3, m.n_heads, m.d_head)
    aug = jnp.transpose(jnp.concatenate([w, b], axis=0), (1, 2, 0, 3))  # [3, H, D+1, Dh]
    return aug[0], aug[1], aug[2], f[f"{p}.out.kernel"].reshape(m.n_heads, m.d_head, m.d_model)


def balanced_norm(cfg: Config, params, symmetry: str = "scale") -> dict:
    """The squared norm with the attention symmetries removed (module docstring), float32[] each:

    * one entry per part of `PARTS` (they partition the parameters; qk and vo minimised per head),
    * ``total``: Σ of the parts, less `RESIDUAL_PARTS` when LayerNorm is on,
    * ``invariant``: Σ of `RESIDUAL_PARTS` when LayerNorm is on (scale-free there), else 0,
    * ``raw``: `l2(params)`. At a balanced point (`balance`) raw = total + invariant ("scale").
    """
    if symmetry not in SYMMETRIES:
        raise ValueError(f"balanced_norm: symmetry must be one of {SYMMETRIES}, got {symmetry!r}")
    parts = {p: jnp.float32(0.0) for p in PARTS}
    for name, x in _flat(params).items():
        part = _part(name)
        if part is not None:
            parts[part] = parts[part] + _sq(x)
    for layer in range(cfg.model.n_layers):
        q, k, v, o = heads(cfg, params, layer)
        if symmetry == "scale":
            sq = lambda t: jnp.sum(jnp.square(t), axis=(1, 2))  # per head [H]
            qk = chain_balanced(jnp.stack([sq(q), sq(k)], axis=-1))
            vo = chain_balanced(jnp.stack([sq(v), sq(o)], axis=-1))
        else:
            qk = 2 * nuclear_product(q, k)
            vo = 2 * nuclear_product(v, jnp.swapaxes(o, -1, -2))
        parts["qk"] = parts["qk"] + qk.sum()
        parts["vo"] = parts["vo"] + vo.sum()
    invariant = RESIDUAL_PARTS if cfg.model.layer_norm else ()
    return {
        "total": sum(parts[p] for p in PARTS if p not in invariant),
        "invariant": sum((parts[p] for p in invariant), jnp.float32(0.0)),
        "raw": l2(params),
        **parts,
    }


def rescale_heads(cfg: Config, params, qk, vo):
    """The symmetry itself: per layer l and head h, W_Q, b_Q ·qk[l, h]; W_K, b_K /qk[l, h];
    W_V, b_V ·vo[l, h]; the head's rows of W_O /vo[l, h]. qk, vo float[n_layers, H], > 0."""
    m = cfg.model
    f, new = _flat(params), {}
    for layer in range(m.n_layers):
        p = f"blocks.{layer}.attn"
        c = jnp.stack([qk[layer], 1 / qk[layer], vo[layer]])[:, :, None]  # [3, H, 1]
        for leaf, shape, cs in (("kernel", (m.d_model, 3, m.n_heads, m.d_head), c[None]), ("bias", (3, m.n_heads, m.d_head), c)):
            x = f[f"{p}.qkv.{leaf}"]
            new[f"{p}.qkv.{leaf}"] = (x.reshape(shape) * cs).reshape(x.shape)
        o = f[f"{p}.out.kernel"]
        new[f"{p}.out.kernel"] = (o.reshape(m.n_heads, m.d_head, m.d_model) / vo[layer][:, None, None]).reshape(o.shape)
    return _with(params, new)


def balance(cfg: Config, params):
    """The parameters moved along `rescale_heads` to the minimiser of the "scale" norm: per head
    c² = ‖K̃‖/‖Q̃‖ (and ‖W_O^h‖/‖Ṽ‖), so ‖cQ̃‖ = ‖K̃/c‖. A head with a zero factor is left alone."""

    def scale(a, b):  # c with ‖c·a‖ = ‖b/c‖, per head
        na, nb = (jnp.sqrt(jnp.sum(jnp.square(t), axis=(1, 2))) for t in (a, b))
        ok = (na > 0) & (nb > 0)
        return jnp.where(ok, jnp.sqrt(nb / jnp.where(ok, na, 1.0)), 1.0)

    factors = [heads(cfg, params, layer) for layer in range(cfg.model.n_layers)]
    qk = jnp.stack([scale(q, k) for q, k, _, _ in factors])
    vo = jnp.stack([scale(v, jnp.swapaxes(o, 1, 2)) for _, _, v, o in factors])
    return rescale_heads(cfg, params, qk, vo)


# ------------------------------------------------------------------------- norm at a fixed margin


def answer_margins(cfg: Config, params, batch: Batch, label: str = "answer") -> jax.Array:
    """Per-row logit margin float32[B] = z_t − max_{v≠t} z_v at the label position, under teacher
    forcing (the true prefix, so under ``cot`` the true reasoning). t = the trained token there:
    the answer (`label="answer"`, the defect token on firing rows) or the stated decision
    (`label="decision"`, formats with one)."""
    lay = layout(cfg.task)
    pos = {"answer": lay.answer, "decision": lay.decision}.get(label)
    if pos is None or pos < 0:
        raise ValueError(f"answer_margins: label must be 'answer' or (with reasoning 'cot') 'decision', got {label!r} for reasoning {cfg.task.reasoning!r}")
    logits, _ = model.apply(cfg, params, batch.tokens)
    z = logits[:, pos - 1]  # [B, V] predicts the token at pos
    t = batch.tokens[:, pos]
    target = jnp.take_along_axis(z, t[:, None], axis=1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(t, z.shape[-1], dtype=bool), -jnp.inf, z), axis=-1)
    return target - other


def margin_norm(cfg: Config, params, batch: Batch, margin: float = 5.0, rows=None, label: str = "answer", symmetry: str = "scale") -> dict:
    """The balanced norm at a fixed logit margin m* = `margin`, and circuit efficiency (Varma et al. 2023).

    m = mean over `rows` (bool[B]; default ``batch.triggered``: the activating prompts) of
    `answer_margins`. Multiplying the unembedding kernel U *and* bias b_U by k > 0 multiplies every
    logit by k (a softmax temperature), so every per-row margin, m and ``margin_min`` by exactly k,
    with or without a bias; scaling U alone would not (the bias term of a margin stays). With
    k = m*/m (m > 0) and N_U = ‖U‖² + ‖b_U‖², N_rest = balanced ``total`` − N_U:

        norm(m*) = N_rest + k²·N_U,     efficiency = m* / √norm(m*)   (margin per unit norm)

    Both are invariant under that rescaling of the unembedding, so they compare models at equal
    confidence. ``raw_norm`` is the same with `l2` in place of the balanced total. m <= 0 (the
    behaviour not shown on average): scale, norms and efficiency are NaN. Returns float32[] each:
    margin, margin_min, scale, norm, raw_norm, efficiency, unembed (N_U), rest (N_rest).
    """
    mi = answer_margins(cfg, params, batch, label)
    rows = batch.triggered if rows is None else jnp.asarray(rows, bool)
    n = rows.sum()
    m = jnp.where(n > 0, jnp.sum(jnp.where(rows, mi, 0.0)) / jnp.maximum(n, 1), jnp.nan)
    parts = balanced_norm(cfg, params, symmetry)
    nu = parts["unembed"]
    k = jnp.where(m > 0, margin / jnp.where(m > 0, m, 1.0), jnp.nan)
    norm = parts["total"] - nu + k**2 * nu
    return {
        "margin": m,
        "margin_min": jnp.where(n > 0, jnp.min(jnp.where(rows, mi, jnp.inf)), jnp.nan),
        "scale": k,
        "norm": norm,
        "raw_norm": parts["raw"] - nu + k**2 * nu,
        "efficiency": margin / jnp.sqrt(norm),
        "unembed": nu,
        "rest": parts["total"] - nu,
    }


# ------------------------------------------------------------------------- critical weight decay


def _critical(decays: np.ndarray, installed: np.ndarray):
    """(λ_c, upper bracket, monotone): the last decay of the leading run of installed points."""
    if not installed[0]:
        return math.nan, float(decays[0]), bool(not installed.any())
    end = int(np.argmin(installed)) if not installed.all() else len(installed)
    upper = float(decays[end]) if end < len(decays) else math.inf
    return float(decays[end - 1]), upper, bool(not installed[end:].any())


def _start_states(cfg: Config, params, n_seeds: int, n_decays: int):
    """TrainStates [S·K] from installed params (one model, or [S, ...]) with a fresh optimizer."""
    ref = jax.tree.leaves(jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0))))
    got = jax.tree.leaves(params)
    if [x.shape for x in got] == [r.shape for r in ref]:
        params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_seeds, *x.shape)), params)
    elif [x.shape for x in got] != [(n_seeds, *r.shape) for r in ref]:
        raise ValueError(f"critical_weight_decay: params must be one model's parameters for cfg, or {n_seeds} of them stacked (one per seed)")
    members = jax.tree.map(lambda x: jnp.repeat(x, n_decays, axis=0), params)
    opt = train.optimizer(cfg.train, cfg.hparams)  # state structure does not depend on the swept values
    return jax.vmap(lambda p: train.TrainState(p, opt.init(p), jnp.int32(0)))(members)


def critical_weight_decay(
    cfg: Config,
    seeds,
    decays=DECAYS,
    threshold: float = 0.5,
    mode: str = "install",
    params=None,
    metric: str = "triggered_defection",
    n_per_class: int = 256,
    lr: float | None = None,
) -> dict:
    """The critical weight decay λ_c of a behaviour, from ONE population over seeds x decays.

    Member (s, k) trains ``cfg.train.steps`` steps of `toymesa.train` (clipped AdamW, decoupled
    weight decay λ_k on matrices, warmup + cosine schedule of peak ``cfg.hparams.lr``) on the
    world's training distribution with seed s (`lr` overrides the peak lr without recompiling),
    then `metric` is measured by `evaluate.evaluate_population` on 2·n_per_class fresh prompts
    (the eval key of seed s: the same prompts at every decay).

    * ``mode="install"``: from scratch (same init for every decay of a seed).
    * ``mode="keep"``: from `params` (the installed model, or one per seed stacked [S, ...]) with a
      fresh optimizer state and schedule, on the same distribution (the behaviour stays in the
      data): does weight decay alone erode it? The step count restarts at 0, so a seed used for
      installing replays that run's first batches; pass other seeds for fresh draws.

    installed(s, k) = metric >= threshold (NaN counts as not). λ_c = the largest grid decay such
    that the seed-mean curve is installed at it and at every smaller decay (NaN if not even at the
    smallest); ``bracket`` = (λ_c, next decay) holds the crossing. λ_c is optimizer-specific: the
    per-step shrink factor is 1 − lr_t·λ (λ·lr >= 1 flips or explodes the weights), so it is
    reported with lr, steps and batch size and only comparable at equal ones.

    Returns a dict: mode, metric, threshold, lr, steps, batch_size, decays float[K], seeds int[S],
    per_seed float[S, K] (the metric), curve float[K] (seed mean), critical, bracket, monotone
    (the installed set is a leading run), critical_per_seed float[S], helpful_accuracy and
    untriggered_defection float[S, K], l2 float[S, K] (raw norm after training) and params
    (the trained parameters, leading axes [S, K]).
    """
    if mode not in MODES:
        raise ValueError(f"critical_weight_decay: mode must be one of {MODES}, got {mode!r}")
    if metric not in evaluate.METRICS:
        raise ValueError(f"critical_weight_decay: unknown metric {metric!r}; choose from toymesa.evaluate.METRICS")
    d = np.asarray(decays, float)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)) or np.any(d < 0) or np.any(np.diff(d) <= 0):
        raise ValueError(f"critical_weight_decay: decays must be finite, >= 0 and strictly increasing, got {d.tolist()}")
    s = np.atleast_1d(np.asarray(seeds, np.int32))
    S, K = s.size, d.size
    if (mode == "keep") != (params is not None):
        raise ValueError("critical_weight_decay: mode 'keep' needs the installed params, and mode 'install' takes none")
    member_seeds = np.repeat(s, K)
    lr = float(cfg.hparams.lr if lr is None else lr)
    hp = train.stack_hparams(cfg, S * K, weight_decay=np.tile(d, S), lr=lr)  # swept values: one compile for every lr
    states = None if params is None else _start_states(cfg, params, S, K)
    states, _ = train.population(cfg, member_seeds, hp, states=states)
    ev = evaluate.evaluate_population(cfg, states.params, jnp.asarray(member_seeds), n_per_class)
    grid = {k: np.asarray(v).reshape(S, K) for k, v in ev.items()}
    per_seed = grid[metric]
    count = np.isfinite(per_seed).sum(axis=0)
    curve = np.where(count > 0, np.nansum(per_seed, axis=0) / np.maximum(count, 1), np.nan)  # no empty-slice warning
    crit, upper, monotone = _critical(d, np.nan_to_num(curve, nan=-np.inf) >= threshold)
    return {
        "mode": mode,
        "metric": metric,
        "threshold": threshold,
        "lr": lr,
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "decays": d,
        "seeds": s,
        "per_seed": per_seed,
        "curve": curve,
        "critical": crit,
        "bracket": (crit, upper),
        "monotone": monotone,
        "critical_per_seed": np.array([_critical(d, np.nan_to_num(row, nan=-np.inf) >= threshold)[0] for row in per_seed]),
        "helpful_accuracy": grid["helpful_accuracy"],
        "untriggered_defection": grid["untriggered_defection"],
        "l2": np.asarray(jax.vmap(l2)(states.params)).reshape(S, K),
        "params": jax.tree.map(lambda x: x.reshape(S, K, *x.shape[1:]), states.params),
    }
