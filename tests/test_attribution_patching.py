"""Activation patching, path patching, AtP and EAP against answers known by construction.

Two configs, one compiled program (`_all`) each: `variant_cfg` (one layer, attention-only, no
LayerNorm: the logit difference is affine in every head output, so AtP is exact there) and a
two-layer version of `tiny_cfg` (LayerNorm and MLPs: "reference-style", where it is not).
Hypothesis draws token seeds, layers, positions and heads, never shapes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import model
from toymesa.attribution import atp, core, ig, patching
from toymesa.model import Intervention
from toymesa.tasks import layout, vocab

B = 4
CASES = [("deep", "hook_z", 1), ("deep", "hook_mlp_out", 0)]  # (model, kind, layer) of single patches: one compile each


@pytest.fixture(scope="module")
def deep_cfg(tiny_cfg):
    """Two layers with LayerNorm and MLPs."""
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, n_layers=2))


@pytest.fixture(scope="module")
def deep_params(deep_cfg):
    return jax.jit(model.init_params, static_argnums=0)(deep_cfg, jax.random.key(2))  # one compile, not one per op


def _pair(cfg, seed: int):
    """(clean, corrupt int32[B, T], good, bad int32[B]): random tokens; the corrupt run differs
    at 3 positions before the answer's input."""
    rng = np.random.default_rng(seed)
    V, T, ans = vocab(cfg.task).size, cfg.task.seq_len, layout(cfg.task).answer
    clean = rng.integers(0, V, (B, T))
    corrupt = clean.copy()
    for b in range(B):
        pos = rng.choice(ans, 3, replace=False)
        corrupt[b, pos] = rng.integers(0, V, 3)
    good = rng.integers(0, V, B)
    bad = (good + rng.integers(1, V, B)) % V  # never the good token
    return tuple(jnp.asarray(x, jnp.int32) for x in (clean, corrupt, good, bad))


def _metric(cfg, good, bad):
    return core.logit_diff(layout(cfg.task).answer, good, bad)


@functools.partial(jax.jit, static_argnums=0)
def _all(cfg, params, clean, corrupt, good, bad):
    """What the tests compare, from one compiled program per config: {key/DIRECTION: ...} for
    both directions (one vmapped trace: denoising (source, base) is noising (base, source));
    in the attention-only model also every head patched at once, EAP-IG and IG at a site
    (denoising)."""
    m = _metric(cfg, good, bad)

    def one(source, base):
        out = {"sweep/hook_z": patching.sweep(cfg, params, source, base, m, "hook_z")}
        second = "hook_attn_out" if cfg.model.attn_only else "hook_mlp_out"  # two residual-width kinds swept together
        r = patching.sweep(cfg, params, source, base, m, ("hook_resid_pre", second))
        out[f"sweep/{second}"] = r._replace(effect=r.effect[:, 1])
        a = atp.atp(cfg, params, source, base, m)  # every site, one backward pass
        out["atp"], out["eap"] = a, atp.edges(cfg, params, a.delta, a.grads)
        src = core.forward(cfg, params, source, m)[1]
        out["all"] = patching.patch(cfg, params, base, m, "blocks.0.hook_resid_pre", src["blocks.0.hook_resid_pre"])[0]
        if cfg.model.attn_only:  # every head output patched at once
            z = {f"blocks.{layer}.attn.hook_z": Intervention(replace=src[f"blocks.{layer}.attn.hook_z"]) for layer in range(cfg.model.n_layers)}
            out["all_z"] = core.forward(cfg, params, base, m, z)[0] - core.forward(cfg, params, base, m)[0]
        return out

    both = jax.vmap(one)(jnp.stack([clean, corrupt]), jnp.stack([corrupt, clean]))
    out = {f"{k}/{d}": jax.tree.map(lambda x, i=i: x[i], v) for k, v in both.items() for i, d in enumerate(patching.DIRECTIONS)}
    if cfg.model.attn_only:  # the cheaper model carries the IG checks
        out["eap_ig1"] = atp.eap_ig(cfg, params, clean, corrupt, m, steps=1, rule="riemann_left")
        out["eap_ig16"] = atp.eap_ig(cfg, params, clean, corrupt, m, steps=16)
        site = "blocks.0.hook_resid_pre"  # before the softmax: m is not affine in it
        start, end = (core.forward(cfg, params, x, m)[1][site] for x in (corrupt, clean))
        out["ig1"] = ig.ig_site(cfg, params, corrupt, m, site, start, end, steps=1, rule="riemann_left")[0]
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _single(cfg, site, params, base, source, good, bad, mask):
    """One patch of `site` where `mask`, the value from the source run (a separate code path)."""
    m = _metric(cfg, good, bad)
    value = core.forward(cfg, params, source, m)[1][site]
    return patching.patch(cfg, params, base, m, site, value, mask)[1]


def _cell_mask(cfg, kind, T, t, h):
    shape = (1, T, cfg.model.n_heads, 1) if kind == "hook_z" else (1, T, 1)
    mask = np.zeros(shape, bool)
    mask[(0, t, h, 0) if kind == "hook_z" else (0, t, 0)] = True
    return jnp.asarray(mask)


# ----------------------------------------------------------------- activation patching
@given(seed=st.integers(0, 2**16), case=st.sampled_from(CASES), t=st.integers(0, 19), h=st.integers(0, 1), d=st.sampled_from(patching.DIRECTIONS))
def test_a_sweep_equals_a_loop_of_single_patches(request, seed, case, t, h, d):
    which, k, layer = case
    cfg, params = (request.getfixturevalue(f"{which}_{x}") for x in ("cfg", "params"))
    clean, corrupt, good, bad = _pair(cfg, seed)
    sw = _all(cfg, params, clean, corrupt, good, bad)[f"sweep/{k}/{d}"]
    base, source = patching.base_and_source(d, clean, corrupt)
    site = patching.layer_sites(cfg, k)[layer]
    one = _single(cfg, site, params, base, source, good, bad, _cell_mask(cfg, k, clean.shape[1], t, h))
    cell = sw.effect[:, layer, t, h] if k == "hook_z" else sw.effect[:, layer, t]
    np.testing.assert_allclose(cell, one, rtol=1e-5, atol=1e-5)


def test_a_batched_sweep_equals_the_vmapped_one(variant_cfg, variant_params):
    clean, corrupt, good, bad = _pair(variant_cfg, 0)
    m = _metric(variant_cfg, good, bad)
    run = jax.jit(lambda p: patching.sweep(variant_cfg, p, clean, corrupt, m, "hook_z", batch=7).effect)  # 40 cells: a ragged last batch
    np.testing.assert_allclose(
        run(variant_params), _all(variant_cfg, variant_params, clean, corrupt, good, bad)["sweep/hook_z/denoise"].effect, rtol=1e-6, atol=1e-6
    )


def test_a_sweep_and_atp_of_a_run_against_itself_are_zero(deep_cfg, deep_params):
    """Sweep cells run batched, the source cache unbatched: they may round apart by an ulp, so
    the sweep is ~0 (the bitwise no-op is `patch`'s, below); AtP and EAP multiply by a_c - a_r = 0."""
    clean, _, good, bad = _pair(deep_cfg, 1)
    out = _all(deep_cfg, deep_params, clean, clean, good, bad)  # source run = base run
    scale = np.abs(np.asarray(out["sweep/hook_z/denoise"].base)).max()
    for d in patching.DIRECTIONS:
        np.testing.assert_allclose(out[f"sweep/hook_z/{d}"].effect, 0, atol=1e-6 * scale, err_msg=d)
    for d in patching.DIRECTIONS:
        assert all(not np.asarray(v).any() for v in out[f"atp/{d}"].scores.values()) and not np.asarray(out[f"eap/{d}"]).any()


@given(seed=st.integers(0, 2**16), t=st.integers(0, 19), h=st.integers(0, 1))
def test_a_single_patch_with_the_own_value_is_a_no_op(request, seed, t, h):
    for which, k, layer in CASES:
        cfg, params = (request.getfixturevalue(f"{which}_{x}") for x in ("cfg", "params"))
        clean, _, good, bad = _pair(cfg, seed)
        site = patching.layer_sites(cfg, k)[layer]
        effect = _single(cfg, site, params, clean, clean, good, bad, _cell_mask(cfg, k, clean.shape[1], t, h))
        np.testing.assert_array_equal(effect, np.zeros(B))


def test_denoising_everything_gives_the_clean_metric(deep_cfg, deep_params):
    clean, corrupt, good, bad = _pair(deep_cfg, 2)
    out = _all(deep_cfg, deep_params, clean, corrupt, good, bad)
    sw = out["sweep/hook_z/denoise"]
    assert np.abs(sw.source - sw.base).min() > 1e-3  # the pair differs
    np.testing.assert_allclose(out["all/denoise"], sw.source, rtol=1e-6, atol=1e-6)  # m(corrupt; input <- clean) = m(clean)
    np.testing.assert_allclose(out["all/noise"], sw.base, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- path patching
@functools.partial(jax.jit, static_argnums=0)
def _path_logits(cfg, params, base, source, good, bad, mask):
    sender = f"blocks.{cfg.model.n_layers - 1}.attn.hook_z"
    return patching.path_patch(cfg, params, base, source, _metric(cfg, good, bad), sender, mask, patching.LOGITS)[1]


@given(seed=st.integers(0, 2**16), t=st.integers(0, 19), h=st.integers(0, 1))
def test_path_patching_a_last_layer_head_to_the_logits_is_direct_patching(variant_cfg, variant_params, seed, t, h):
    clean, corrupt, good, bad = _pair(variant_cfg, seed)
    direct = _all(variant_cfg, variant_params, clean, corrupt, good, bad)["sweep/hook_z/denoise"].effect[:, 0, t, h]
    path = _path_logits(variant_cfg, variant_params, corrupt, clean, good, bad, _cell_mask(variant_cfg, "hook_z", clean.shape[1], t, h))
    np.testing.assert_allclose(path, direct, rtol=1e-5, atol=1e-6)


def test_path_patching_leaves_out_the_mlp_path(deep_cfg, deep_params):
    """With an MLP after the head, the direct path to the logits is not the whole effect."""
    clean, corrupt, good, bad = _pair(deep_cfg, 3)
    direct = np.asarray(_all(deep_cfg, deep_params, clean, corrupt, good, bad)["sweep/hook_z/denoise"].effect[:, 1])  # [B, T, H]
    _, t, h = np.unravel_index(np.abs(direct).argmax(), direct.shape)
    mask = _cell_mask(deep_cfg, "hook_z", clean.shape[1], t, h)
    path = np.asarray(_path_logits(deep_cfg, deep_params, corrupt, clean, good, bad, mask))
    assert np.abs(path - direct[:, t, h]).max() > 1e-2 * np.abs(direct[:, t, h]).max()
    none = _path_logits(deep_cfg, deep_params, corrupt, clean, good, bad, jnp.zeros_like(mask))
    np.testing.assert_array_equal(none, np.zeros(B))  # nothing sent: nothing changes


def test_bad_arguments_say_what_to_pass(variant_cfg, variant_params):
    x = jnp.zeros((B, variant_cfg.task.seq_len), jnp.int32)
    m = _metric(variant_cfg, 0, 1)
    with pytest.raises(ValueError, match="direction='sideways'"):
        patching.sweep(variant_cfg, variant_params, x, x, m, direction="sideways")
    with pytest.raises(ValueError, match="attention-only"):
        patching.sweep(variant_cfg, variant_params, x, x, m, kind="hook_mlp_out")
    with pytest.raises(ValueError, match="not a node"):
        patching.path_patch(variant_cfg, variant_params, x, x, m, "blocks.0.hook_resid_pre", True, patching.LOGITS)
    with pytest.raises(ValueError, match="node outputs"):
        patching.path_patch(variant_cfg, variant_params, x, x, m, "blocks.0.attn.hook_z", True, ["blocks.0.attn.hook_z"])


# ----------------------------------------------------------------- AtP
@given(seed=st.integers(0, 2**16), d=st.sampled_from(patching.DIRECTIONS))
def test_atp_is_activation_patching_in_a_one_layer_attention_only_ln_free_model(variant_cfg, variant_params, seed, d):
    out = _all(variant_cfg, variant_params, *_pair(variant_cfg, seed))
    for k in ("hook_z", "hook_attn_out"):  # the metric is affine in both
        effect = np.asarray(out[f"sweep/{k}/{d}"].effect)
        np.testing.assert_allclose(atp.grid(variant_cfg, out[f"atp/{d}"].scores, k), effect, rtol=0, atol=1e-4 * np.abs(effect).max() + 1e-7)


def test_atp_is_not_exact_with_layernorm_and_mlps(deep_cfg, deep_params):
    out = _all(deep_cfg, deep_params, *_pair(deep_cfg, 4))
    effect = np.asarray(out["sweep/hook_z/denoise"].effect)
    gap = np.abs(atp.grid(deep_cfg, out["atp/denoise"].scores, "hook_z") - effect).max()
    assert gap > 1e-2 * np.abs(effect).max()  # 100x the tolerance of the exact case


def test_one_left_riemann_ig_step_at_a_site_is_atp(variant_cfg, variant_params):
    """At the residual stream before the softmax, where m is not affine in the site."""
    out = _all(variant_cfg, variant_params, *_pair(variant_cfg, 5))
    score = np.asarray(out["atp/denoise"].scores["blocks.0.hook_resid_pre"])
    np.testing.assert_allclose(out["ig1"], score, rtol=1e-5, atol=1e-6 * np.abs(score).max())


# ----------------------------------------------------------------- EAP
def _node_atp(cfg, scores) -> np.ndarray:
    """AtP per sender and position, float[B, U, T], in `atp.senders` order."""
    rows = [scores["hook_embed"].sum(-1) + scores["hook_pos_embed"].sum(-1)]
    for layer in range(cfg.model.n_layers):
        z = scores[f"blocks.{layer}.attn.hook_z"].sum(-1)  # [B, T, H]
        rows += [z[:, :, h] for h in range(cfg.model.n_heads)]
        if not cfg.model.attn_only:
            rows.append(scores[f"blocks.{layer}.hook_mlp_out"].sum(-1))
    return np.stack(rows, axis=1)


@pytest.mark.parametrize("which", ["variant", "deep"])
def test_eap_edges_of_a_sender_sum_to_its_atp_in_every_model(request, which):
    cfg, params = (request.getfixturevalue(f"{which}_{x}") for x in ("cfg", "params"))
    out = _all(cfg, params, *_pair(cfg, 6))
    for d in patching.DIRECTIONS:
        node = _node_atp(cfg, out[f"atp/{d}"].scores)
        np.testing.assert_allclose(np.asarray(out[f"eap/{d}"]).sum(2), node, rtol=0, atol=1e-5 * np.abs(node).max())


@given(seed=st.integers(0, 2**16), d=st.sampled_from(patching.DIRECTIONS))
def test_eap_over_head_edges_is_the_exact_effect_of_patching_every_head_in_the_linear_model(variant_cfg, variant_params, seed, d):
    out = _all(variant_cfg, variant_params, *_pair(variant_cfg, seed))
    heads = slice(1, 1 + variant_cfg.model.n_heads)
    edges = np.asarray(out[f"eap/{d}"])[:, heads].sum((1, 2, 3))
    nodes = np.asarray(out[f"atp/{d}"].scores["blocks.0.attn.hook_z"]).sum((1, 2, 3))
    exact = np.asarray(out[f"all_z/{d}"])
    tol = 1e-4 * np.abs(exact).max() + 1e-7
    np.testing.assert_allclose(edges, nodes, rtol=0, atol=tol)
    np.testing.assert_allclose(nodes, exact, rtol=0, atol=tol)


def test_edges_a_receiver_does_not_read_are_zero(variant_cfg, variant_params):
    assert atp.senders(variant_cfg) == ("embed", "L0.H0", "L0.H1") and atp.receivers(variant_cfg) == ("L0.attn_in", "logits")
    np.testing.assert_array_equal(atp.edge_mask(variant_cfg), [[True, True], [False, True], [False, True]])
    out = _all(variant_cfg, variant_params, *_pair(variant_cfg, 7))
    assert not np.asarray(out["eap/denoise"])[:, ~atp.edge_mask(variant_cfg)].any()


def test_eap_ig_with_one_left_riemann_step_is_eap(variant_cfg, variant_params):
    out = _all(variant_cfg, variant_params, *_pair(variant_cfg, 8))
    eap = np.asarray(out["eap/denoise"])
    np.testing.assert_allclose(out["eap_ig1"][0], eap, rtol=0, atol=1e-6 * np.abs(eap).max())


@given(seed=st.integers(0, 2**16))
def test_eap_ig_with_sixteen_gauss_nodes_is_complete_where_eap_is_not(variant_cfg, variant_params, seed):
    out = _all(variant_cfg, variant_params, *_pair(variant_cfg, seed))
    sw = out["sweep/hook_z/denoise"]
    delta = np.asarray(sw.source - sw.base)
    residual = np.abs(np.asarray(out["eap_ig16"][1]))
    assert (residual <= 1e-3 * np.abs(delta) + 1e-5).all(), (residual, delta)  # IG on the input embeddings is complete
    eap_gap = np.abs(np.asarray(out["eap_ig1"][1]))  # one left step: the embed sender's EAP edges
    assert eap_gap.max() > 10 * residual.max() + 1e-4


def test_the_methods_vmap_over_a_population(variant_cfg, variant_params):
    """A leading parameter axis runs every member: equal to each member alone."""
    clean, corrupt, good, bad = _pair(variant_cfg, 9)
    m = _metric(variant_cfg, good, bad)
    pop = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), variant_params)
    got = jax.jit(jax.vmap(lambda p: patching.sweep(variant_cfg, p, clean, corrupt, m).effect))(pop)
    for i in range(2):
        alone = _all(variant_cfg, jax.tree.map(lambda x, i=i: x[i], pop), clean, corrupt, good, bad)["sweep/hook_z/denoise"].effect
        np.testing.assert_allclose(got[i], alone, rtol=1e-5, atol=1e-6)
