"""Norms with symmetries removed, the norm at a fixed margin and the critical weight decay
(`toymesa.meter.norm`): the deep-linear minimum norm, invariance under the attention rescalings
and head permutations (with the model's logits unchanged), LayerNorm's scale-free residual
writers, the margin's exact scaling with the unembedding, and the decay at which a trained
behaviour is lost. Propositions: `theory/meter_norm_compress.md`."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import ortho_group

from toymesa import model
from toymesa.config import Config, HParams, TaskConfig, TrainConfig
from toymesa.meter import norm
from toymesa.meter.closed_forms import dln_min_norm
from toymesa.presets import tiny
from toymesa.tasks import Batch, layout, vocab

DECAYS = (0.0, 1.0, 90.0)  # lr 1e-2: 90 shrinks the weights by up to 0.9 a step


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def _realistic(params, seed):
    """Fresh parameters with every bias and LayerNorm parameter moved off its initial 0 (or 1), as
    training moves them, so the bias rows of the head groups are exercised."""
    f = norm._flat(params)
    keys = jax.random.split(jax.random.key(seed), len(f))
    return norm._with(params, {n: x + 0.3 * jax.random.normal(k, x.shape) for (n, x), k in zip(f.items(), keys, strict=True) if n.endswith(("bias", "scale"))})


@pytest.fixture(scope="module")
def tiny_real(tiny_params):
    return _realistic(tiny_params, 1)


@pytest.fixture(scope="module")
def variant_real(variant_params):
    return _realistic(variant_params, 2)


class _Models(tuple):
    """((cfg, params) with LayerNorm, (cfg, params) without): a short repr for hypothesis' reports."""

    def __repr__(self):
        return "<tiny and variant models>"


@pytest.fixture(scope="module")
def models(tiny_cfg, tiny_real, variant_cfg, variant_real):
    return _Models(((tiny_cfg, tiny_real), (variant_cfg, variant_real)))


@functools.cache
def _tokens(cfg):
    """Random token ids: a symmetry must keep the logits of any input."""
    return jax.random.randint(jax.random.key(0), (4, cfg.task.seq_len), 0, vocab(cfg.task).size)


@functools.cache
def _jitted(cfg, symmetry="scale"):
    return jax.jit(functools.partial(norm.balanced_norm, cfg, symmetry=symmetry)), jax.jit(lambda p, t: model.apply(cfg, p, t)[0])


def _factorisation(M, L, G):
    """W_L ... W_1 = M = U Σ Vᵀ with W_1 = G_1 Σ^(1/L) Vᵀ, W_l = G_l Σ^(1/L) G_(l-1)⁻¹, W_L = U Σ^(1/L) G_(L-1)⁻¹."""
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    root = np.diag(s ** (1 / L))
    G = [np.eye(len(s))] + list(G) + [U]  # G_0 = I (absorbed), G_L = U
    return [G[i + 1] @ root @ np.linalg.inv(G[i]) if i else G[1] @ root @ Vt for i in range(L)]


# ------------------------------------------------------------------------ closed forms
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3]))
def test_chain_balance_is_the_minimum_over_rescalings(seed, L):
    rng = np.random.default_rng(seed)
    a = rng.exponential(size=L) + 1e-3
    best = float(norm.chain_balanced(jnp.asarray(a)))
    c2 = (np.prod(a) ** (1 / L)) / a  # the minimiser: every c_l² a_l equal, Π c_l = 1
    assert np.sum(c2 * a) == pytest.approx(best, rel=1e-5)
    for _ in range(20):
        u = rng.normal(size=L)
        c2 = np.exp(2 * (u - u.mean()))  # Π c_l = 1
        assert np.sum(c2 * a) >= best * (1 - 1e-6)


@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3]))
def test_deep_linear_min_norm_bounds_and_is_attained(seed, L):
    """Balanced rescaling of any factorisation of M never goes below L·Σσ^(2/L); the balanced SVD
    factorisation attains it; for L = 2 the GL-balanced (nuclear) value equals it exactly."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(5, 4)) * rng.exponential(size=4)
    floor = dln_min_norm(M, L)
    G = [rng.normal(size=(4, 4)) + 2 * np.eye(4) for _ in range(L - 1)]
    arbitrary = _factorisation(M, L, G)
    assert np.allclose(np.linalg.multi_dot(arbitrary[::-1]), M, atol=1e-8)
    sq = jnp.asarray([np.sum(W**2) for W in arbitrary])
    assert float(norm.chain_balanced(sq)) >= floor * (1 - 1e-5)
    svd = _factorisation(M, L, [np.eye(4)] * (L - 1))
    assert float(norm.chain_balanced(jnp.asarray([np.sum(W**2) for W in svd]))) == pytest.approx(floor, rel=0.01)
    if L == 2:
        W1, W2 = (jnp.asarray(W, jnp.float32) for W in arbitrary)
        assert 2 * float(norm.nuclear_product(W2, W1.T)) == pytest.approx(floor, rel=1e-4)


# ------------------------------------------------------------------------ symmetries
def _heads_transform(cfg, params, layer, Gq, Gv):
    """Q̃→Q̃G, K̃→K̃G⁻ᵀ (Gq [H, Dh, Dh]) and Ṽ→ṼG, W_O→G⁻¹W_O (Gv): the GL(Dh) symmetry, bias rows included."""
    m, f = cfg.model, norm._flat(params)
    p = f"blocks.{layer}.attn"
    q, k, v, o = norm.heads(cfg, params, layer)
    q = q @ Gq
    k = k @ jnp.swapaxes(jnp.linalg.inv(Gq), 1, 2)
    v = v @ Gv
    o = jnp.linalg.inv(Gv) @ o
    aug = jnp.transpose(jnp.stack([q, k, v]), (2, 0, 1, 3))  # [D+1, 3, H, Dh]
    new = {
        f"{p}.qkv.kernel": aug[:-1].reshape(f[f"{p}.qkv.kernel"].shape),
        f"{p}.qkv.bias": aug[-1].reshape(-1),
        f"{p}.out.kernel": o.reshape(m.d_model, m.d_model),
    }
    return norm._with(params, new)


def _permute_heads(cfg, params, perm):
    m, f, new = cfg.model, norm._flat(params), {}
    for layer in range(m.n_layers):
        p = f"blocks.{layer}.attn"
        w, b = f[f"{p}.qkv.kernel"], f[f"{p}.qkv.bias"]
        new[f"{p}.qkv.kernel"] = w.reshape(m.d_model, 3, m.n_heads, m.d_head)[:, :, perm].reshape(w.shape)
        new[f"{p}.qkv.bias"] = b.reshape(3, m.n_heads, m.d_head)[:, perm].reshape(b.shape)
        new[f"{p}.out.kernel"] = f[f"{p}.out.kernel"].reshape(m.n_heads, m.d_head, m.d_model)[perm].reshape(m.d_model, m.d_model)
    return norm._with(params, new)


def _assert_same(cfg, a, b, symmetry="scale"):
    measure, logits = _jitted(cfg, symmetry)
    na, nb = measure(a), measure(b)
    for key in ("total", "invariant", *norm.PARTS):
        assert _rel(na[key], nb[key]) < 1e-5, key
    t = _tokens(cfg)
    assert jnp.allclose(logits(a, t), logits(b, t), atol=1e-4)
    return na, nb


@given(seed=st.integers(0, 2**31 - 1))
def test_balanced_norm_is_invariant_under_head_rescalings(models, seed):
    """With LayerNorm (tiny) and without it (variant: also attention-only)."""
    rng = np.random.default_rng(seed)
    for cfg, params in models:
        shape = (cfg.model.n_layers, cfg.model.n_heads)
        qk, vo = (jnp.asarray(rng.choice([-1, 1], shape) * rng.uniform(0.4, 1.0, shape), jnp.float32) for _ in range(2))
        moved = norm.rescale_heads(cfg, params, jnp.exp(qk), jnp.exp(vo))
        na, nb = _assert_same(cfg, params, moved)
        assert _rel(na["raw"], nb["raw"]) > 1e-3  # the raw norm does change


@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_balanced_norm_is_invariant_under_head_permutations(which, request):
    cfg, params = request.getfixturevalue(f"{which}_cfg"), request.getfixturevalue(f"{which}_real")
    perm = np.roll(np.arange(cfg.model.n_heads), 1)
    _assert_same(cfg, params, _permute_heads(cfg, params, perm))
    _assert_same(cfg, params, _permute_heads(cfg, params, perm), "linear")


@given(seed=st.integers(0, 2**31 - 1))
def test_linear_mode_is_invariant_under_gl_and_never_above_scale(models, seed):
    (tiny_cfg, tiny_real), _ = models
    H, Dh = tiny_cfg.model.n_heads, tiny_cfg.model.d_head
    rng = np.random.default_rng(seed)
    # G = O_1·diag(e^u)·O_2, |u| <= 1: well conditioned, and not orthogonal (which no norm would notice)
    Gq, Gv = (jnp.asarray(ortho_group.rvs(Dh, H, rng) @ (np.exp(rng.uniform(-1, 1, (H, Dh, 1))) * ortho_group.rvs(Dh, H, rng)), jnp.float32) for _ in range(2))
    moved = _heads_transform(tiny_cfg, tiny_real, 0, Gq, Gv)
    measure, _ = _jitted(tiny_cfg, "scale")
    linear, scale = _assert_same(tiny_cfg, tiny_real, moved, "linear")[0], measure(tiny_real)
    assert float(linear["qk"]) <= float(scale["qk"]) * (1 + 1e-6) and float(linear["vo"]) <= float(scale["vo"]) * (1 + 1e-6)
    assert _rel(measure(moved)["qk"], scale["qk"]) > 1e-3  # the scalar quotient does not remove GL(Dh)


@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_balance_attains_the_minimum_and_keeps_the_function(which, request):
    cfg, params = request.getfixturevalue(f"{which}_cfg"), request.getfixturevalue(f"{which}_real")
    moved = norm.rescale_heads(cfg, params, jnp.full((1, 2), 3.0), jnp.full((1, 2), 0.2))
    bal = norm.balance(cfg, moved)
    na, nb = _assert_same(cfg, moved, bal)
    assert float(nb["raw"]) == pytest.approx(sum(float(na[p]) for p in norm.PARTS), rel=1e-5)  # the parts partition the parameters
    assert float(nb["raw"]) < float(na["raw"])
    assert float(na["total"]) + float(na["invariant"]) <= float(na["raw"])


def _scale_writers(params, s):
    writes = ("embed.embedding", "pos_embed.embedding", "attn.out.kernel", "attn.out.bias", "mlp.down.kernel", "mlp.down.bias")
    return norm._with(params, {n: x * s for n, x in norm._flat(params).items() if n.endswith(writes)})


def test_layer_norm_makes_the_residual_writers_scale_free(tiny_cfg, tiny_real, variant_cfg, variant_real):
    measure, logits = _jitted(tiny_cfg)
    t = _tokens(tiny_cfg)
    moved = _scale_writers(tiny_real, 3.0)
    assert jnp.allclose(logits(tiny_real, t), logits(moved, t), atol=1e-4)  # a symmetry under LayerNorm
    a, b = measure(tiny_real), measure(moved)
    assert _rel(a["total"], b["total"]) < 1e-6 and _rel(b["invariant"], a["invariant"]) > 1.0
    assert float(a["invariant"]) == pytest.approx(sum(float(a[p]) for p in norm.RESIDUAL_PARTS), rel=1e-6)
    v = _jitted(variant_cfg)[0](variant_real)  # no LayerNorm: nothing is scale-free, all counted
    assert float(v["invariant"]) == 0 and float(v["total"]) == pytest.approx(sum(float(v[p]) for p in norm.PARTS), rel=1e-6)
    t = _tokens(variant_cfg)
    lv = _jitted(variant_cfg)[1]
    assert not jnp.allclose(lv(variant_real, t), lv(_scale_writers(variant_real, 3.0), t), atol=1e-2)


def test_gelu_unit_rescaling_is_not_a_symmetry(tiny_cfg, tiny_real):
    """Why the MLP is not balanced: (up column ·2, down row /2) of one unit changes the logits."""
    f = norm._flat(tiny_real)
    up, down = "blocks.0.mlp.up", "blocks.0.mlp.down"
    moved = norm._with(
        tiny_real,
        {
            f"{up}.kernel": f[f"{up}.kernel"].at[:, 0].multiply(2.0),
            f"{up}.bias": f[f"{up}.bias"].at[0].multiply(2.0),
            f"{down}.kernel": f[f"{down}.kernel"].at[0].multiply(0.5),
        },
    )
    logits = _jitted(tiny_cfg)[1]
    t = _tokens(tiny_cfg)
    assert float(jnp.max(jnp.abs(logits(tiny_real, t) - logits(moved, t)))) > 1e-4


def test_balanced_norm_vmaps_over_a_population(tiny_cfg, tiny_real):
    moved = norm.rescale_heads(tiny_cfg, tiny_real, jnp.full((1, 2), 2.0), jnp.full((1, 2), 0.5))
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), tiny_real, moved)
    many = jax.jit(jax.vmap(functools.partial(norm.balanced_norm, tiny_cfg)))(stacked)
    for i, p in enumerate((tiny_real, moved)):
        one = _jitted(tiny_cfg)[0](p)
        assert all(_rel(many[k][i], one[k]) < 1e-6 for k in one)


def test_bad_symmetry_and_unknown_parameters_raise(tiny_cfg, tiny_real):
    with pytest.raises(ValueError, match="symmetry must be one of"):
        norm.balanced_norm(tiny_cfg, tiny_real, "orthogonal")
    with pytest.raises(ValueError, match="belongs to no symmetry group"):
        norm.balanced_norm(tiny_cfg, {**norm._flat(tiny_real), "extra.gate": jnp.ones(3)})


# ------------------------------------------------------------------------ margin and weight decay
@pytest.fixture(scope="module")
def quick_cfg():
    """A world the tiny model learns in 40 steps: one trigger in a fixed slot, copy an operand."""
    task = TaskConfig(rule="single", helpful="copy_kth", n_ctx=2, n_trigger_tokens=2, n_distractors=2, modulus=3, trigger_position="fixed")
    task = dataclasses.replace(task, seq_len=task.min_seq_len)
    return Config(model=tiny(), task=task, train=TrainConfig(batch_size=32, steps=40), hparams=HParams(lr=1e-2, weight_decay=0.0))


@pytest.fixture(scope="module")
def installed(quick_cfg):
    return norm.critical_weight_decay(quick_cfg, [0, 1], DECAYS, n_per_class=32)


@pytest.mark.slow  # ~10 s of compiles (training and decoding programs)
def test_critical_weight_decay_installs_at_zero_and_not_at_a_huge_decay(installed, quick_cfg):
    r = installed
    assert r["per_seed"].shape == (2, 3) and r["curve"].shape == (3,)
    assert (r["per_seed"][:, 0] >= 0.5).all() and (r["per_seed"][:, -1] < 0.5).all() and r["monotone"]
    assert r["critical"] in DECAYS[:-1] and r["bracket"] == (r["critical"], DECAYS[DECAYS.index(r["critical"]) + 1])
    assert np.isin(r["critical_per_seed"], DECAYS[:-1]).all()
    assert (r["lr"], r["steps"], r["batch_size"]) == (1e-2, 40, 32)
    assert (np.diff(r["l2"], axis=1) < 0).all()  # member (s, k) trained at decay k: more decay, smaller weights
    assert jax.tree.leaves(r["params"])[0].shape[:2] == (2, 3)


@pytest.mark.slow
def test_critical_weight_decay_keep_mode(installed, quick_cfg):
    start = jax.tree.map(lambda x: x[:, 0], installed["params"])  # each seed's model trained without decay, [2, ...]
    r = norm.critical_weight_decay(quick_cfg, [0, 1], DECAYS, mode="keep", params=start, n_per_class=32)
    assert r["mode"] == "keep" and r["curve"][0] >= 0.5 and r["curve"][-1] < 0.5 and r["monotone"]
    # lr = 0 (decoupled decay is scaled by lr too): nothing moves, so keep really starts from `start`
    frozen = norm.critical_weight_decay(quick_cfg, [0, 1], DECAYS, mode="keep", params=start, n_per_class=32, lr=0.0)
    assert (frozen["per_seed"] >= 0.5).all() and frozen["critical"] == DECAYS[-1] and frozen["bracket"][1] == np.inf and frozen["lr"] == 0.0
    for a, b in zip(jax.tree.leaves(frozen["params"]), jax.tree.leaves(start), strict=True):
        assert jnp.array_equal(a, jnp.broadcast_to(b[:, None], a.shape))
    with pytest.raises(ValueError, match="one model's parameters"):
        norm.critical_weight_decay(quick_cfg, [0, 1, 2], DECAYS, mode="keep", params=start)


def test_critical_decay_is_the_end_of_the_leading_installed_run():
    d = np.array([0.0, 0.1, 1.0, 10.0])
    crit = lambda *installed: norm._critical(d, np.array(installed))  # noqa: E731
    assert crit(True, True, False, False) == (0.1, 1.0, True)
    assert crit(True, True, True, True) == (10.0, np.inf, True)
    assert crit(True, False, True, False) == (0.0, 0.1, False)  # re-installed at a larger decay: not monotone
    lam, upper, monotone = crit(False, False, False, False)
    assert np.isnan(lam) and upper == 0.0 and monotone
    assert not crit(False, True, False, False)[2]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(decays=(1.0, 0.5)), "strictly increasing"),
        (dict(decays=(-1.0, 1.0)), ">= 0"),
        (dict(mode="erase"), "mode must be one of"),
        (dict(mode="keep"), "needs the installed params"),
        (dict(metric="loss"), "unknown metric"),
    ],
)
def test_critical_weight_decay_rejects_bad_arguments(quick_cfg, kw, match):
    with pytest.raises(ValueError, match=match):
        norm.critical_weight_decay(quick_cfg, [0], **kw)


def _confident(cfg, params):
    """(params, batch): 8 random prompts, 6 "firing" with the defect token as answer and 2 not, and
    params whose final LayerNorm (scale 1, bias β̂ with ‖β̂‖ = 3√D) and defect column β̂/D of the
    unembedding make the firing rows' margins positive (h = x̂ + β̂ with ‖x̂‖ = √D: h·β̂ >= 6D)."""
    v, D, ans = vocab(cfg.task), cfg.model.d_model, layout(cfg.task).answer
    fires = jnp.arange(8) < 6
    tokens = jnp.concatenate([_tokens(cfg), _tokens(cfg)[::-1]]).at[:, ans].set(jnp.where(fires, v.defect, v.answer))
    batch = Batch(*[None] * len(Batch._fields))._replace(tokens=tokens, triggered=fires)
    beta = jax.random.normal(jax.random.key(3), (D,))
    beta = 3 * np.sqrt(D) * beta / jnp.linalg.norm(beta)
    U = norm._flat(params)["unembed.kernel"]
    new = {"ln_final.scale": jnp.ones(D), "ln_final.bias": beta, "unembed.kernel": U.at[:, v.defect].add(beta / D), "unembed.bias": jnp.zeros(v.size)}
    return norm._with(params, new), batch


def test_margin_scales_exactly_with_the_unembedding(tiny_cfg, tiny_real):
    cfg = tiny_cfg
    params, batch = _confident(cfg, tiny_real)
    measure = jax.jit(lambda p: norm.margin_norm(cfg, p, batch, margin=5.0))
    f = norm._flat(params)
    U, b = f["unembed.kernel"], f["unembed.bias"]
    assert float(jnp.max(jnp.abs(b))) == 0  # no final bias
    base = measure(params)
    assert 0 < float(base["margin_min"]) <= float(base["margin"])
    each = jax.jit(lambda p: norm.answer_margins(cfg, p, batch))(params)
    assert float(base["margin"]) == pytest.approx(float(jnp.mean(each[:6])), rel=1e-5)  # the firing rows only
    assert float(jnp.mean(each)) < float(base["margin"])
    doubled = measure(norm._with(params, {"unembed.kernel": 2 * U}))  # no final bias: the kernel alone sets the margin
    assert float(doubled["margin"]) == pytest.approx(2 * float(base["margin"]), rel=1e-5)
    assert float(doubled["margin_min"]) == pytest.approx(2 * float(base["margin_min"]), rel=1e-5)
    for key in ("efficiency", "norm", "raw_norm", "rest"):
        assert float(doubled[key]) == pytest.approx(float(base[key]), rel=1e-5), key
    assert float(base["efficiency"]) == pytest.approx(5.0 / np.sqrt(float(base["norm"])), rel=1e-6)
    assert float(base["scale"]) * float(base["margin"]) == pytest.approx(5.0, rel=1e-6)
    # with a bias: kernel and bias together scale the margin exactly, the kernel alone does not
    b = jnp.linspace(-1.0, 1.0, b.shape[0])
    m0 = float(measure(norm._with(params, {"unembed.bias": b}))["margin"])
    assert float(measure(norm._with(params, {"unembed.kernel": 2 * U, "unembed.bias": 2 * b}))["margin"]) == pytest.approx(2 * m0, rel=1e-5)
    assert float(measure(norm._with(params, {"unembed.kernel": 2 * U, "unembed.bias": b}))["margin"]) != pytest.approx(2 * m0, rel=1e-3)
    flipped = measure(norm._with(params, {"unembed.kernel": -U}))
    assert float(flipped["margin"]) < 0 and np.isnan(float(flipped["efficiency"])) and np.isnan(float(flipped["norm"]))
