"""Gradient attributions against known answers (toymesa.attribution.gradients and .ig).

* IG on the transformer: completeness for embeddings and parameters; the residual is
  informative (with the same 16 nodes left-Riemann fails the tolerance Gauss-Legendre meets).
* IG axioms on hand-written functions: dummy, linearity, implementation invariance,
  Euler for bias-free ReLU nets, Gauss-Legendre exact on polynomials of degree 2K-1.
* IG at a site on the reference model sums to the full-site patching effect.
* Per-example and token-group gradients add up to the batch gradient of `masked_loss`.
* Stop-gradient changes the backward pass only; gradient x delta = Euler = one IG step.

Every model computation is a jitted function of fixed shape, built once per session
(`functools.cache`), so hypothesis examples (seeds, positions, scales) reuse one compile.
Tokens for the IG tests are uniform random ids (numpy, no compile): the identities hold
for any input.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toymesa import model, presets, train
from toymesa.attribution import core, ig
from toymesa.attribution import gradients as gr
from toymesa.model import Intervention
from toymesa.tasks import vocab, world

B = 4  # batch rows in every model test
seeds = st.integers(0, 2**31 - 1)


def random_tokens(cfg, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab(cfg.task).size, (B, cfg.task.seq_len)), jnp.int32)


def answer_metric(cfg):
    return core.token_logprob(world.layout(cfg.task).answer)


def total(tree) -> float:
    return sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(tree))


def leaves(tree) -> list[np.ndarray]:
    """The leaves of a pytree as float64 NumPy arrays (post-processing in NumPy: no compiles)."""
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_leaves_close(a, b, rtol, atol):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def embed_table(params):
    return np.asarray(params["embed"]["embedding"][...])


# ------------------------------------------------------------------ jitted functions (one compile each)
STEPS = 16  # quadrature nodes in the transformer IG tests


@functools.cache
def ig_embed_fn(cfg):
    """jit: ig_embeddings of the answer log-prob: Gauss-Legendre and left-Riemann with STEPS
    nodes from the default baseline, and Gauss-Legendre with 2 STEPS nodes from `baseline`."""

    def f(p, tokens, baseline):
        m = answer_metric(cfg)
        default = [gr.ig_embeddings(cfg, p, tokens, m, steps=STEPS, rule=r) for r in ("gauss_legendre", "riemann_left")]
        return default + [gr.ig_embeddings(cfg, p, tokens, m, baseline, steps=2 * STEPS)]

    return jax.jit(f)


@functools.cache
def ig_params_fn(cfg, rule="gauss_legendre"):
    return jax.jit(lambda p0, p1, tokens: gr.ig_params(cfg, p0, p1, tokens, answer_metric(cfg), steps=STEPS, rule=rule))


@functools.cache
def forward_fn(cfg):
    """jit: (logits, cache) without interventions."""
    return jax.jit(functools.partial(model.apply, cfg))


@functools.cache
def embed_metric_fn(cfg):
    """jit: sum_b m_b with hook_embed replaced by `embed` (an independent forward pass)."""
    return jax.jit(lambda p, tokens, embed: core.forward(cfg, p, tokens, answer_metric(cfg), {"hook_embed": Intervention(replace=embed)})[0].sum())


@functools.cache
def batch_grad_fn(cfg):
    """jit: d masked_loss / d params for a batch and a target mask bool[B, T]."""
    return jax.jit(jax.grad(lambda p, batch, mask: train.masked_loss(cfg, p, batch, mask)[0]))


@pytest.fixture(scope="session")
def cot_batch(tiny_cfg):
    """A balanced cot batch (B = 4): prompt, reasoning block, answer."""
    return jax.jit(lambda k: world.balanced(tiny_cfg.task, k, B // 2))(jax.random.key(3))


def perturbed(params, seed, scale):
    """params + scale * N(0, 1) * (each leaf's std, or 1 for constant leaves), in numpy."""
    rng = np.random.default_rng(seed)

    def leaf(x):
        x = np.asarray(x)
        s = x.std() if x.std() > 0 else 1.0
        return jnp.asarray(x + scale * s * rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(leaf, params)


# ------------------------------------------------------------------ IG completeness on the transformer
# GL_ATOL: Gauss-Legendre on an analytic integrand (LayerNorm, GELU, softmax): the rule's error
# falls geometrically with the nodes until float32 rounding of f(x) - f(x') (|f| ~ 1-20 over 4
# rows; eps 1.2e-7) and of the ~2.6e3 (embeddings) or ~1.7e4 (parameters) products dominates.
# Measured over 400 token draws: from zeros, 16 nodes give |residual| <= 8e-6 (4 nodes ~1e-2,
# 8 ~1e-3); from a corrupted embedding (a longer path) 16 nodes give up to 1.7e-3 and 32 nodes
# <= 9e-6; on the parameter path (150 draws, scale 0.1-0.3) 16 nodes give <= 5e-6. Left-Riemann
# with 16 nodes (error ~ (g(1) - g(0)) / 2K for the path derivative g) misses by >= 5e-4
# (embeddings) and >= 8e-4 (parameters).
GL_ATOL = 1e-4


@given(seed=seeds)
def test_ig_embeddings_completeness(tiny_cfg, tiny_params, seed):
    """sum IG(e; e') = f(e) - f(e') within GL_ATOL, f from an independent forward pass (e
    looked up in the embedding table): from the default baseline with 16 nodes, and from a
    corrupted run's embedding with 32 (a longer, more curved path). The default is zeros: IG
    from an explicit zero baseline (32 nodes) matches elementwise (atol 1e-6; LayerNorm makes
    f blind to adding c * ones to a position's embedding, so completeness alone would not
    notice a baseline of ones). With the same 16 nodes left-Riemann fails the tolerance:
    the residual tells an unconverged rule apart."""
    tokens = random_tokens(tiny_cfg, seed)
    e = jnp.asarray(embed_table(tiny_params)[np.asarray(tokens)])
    zero = jnp.zeros_like(e)
    f = embed_metric_fn(tiny_cfg)
    (attr, res), (_, left), (attr0, _) = ig_embed_fn(tiny_cfg)(tiny_params, tokens, zero)
    assert attr.shape == e.shape
    assert abs(float(res)) < GL_ATOL
    assert abs(total(attr) - float(f(tiny_params, tokens, e) - f(tiny_params, tokens, zero))) < GL_ATOL
    assert abs(float(left)) > GL_ATOL
    np.testing.assert_allclose(attr0, attr, rtol=1e-4, atol=1e-6)

    corrupt = jnp.asarray(embed_table(tiny_params)[np.asarray(random_tokens(tiny_cfg, seed + 1))])
    *_, (attr_c, res_c) = ig_embed_fn(tiny_cfg)(tiny_params, tokens, corrupt)
    assert abs(float(res_c)) < GL_ATOL
    assert abs(total(attr_c) - float(f(tiny_params, tokens, e) - f(tiny_params, tokens, corrupt))) < GL_ATOL


@given(seed=seeds, scale=st.floats(0.1, 0.3))
def test_ig_params_completeness(tiny_cfg, tiny_params, seed, scale):
    """sum over all parameters of IG(theta1; theta0) = f(theta1) - f(theta0) within GL_ATOL,
    theta1 = theta0 + scale * noise, both f from an independent forward pass; IG has the
    structure of params."""
    tokens = random_tokens(tiny_cfg, seed)
    p1 = perturbed(tiny_params, seed, scale)
    attr, res = ig_params_fn(tiny_cfg)(tiny_params, p1, tokens)
    assert jax.tree.structure(attr) == jax.tree.structure(tiny_params)
    f = embed_metric_fn(tiny_cfg)
    t = np.asarray(tokens)
    df = f(p1, tokens, jnp.asarray(embed_table(p1)[t])) - f(tiny_params, tokens, jnp.asarray(embed_table(tiny_params)[t]))
    assert abs(float(res)) < GL_ATOL
    assert abs(total(attr) - float(df)) < GL_ATOL


@pytest.mark.slow
@given(seed=seeds, scale=st.floats(0.1, 0.3))
def test_ig_params_residual_tells_rules_apart(tiny_cfg, tiny_params, seed, scale):
    """On the parameter path, with the same 16 nodes Gauss-Legendre passes GL_ATOL and
    left-Riemann fails it (one more compile of the parameter IG: slow)."""
    tokens = random_tokens(tiny_cfg, seed)
    p1 = perturbed(tiny_params, seed, scale)
    _, gl = ig_params_fn(tiny_cfg)(tiny_params, p1, tokens)
    _, left = ig_params_fn(tiny_cfg, "riemann_left")(tiny_params, p1, tokens)
    assert abs(float(gl)) < GL_ATOL < abs(float(left))


# ------------------------------------------------------------------ IG axioms on hand-written functions
N_IN, N_HID = 6, 8


def smooth_net(w, x):
    """Uses only x[:3]: x[3:] are dummies."""
    A, v = w
    return v @ jnp.tanh(A @ x[:3])


def relu_net(w, x):
    W, b, v = w
    return v @ jax.nn.relu(W @ x + b)


def bias_free_net(w, x):
    """Positively homogeneous of degree 1: f(a x) = a f(x) for a > 0."""
    W1, W2, v = w
    return v @ jax.nn.relu(W2 @ jax.nn.relu(W1 @ x))


def f32_tol(*terms) -> float:
    """Float32 rounding bound for a sum of these terms: 1e-6 (~8 eps) x (1 + sum of |terms|)."""
    return 1e-6 * (1 + sum(float(np.abs(np.asarray(t, np.float64)).sum()) for t in terms))


def draw(seed, *shapes):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


@functools.cache
def pure_ig(net, steps=32, rule="gauss_legendre"):
    return jax.jit(lambda w, x, x0: ig.integrated_gradients(functools.partial(net, w), x, x0, steps, rule))


@jax.jit
def linearity_parts(a, b, w1, w2, x, x0):
    """(IG, residual) of a f1 + b f2, of f1 and of f2 (f1 = smooth_net(w1), f2 = relu_net(w2))."""
    both = ig.integrated_gradients(lambda z: a * smooth_net(w1, z) + b * relu_net(w2, z), x, x0, 32)
    return both, ig.integrated_gradients(functools.partial(smooth_net, w1), x, x0, 32), ig.integrated_gradients(functools.partial(relu_net, w2), x, x0, 32)


@jax.jit
def relu_pair(w, w_same, x, x0):
    """f(x) and IG of relu_net under two parameterisations."""
    return [(relu_net(v, x), ig.integrated_gradients(functools.partial(relu_net, v), x, x0, 32)[0]) for v in (w, w_same)]


@jax.jit
def euler_parts(w, x):
    """For bias_free_net(w) at x: IG from 0 with its residual, grad_times_delta_fn from 0,
    x * df/dx, and f(x)."""
    f = functools.partial(bias_free_net, w)
    zero = jnp.zeros_like(x)
    return ig.integrated_gradients(f, x, zero, 32), gr.grad_times_delta_fn(f, x, zero), x * jax.grad(f)(x), f(x)


IG_SMOOTH_ALL_RULES = jax.jit(lambda w, x, x0: [ig.integrated_gradients(functools.partial(smooth_net, w), x, x0, 5, r)[0] for r in ig.RULES])


@given(seed=seeds)
def test_ig_dummy(seed):
    """A coordinate f does not depend on gets exactly 0, under every rule."""
    w = draw(seed, (N_HID, 3), (N_HID,))
    x, x0 = draw(seed + 1, (N_IN,), (N_IN,))
    for rule, attr in zip(ig.RULES, IG_SMOOTH_ALL_RULES(w, x, x0), strict=True):
        assert np.array_equal(np.asarray(attr[3:]), np.zeros(N_IN - 3)), rule
        assert np.all(np.asarray(attr[:3]) != 0), rule


@given(seed=seeds, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_ig_linearity(seed, a, b):
    """IG(a f1 + b f2) = a IG(f1) + b IG(f2), residuals too (to float32 rounding, f32_tol)."""
    w1 = draw(seed, (N_HID, 3), (N_HID,))
    w2 = draw(seed + 1, (N_HID, N_IN), (N_HID,), (N_HID,))
    x, x0 = draw(seed + 2, (N_IN,), (N_IN,))
    (both, res), (i1, r1), (i2, r2) = linearity_parts(np.float32(a), np.float32(b), w1, w2, x, x0)
    tol = f32_tol(a * np.asarray(i1), b * np.asarray(i2))
    np.testing.assert_allclose(both, a * np.asarray(i1) + b * np.asarray(i2), rtol=1e-5, atol=tol)
    assert abs(float(res) - (a * float(r1) + b * float(r2))) < tol


@given(seed=seeds, log_c=st.lists(st.floats(-2, 2), min_size=N_HID, max_size=N_HID))
def test_ig_implementation_invariance(seed, log_c):
    """Scaling hidden unit j by c_j > 0 on the way in and 1/c_j on the way out gives the same
    function (relu(c z) = c relu(z)), hence the same IG (float32 rounding: rtol 1e-4, f32_tol)."""
    W, b, v = (np.asarray(a) for a in draw(seed, (N_HID, N_IN), (N_HID,), (N_HID,)))
    c = np.exp(np.asarray(log_c, np.float32))
    x, x0 = draw(seed + 1, (N_IN,), (N_IN,))
    (f, attr), (f_same, attr_same) = relu_pair((W, b, v), (W * c[:, None], b * c, v / c), x, x0)
    np.testing.assert_allclose(f_same, f, rtol=1e-5, atol=f32_tol(f))
    np.testing.assert_allclose(attr_same, attr, rtol=1e-4, atol=f32_tol(attr))


@given(seed=seeds)
def test_ig_euler_bias_free_relu(seed):
    """For a bias-free ReLU net and x' = 0 the gradient is constant along the path (degree-0
    homogeneous), so IG = x * df/dx exactly (Gauss-Legendre nodes avoid 0) and
    sum IG = sum_i x_i df/dx_i = f(x) (Euler), to float32 rounding (f32_tol)."""
    w = draw(seed, (N_HID, N_IN), (N_HID, N_HID), (N_HID,))
    (x,) = draw(seed + 1, (N_IN,))
    (attr, res), _, x_grad, f = euler_parts(w, x)
    tol = f32_tol(x_grad)
    np.testing.assert_allclose(attr, x_grad, rtol=1e-5, atol=tol)
    assert abs(float(np.asarray(attr).sum()) - float(f)) < tol
    assert abs(float(res)) < tol


@given(k=st.integers(1, 10), seed=seeds)
def test_gauss_legendre_exact_to_degree_2k_minus_1(k, seed):
    """K Gauss-Legendre nodes integrate every polynomial of degree 2K-1 on [0, 1] exactly
    (float64: rtol 1e-12) and miss a^(2K) (by K!^4 / ((2K+1) (2K)!^2), the rule's error term; rtol 1e-3:
    float64 cancellation in 1/(2K+1) - sum w a^(2K) at K = 10)."""
    coef = np.random.default_rng(seed).standard_normal(2 * k)
    nodes, weights = ig.quadrature(k, "gauss_legendre")
    exact = (coef / np.arange(1, 2 * k + 1)).sum()
    np.testing.assert_allclose(weights @ np.polynomial.polynomial.polyval(nodes, coef), exact, rtol=1e-12, atol=1e-12)
    err = 1 / (2 * k + 1) - weights @ nodes ** (2 * k)
    np.testing.assert_allclose(err, math.factorial(k) ** 4 / ((2 * k + 1) * math.factorial(2 * k) ** 2), rtol=1e-3)


@functools.cache
def monomials(n):
    return lambda c, z: (c * z**n).sum()


@given(k=st.integers(2, 50))
def test_quadrature_rules_known_errors(k):
    """Every rule's weights sum to 1 (exact on constants); on a -> a the errors are
    1/(2K) (left), -1/(2K) (right), 0 (mid, trapezoid, Gauss-Legendre); on a -> a^2 they are
    1/(12 K^2) (mid), -1/(6 (K-1)^2) (trapezoid, K-1 intervals), 0 (Gauss-Legendre). float64: atol 1e-12."""
    expected = {
        "riemann_left": (1 / (2 * k), None),
        "riemann_right": (-1 / (2 * k), None),
        "riemann_mid": (0.0, 1 / (12 * k**2)),
        "trapezoid": (0.0, -1 / (6 * (k - 1) ** 2)),
        "gauss_legendre": (0.0, 0.0),
    }
    for rule, (err1, err2) in expected.items():
        nodes, weights = ig.quadrature(k, rule)
        assert nodes.shape == weights.shape == (k,), rule
        assert np.all((nodes >= 0) & (nodes <= 1)), rule
        np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-12, err_msg=rule)
        np.testing.assert_allclose(1 / 2 - weights @ nodes, err1, atol=1e-12, err_msg=rule)
        if err2 is not None:
            np.testing.assert_allclose(1 / 3 - weights @ nodes**2, err2, atol=1e-12, err_msg=rule)


@given(seed=seeds)
def test_ig_gauss_legendre_exact_on_polynomial_paths(seed):
    """f(x) = sum_i c_i x_i^n: along a straight path the integrand g(a) = df/da is a polynomial
    of degree n-1 in a. With K = 3 Gauss-Legendre nodes, n = 6 (degree 5 = 2K-1) makes IG
    complete to float32 rounding; for n = 8 (degree 7) the residual is the rule's own error,
    sum_k w_k g(a_k) - int_0^1 g, which it must equal (computed in float64). Tolerance
    1e-5 * (sum_i |c_i| (|x_i|^n + |x'_i|^n) + 1): float32 rounding of f."""
    c, x, x0 = (np.asarray(a, np.float64) for a in draw(seed, (N_IN,), (N_IN,), (N_IN,)))
    nodes, weights = ig.quadrature(3, "gauss_legendre")
    for n in (6, 8):
        _, res = pure_ig(monomials(n), 3)(*(jnp.asarray(a, jnp.float32) for a in (c, x, x0)))
        path = x0 + nodes[:, None] * (x - x0)  # [K, N]
        rule_error = weights @ (c * n * path ** (n - 1) * (x - x0)).sum(1) - (c * (x**n - x0**n)).sum()
        scale = (np.abs(c) * (np.abs(x) ** n + np.abs(x0) ** n)).sum() + 1
        if n == 6:
            assert abs(rule_error) < 1e-9 * scale
        assert abs(float(res) - rule_error) < 1e-5 * scale, n


# ------------------------------------------------------------------ gradient x delta
@given(seed=seeds)
def test_grad_times_delta_euler(seed):
    """Bias-free ReLU net, zero baseline: gradient x delta = x * df/dx elementwise, and its sum
    is f(x) (Euler; to float32 rounding, f32_tol)."""
    w = draw(seed, (N_HID, N_IN), (N_HID, N_HID), (N_HID,))
    (x,) = draw(seed + 1, (N_IN,))
    _, gtd, x_grad, f = euler_parts(w, x)
    np.testing.assert_array_equal(gtd, x_grad)
    assert abs(float(np.asarray(gtd).sum()) - float(f)) < f32_tol(gtd)


GTD_SITE = "blocks.0.attn.hook_z"


@functools.cache
def gtd_vs_ig_fn(cfg):
    def f(p, tokens, baseline):
        m = answer_metric(cfg)
        value = model.apply(cfg, p, tokens)[1][GTD_SITE]
        gtd = gr.grad_times_delta(cfg, p, tokens, m, GTD_SITE, baseline)
        step, _ = ig.ig_site(cfg, p, tokens, m, GTD_SITE, value, baseline, steps=1, rule="riemann_left")
        return gtd, step

    return jax.jit(f)


@given(seed=seeds)
def test_grad_times_delta_is_one_left_riemann_step(tiny_cfg, tiny_params, seed, same_numbers):
    """On the model, at hook_z with a corrupted run's value as baseline a':
    (a - a') * dm/da at a = -(one left-Riemann IG node along a -> a'), bit for bit on the
    default emitters (the node sits at alpha = 0, where a + 0 (a' - a) = a exactly)."""
    tokens, corrupt = random_tokens(tiny_cfg, seed), random_tokens(tiny_cfg, seed + 1)
    baseline = forward_fn(tiny_cfg)(tiny_params, corrupt)[1][GTD_SITE]
    gtd, step = gtd_vs_ig_fn(tiny_cfg)(tiny_params, tokens, baseline)
    same_numbers(gtd, -np.asarray(step))
    assert np.any(np.asarray(gtd) != 0)


# ------------------------------------------------------------------ IG at a site = patching effect (reference model)
REF_SITES = ("blocks.1.hook_resid_pre", "blocks.0.attn.hook_z")
# REF_ATOL: Gauss-Legendre with 32 nodes on the reference model (LayerNorm, GELU, softmax; two
# layers): the rule's error is below float32 rounding of f (|f| ~ 1-20 over 4 rows) and of the
# ~5e3-term sum; measured |residual| <= 4e-6 over 60 (init, tokens) draws, effects 5e-3 .. ~5.
REF_ATOL = 1e-4


@pytest.fixture(scope="session")
def ref_setup(tiny_cfg):
    """(reference config, jitted check): the model of the demo, one compile."""
    cfg = dataclasses.replace(tiny_cfg, model=presets.reference())

    def check(key, clean, corrupt):
        """Per site: (sum IG, residual, independent patch effect m(site <- clean) - m(site <- corrupt))."""
        p, m = model.init_params(cfg, key), answer_metric(cfg)
        clean_cache, corrupt_cache = model.apply(cfg, p, clean)[1], model.apply(cfg, p, corrupt)[1]
        out = {}
        for site in REF_SITES:
            attr, res = ig.ig_site(cfg, p, clean, m, site, corrupt_cache[site], clean_cache[site], steps=32)
            patched = [core.forward(cfg, p, clean, m, {site: Intervention(replace=v[site])})[0].sum() for v in (clean_cache, corrupt_cache)]
            out[site] = (attr.sum(), res, patched[0] - patched[1])
        return out

    return cfg, jax.jit(check)


@settings(max_examples=4)
@given(seed=seeds)
def test_ig_site_sums_to_patching_effect(ref_setup, seed):
    """Reference model (fresh init from the seed), clean vs corrupted tokens, at a residual
    site and at hook_z: IG from the corrupted run's value to the clean run's sums to the
    full-site patching effect, computed independently as m(site <- clean) - m(site <- corrupt):
    |residual| < REF_ATOL and |sum IG - effect| < REF_ATOL, while the effect is not small (> 1e-3)."""
    cfg, check = ref_setup
    out = check(jax.random.key(seed), random_tokens(cfg, seed), random_tokens(cfg, seed + 1))
    for site, (s, res, effect) in out.items():
        assert abs(float(res)) < REF_ATOL, site
        assert abs(float(s) - float(effect)) < REF_ATOL, site
        assert abs(float(effect)) > 1e-3, site


# ------------------------------------------------------------------ per-example and token-group gradients
# Gradient identities: float32 sums of <= 80 terms of size <= 1 in different orders: rtol 1e-5, atol 1e-6.
SUM_TOL = {"rtol": 1e-5, "atol": 1e-6}


@functools.cache
def per_example_fn(cfg):
    return jax.jit(functools.partial(gr.per_example_grads, cfg))


@functools.cache
def group_grads_fn(cfg):
    return jax.jit(functools.partial(gr.token_group_grads, cfg))


def test_per_example_grads_mean_is_batch_grad(tiny_cfg, tiny_params, cot_batch):
    """Task batches have the same number of targets n_b in every row: mean_b g_b = dL/dtheta."""
    n = np.asarray(gr.target_counts(cot_batch))
    assert np.all(n == n[0]) and n[0] > 0
    g = per_example_fn(tiny_cfg)(tiny_params, cot_batch, cot_batch.loss_mask)
    assert all(x.shape[0] == B for x in jax.tree.leaves(g))
    assert_leaves_close([x.mean(0) for x in leaves(g)], leaves(batch_grad_fn(tiny_cfg)(tiny_params, cot_batch, cot_batch.loss_mask)), **SUM_TOL)


@given(seed=seeds)
def test_per_example_grads_weighted_sum_is_batch_grad(tiny_cfg, tiny_params, cot_batch, seed):
    """For any mask: dL/dtheta = sum_b (n_b / N) g_b with N = sum_b n_b (a row may have no
    targets: its g_b is 0); the plain mean differs when the n_b differ."""
    rng = np.random.default_rng(seed)
    mask = rng.random(cot_batch.loss_mask.shape) < rng.random((B, 1))  # any positions; position 0 never counts
    mask[0, world.layout(tiny_cfg.task).answer] = True  # N > 0
    n = np.asarray(gr.target_counts(cot_batch, jnp.asarray(mask)), np.float64)
    np.testing.assert_array_equal(n, mask[:, 1:].sum(1))
    g = leaves(per_example_fn(tiny_cfg)(tiny_params, cot_batch, jnp.asarray(mask)))
    full = leaves(batch_grad_fn(tiny_cfg)(tiny_params, cot_batch, jnp.asarray(mask)))
    assert_leaves_close([np.tensordot(n / n.sum(), x, axes=1) for x in g], full, **SUM_TOL)
    for b in np.flatnonzero(n == 0):
        assert all(not x[b].any() for x in g)


def test_token_group_grads_reasoning_answer_other(tiny_cfg, tiny_params, cot_batch):
    """target_groups(task) (reasoning / answer / other) partitions every row's targets and
    matches the batch's masks; the group gradients add up to dL/dtheta, and group g equals
    (n_g / N) * the gradient of masked_loss restricted to group g."""
    groups = gr.target_groups(tiny_cfg.task)
    loss = np.asarray(cot_batch.loss_mask)
    np.testing.assert_array_equal(np.broadcast_to(groups.sum(0), loss.shape), loss)  # a partition
    np.testing.assert_array_equal(np.broadcast_to(groups[0], loss.shape), np.asarray(cot_batch.reasoning_mask))
    np.testing.assert_array_equal(np.broadcast_to(groups[1], loss.shape), np.asarray(cot_batch.answer_mask))
    assert groups[:, 1:].any(axis=1).all()  # none empty
    gg = leaves(group_grads_fn(tiny_cfg)(tiny_params, cot_batch, jnp.asarray(groups)))
    assert all(x.shape[0] == 3 for x in gg)
    full = leaves(batch_grad_fn(tiny_cfg)(tiny_params, cot_batch, cot_batch.loss_mask))
    assert_leaves_close([x.sum(0) for x in gg], full, **SUM_TOL)
    N = loss[:, 1:].sum()
    for i, group in enumerate(groups):
        mask = np.broadcast_to(group, loss.shape)
        expected = [x * (mask[:, 1:].sum() / N) for x in leaves(batch_grad_fn(tiny_cfg)(tiny_params, cot_batch, jnp.asarray(mask)))]
        assert_leaves_close([x[i] for x in gg], expected, **SUM_TOL)


@given(labels=st.lists(st.integers(0, 2), min_size=20, max_size=20))
def test_token_group_grads_any_partition_adds_up(tiny_cfg, tiny_params, cot_batch, labels):
    """groups bool[3, T] from one label per position, a partition of all positions and hence
    of the targets: sum_g dL_g/dtheta = dL/dtheta."""
    groups = np.eye(3, dtype=bool)[np.asarray(labels)].T
    gg = leaves(group_grads_fn(tiny_cfg)(tiny_params, cot_batch, jnp.asarray(groups)))
    assert_leaves_close([x.sum(0) for x in gg], leaves(batch_grad_fn(tiny_cfg)(tiny_params, cot_batch, cot_batch.loss_mask)), **SUM_TOL)


# ------------------------------------------------------------------ stop-gradient; input gradients
STOP_SITE = "blocks.0.hook_resid_pre"  # = embed + pos: the embedding at t reaches the rest only through it


def loss_metric(loss_mask):
    """Row b's share of masked_loss: sum_t ce_bt m_bt / N, m = loss_mask[:, 1:], N = sum m; so
    sum_b is train.masked_loss."""
    m = loss_mask[:, 1:].astype(jnp.float32)

    def metric(logits, tokens):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return (ce * m).sum(axis=1) / m.sum()

    return metric


@functools.cache
def stopped_fn(cfg):
    """jit: (input_grad of loss_metric(loss_mask), logits, cache), gradients stopped at
    STOP_SITE where stop (bool[B, T])."""

    def f(p, tokens, loss_mask, stop):
        ivs = {STOP_SITE: Intervention(stop_grad=stop[:, :, None])}
        logits, cache = model.apply(cfg, p, tokens, ivs)
        return gr.input_grad(cfg, p, tokens, loss_metric(loss_mask), ivs), logits, cache

    return jax.jit(f)


@given(seed=seeds, stop_at=st.lists(st.booleans(), min_size=16, max_size=16).filter(any))
def test_stop_grad_changes_backward_only(tiny_cfg, tiny_params, cot_batch, seed, stop_at):
    """Stopping gradients at blocks.0.hook_resid_pre at positions S (drawn among the 16
    positions before the answer): logits and cache equal the plain forward pass bit for bit;
    the embedding gradient is exactly 0 at S (its only path runs through the stopped
    positions) and bit for bit the uncut one elsewhere, so it differs from the uncut one."""
    tokens = random_tokens(tiny_cfg, seed)
    none = np.zeros((B, tiny_cfg.task.seq_len), bool)
    stop = none.copy()
    stop[:, : len(stop_at)] = stop_at
    g_cut, logits_cut, cache_cut = stopped_fn(tiny_cfg)(tiny_params, tokens, cot_batch.loss_mask, jnp.asarray(stop))
    g = stopped_fn(tiny_cfg)(tiny_params, tokens, cot_batch.loss_mask, jnp.asarray(none))[0]
    logits, cache = forward_fn(tiny_cfg)(tiny_params, tokens)
    assert np.array_equal(np.asarray(logits_cut), np.asarray(logits))
    assert cache_cut.keys() == cache.keys()
    assert all(np.array_equal(np.asarray(cache_cut[k]), np.asarray(cache[k])) for k in cache)
    assert np.array_equal(np.asarray(g_cut), np.where(stop[:, :, None], 0.0, np.asarray(g)))
    assert not np.array_equal(np.asarray(g_cut), np.asarray(g))


def test_input_grad_is_embedding_table_grad(tiny_cfg, tiny_params, cot_batch):
    """For the loss as metric: input_grad summed over the positions holding token v equals
    d masked_loss / d E[v], the parameter gradient from train.masked_loss (rtol 1e-4: two
    float32 sums in different orders)."""
    none = jnp.zeros(cot_batch.tokens.shape, bool)
    g = np.asarray(stopped_fn(tiny_cfg)(tiny_params, cot_batch.tokens, cot_batch.loss_mask, none)[0])
    table = batch_grad_fn(tiny_cfg)(tiny_params, cot_batch, cot_batch.loss_mask)["embed"]["embedding"][...]
    by_token = np.zeros(table.shape, np.float32)
    np.add.at(by_token, np.asarray(cot_batch.tokens).ravel(), g.reshape(-1, g.shape[-1]))
    np.testing.assert_allclose(by_token, table, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_gradients_vmap_over_models(tiny_cfg, tiny_params, cot_batch):
    """Under vmap over two stacked models, input_grad and token_group_grads give each model's
    own result (rtol 1e-5, atol 1e-7 ~ 1e-6 of the largest entry: batched matmuls round
    differently). Slow: two more compiles."""
    other = perturbed(tiny_params, 1, 0.5)
    stacked = jax.tree.map(lambda a, b: np.stack([a, b]), tiny_params, other)
    groups = jnp.asarray(gr.target_groups(tiny_cfg.task))
    none = jnp.zeros(cot_batch.tokens.shape, bool)

    def both(p):
        return gr.input_grad(tiny_cfg, p, cot_batch.tokens, loss_metric(cot_batch.loss_mask)), gr.token_group_grads(tiny_cfg, p, cot_batch, groups)

    gv, ggv = jax.jit(jax.vmap(both))(stacked)
    for i, p in enumerate((tiny_params, other)):
        np.testing.assert_allclose(gv[i], stopped_fn(tiny_cfg)(p, cot_batch.tokens, cot_batch.loss_mask, none)[0], rtol=1e-5, atol=1e-7)
        single = leaves(group_grads_fn(tiny_cfg)(p, cot_batch, groups))
        assert_leaves_close([x[i] for x in leaves(ggv)], single, rtol=1e-5, atol=1e-7)
