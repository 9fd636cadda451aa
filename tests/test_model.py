"""The transformer: causality, interventions at every site, the cache, and input validation.

Runs on the tiny config and a variant without LayerNorm and MLPs. Gradients go through
jitted functions of fixed shape (one compile per config); hypothesis draws positions and
token values. Forward-only checks run eagerly (op-by-op, no whole-program compile).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import model
from toymesa.model import Intervention
from toymesa.tasks import vocab

B = 2  # batch rows in every model test


@pytest.fixture(scope="session", params=["tiny", "variant"])
def setup(request):
    """(cfg, params) for the tiny model and the no-LayerNorm, attention-only variant."""
    return request.getfixturevalue(f"{request.param}_cfg"), request.getfixturevalue(f"{request.param}_params")


def sizes(cfg):
    return cfg.task.seq_len, cfg.model.d_model, vocab(cfg.task).size


def token_grid(cfg):
    """Strategy: int32[B, T] token arrays with values anywhere in the vocabulary (fixed shape)."""
    T, _, V = sizes(cfg)
    return st.lists(st.integers(0, V - 1), min_size=B * T, max_size=B * T).map(lambda x: jnp.asarray(x, jnp.int32).reshape(B, T))


def expected_sites(cfg) -> dict:
    """Site name -> shape, from the model.py docstring."""
    T, D, _ = sizes(cfg)
    H, Dh, M = cfg.model.n_heads, cfg.model.d_head, cfg.model.d_mlp
    shapes = {"hook_embed": (B, T, D), "hook_pos_embed": (B, T, D), "ln_final.hook_normalized": (B, T, D)}
    for layer in range(cfg.model.n_layers):
        p = f"blocks.{layer}"
        for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out"):
            shapes[f"{p}.{n}"] = (B, T, D)
        for n in ("hook_q", "hook_k", "hook_v", "hook_z"):
            shapes[f"{p}.attn.{n}"] = (B, T, H, Dh)
        shapes[f"{p}.attn.hook_pattern"] = (B, H, T, T)
        if not cfg.model.attn_only:
            shapes[f"{p}.hook_mlp_out"] = (B, T, D)
            shapes[f"{p}.mlp.hook_pre"] = shapes[f"{p}.mlp.hook_post"] = (B, T, M)
    return shapes


def some_tokens(cfg, seed=0):
    T, _, V = sizes(cfg)
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V, jnp.int32)


@functools.cache
def readout_grad(cfg):
    """jit: gradient of <logits[b, t], direction> w.r.t. an additive intervention at hook_embed.

    `stop` (bool[B, T, 1]) stops gradients at blocks.0.hook_resid_pre where True.
    """

    def f(params, tokens, b, t, direction, stop):
        def readout(add):
            ivs = {"hook_embed": Intervention(add=add), "blocks.0.hook_resid_pre": Intervention(stop_grad=stop)}
            logits, _ = model.apply(cfg, params, tokens, ivs)
            return (logits[b, t] * direction).sum()

        return jax.grad(readout)(jnp.zeros(tokens.shape + (cfg.model.d_model,)))

    return jax.jit(f)


def grad_norms(setup, tokens, b, t, stop=None):
    cfg, params = setup
    T, _, V = sizes(cfg)
    direction = jax.random.normal(jax.random.key(t), (V,))
    stop = jnp.zeros((B, T, 1), bool) if stop is None else stop
    g = readout_grad(cfg)(params, tokens, b, t, direction, stop)
    return np.linalg.norm(np.asarray(g), axis=-1)  # [B, T]


# ------------------------------------------------------------------ causality
@given(data=st.data())
def test_causality_through_gradients(setup, data):
    cfg, _ = setup
    T = cfg.task.seq_len
    tokens = data.draw(token_grid(cfg), label="tokens")
    t = data.draw(st.integers(0, T - 1), label="t")
    b = data.draw(st.integers(0, B - 1), label="b")
    g = grad_norms(setup, tokens, b, t)
    assert (g[:, t + 1 :] == 0).all()  # exactly zero: no path from later positions
    assert (g[1 - b] == 0).all()  # nor from other rows
    assert (g[b, : t + 1] > 0).all()  # every earlier position (and t itself) is read


# ------------------------------------------------------------------ interventions
def test_replace_by_own_cache_is_identity(setup):
    cfg, params = setup
    tokens = some_tokens(cfg)
    logits, cache = model.apply(cfg, params, tokens)
    assert set(cache) == set(expected_sites(cfg))
    for name in cache:
        patched, _ = model.apply(cfg, params, tokens, {name: Intervention(replace=cache[name])})
        # same values written back: identical up to float32 rounding (tolerance 1e-6)
        np.testing.assert_allclose(patched, logits, rtol=1e-6, atol=1e-6, err_msg=name)


def test_add_zero_and_stop_grad_do_not_change_values(setup):
    cfg, params = setup
    tokens = some_tokens(cfg)
    logits, cache = model.apply(cfg, params, tokens)
    for name, x in cache.items():
        ones = jnp.ones(x.shape, bool)
        out, _ = model.apply(cfg, params, tokens, {name: Intervention(add=jnp.zeros(x.shape), stop_grad=ones)})
        np.testing.assert_array_equal(out, logits, err_msg=name)  # x + 0 and stop_gradient are exact


@given(data=st.data(), b=st.integers(0, B - 1), seed=st.integers(0, 2**30))
def test_masked_replace_changes_only_downstream(setup, data, b, seed):
    cfg, params = setup
    T, D, _ = sizes(cfg)
    s = data.draw(st.integers(0, T - 1), label="s")
    tokens = some_tokens(cfg)
    logits, _ = model.apply(cfg, params, tokens)
    mask = (jnp.arange(B)[:, None, None] == b) & (jnp.arange(T)[None, :, None] == s)  # bool[B, T, 1]
    noise = 3.0 * jax.random.normal(jax.random.key(seed), (B, T, D))
    last = f"blocks.{cfg.model.n_layers - 1}.hook_resid_post"
    for site, first_changed in (("hook_embed", s), (last, s)):
        out, cache = model.apply(cfg, params, tokens, {site: Intervention(replace=noise, replace_mask=mask)})
        np.testing.assert_array_equal(np.asarray(cache[site])[b, s], np.asarray(noise)[b, s])
        delta = np.abs(np.asarray(out - logits)).max(axis=-1)  # [B, T]
        changed = np.zeros((B, T), bool)
        # downstream of (b, s): positions >= s of row b through attention; only s after the last block
        changed[b, first_changed : (T if site == "hook_embed" else s + 1)] = True
        assert (delta[~changed] == 0).all(), site  # untouched positions are bit-identical
        assert delta[b, s] > 0, site


def test_stop_grad_everywhere_cuts_upstream_gradient(setup):
    cfg, _ = setup
    T = cfg.task.seq_len
    g = grad_norms(setup, some_tokens(cfg), 0, T - 1, stop=jnp.ones((B, T, 1), bool))
    assert (g == 0).all()


@given(data=st.data())
def test_stop_grad_with_mask_cuts_only_masked_paths(setup, data):
    cfg, _ = setup
    T = cfg.task.seq_len
    s, t = data.draw(st.integers(0, T - 1), label="s"), data.draw(st.integers(0, T - 1), label="t")
    stop = jnp.zeros((B, T, 1), bool).at[:, s].set(True)
    g = grad_norms(setup, some_tokens(cfg), 0, t, stop=stop)
    # hook_embed at s reaches the output only through resid_pre at s
    assert (g[:, s] == 0).all()
    assert (g[0, : t + 1][np.arange(t + 1) != s] > 0).all()


def test_unknown_site_raises(setup):
    cfg, params = setup
    tokens = some_tokens(cfg)
    with pytest.raises(ValueError, match="blocks.9.hook_nope"):
        model.apply(cfg, params, tokens, {"blocks.9.hook_nope": Intervention(add=0.0)})
    if cfg.model.attn_only:
        with pytest.raises(ValueError, match="hook_mlp_out"):
            model.apply(cfg, params, tokens, {"blocks.0.hook_mlp_out": Intervention(add=0.0)})


# ------------------------------------------------------------------ cache
def test_cache_names_shapes_and_semantics(setup):
    cfg, params = setup
    tokens = some_tokens(cfg)
    logits, cache = model.apply(cfg, params, tokens)
    T, _, V = sizes(cfg)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
    want = expected_sites(cfg)
    assert {k: tuple(v.shape) for k, v in cache.items()} == want
    np.testing.assert_array_equal(cache["hook_pos_embed"][0], cache["hook_pos_embed"][1])  # position only
    atol = 1e-5  # float32 sums of O(1) activations
    for layer in range(cfg.model.n_layers):
        p = f"blocks.{layer}"
        pat = np.asarray(cache[f"{p}.attn.hook_pattern"])
        np.testing.assert_allclose(pat.sum(-1), 1.0, atol=atol)
        assert (pat[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()  # causal
        np.testing.assert_allclose(cache[f"{p}.hook_resid_mid"], cache[f"{p}.hook_resid_pre"] + cache[f"{p}.hook_attn_out"], atol=atol)
        post = cache[f"{p}.hook_resid_mid"] + (0 if cfg.model.attn_only else cache[f"{p}.hook_mlp_out"])
        np.testing.assert_allclose(cache[f"{p}.hook_resid_post"], post, atol=atol)
    np.testing.assert_allclose(cache["blocks.0.hook_resid_pre"], cache["hook_embed"] + cache["hook_pos_embed"], atol=atol)
    if not cfg.model.layer_norm:
        last = f"blocks.{cfg.model.n_layers - 1}.hook_resid_post"
        np.testing.assert_array_equal(cache["ln_final.hook_normalized"], cache[last])


# ------------------------------------------------------------------ input validation
@given(data=st.data(), row=st.integers(0, B - 1))
def test_check_tokens_names_the_bad_id(tiny_cfg, data, row):
    T, _, V = sizes(tiny_cfg)
    bad = data.draw(st.one_of(st.integers(-1000, -1), st.integers(V, V + 1000)), label="bad")
    col = data.draw(st.integers(0, T - 1), label="col")
    tokens = np.zeros((B, T), np.int32)
    model.check_tokens(tiny_cfg, tokens)  # valid: no error
    tokens[row, col] = bad
    with pytest.raises(ValueError, match=rf"token id {bad}\b"):
        model.check_tokens(tiny_cfg, tokens)


@pytest.mark.parametrize("shape_of", [lambda T: (T,), lambda T: (B, T + 1), lambda T: (B, T, 1)])
def test_check_tokens_rejects_bad_shapes(tiny_cfg, shape_of):
    shape = shape_of(tiny_cfg.task.seq_len)
    with pytest.raises(ValueError, match="shape"):
        model.check_tokens(tiny_cfg, np.zeros(shape, np.int32))


def test_check_tokens_accepts_shorter_sequences(tiny_cfg):
    model.check_tokens(tiny_cfg, np.zeros((B, 3), np.int32))


def test_apply_rejects_float_tokens_and_long_sequences(tiny_cfg, tiny_params):
    T = tiny_cfg.task.seq_len
    with pytest.raises(ValueError, match="integers"):
        model.apply(tiny_cfg, tiny_params, jnp.zeros((B, T), jnp.float32))
    with pytest.raises(ValueError, match=str(T + 1)):
        model.apply(tiny_cfg, tiny_params, jnp.zeros((B, T + 1), jnp.int32))


def test_shorter_sequences_give_the_prefix_logits(tiny_cfg, tiny_params):
    tokens = some_tokens(tiny_cfg)
    full, _ = model.apply(tiny_cfg, tiny_params, tokens)
    short, _ = model.apply(tiny_cfg, tiny_params, tokens[:, :5])
    np.testing.assert_allclose(short, full[:, :5], rtol=1e-5, atol=1e-5)  # causal model: prefix logits (float32 reorderings)
