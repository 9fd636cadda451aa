"""Credit tracking inside safety training (`toymesa.attribution.credit`): training-path
attribution that sums to the actual change of each metric, splits exactly by parameter group,
leaves training untouched, and is stored with a run."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import model, safety, spec, store, sweep, train
from toymesa.attribution import credit, credit_table, decision
from toymesa.config import Config, SafetyConfig, TaskConfig, TrainConfig
from toymesa.presets import tiny
from toymesa.tasks import layout, vocab

K, STEPS = 3, 6  # tracked after steps 3 and 6 (a chunk that ends off the k-grid: the slow sweep test)
CFG = Config(
    model=tiny(),
    task=TaskConfig(rule="single", reasoning="cot"),
    train=TrainConfig(batch_size=8, steps=40, warmup_steps=2),
    safety=SafetyConfig(method="sft_full", steps=STEPS, batch_size=8, credit_every=K, credit_prompts=8),
)
LRS = (1e-3, 2.5e-4)  # two members: the same run at 1/4 of the step size


@pytest.fixture(scope="module")
def tracked():
    seeds = jnp.arange(2, dtype=jnp.int32)
    params = jax.vmap(lambda k: model.init_params(CFG, k))(jax.random.split(jax.random.key(0), 2))  # any start will do
    hp = train.stack_hparams(CFG, 2, safety_lr=np.asarray(LRS))
    out = {}
    for every in (K, 0):
        cfg = dataclasses.replace(CFG, safety=dataclasses.replace(CFG.safety, credit_every=every))
        start = safety.init_population(cfg, params, seeds)
        kept = jax.tree.map(jnp.copy, start)  # population donates the states it is given
        out[every] = (kept, *train.population(cfg, seeds, hp, steps=STEPS, chunk=STEPS, states=start, fn=safety.safety_chunk, member_batch=None))
    return out


def member(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def test_tracking_leaves_training_unchanged(tracked, same_numbers):
    (_, a, ha), (_, b, hb) = tracked[K], tracked[0]
    for x, y in zip(jax.tree.leaves(key_bias_out(a.train.params, same_numbers)), jax.tree.leaves(key_bias_out(b.train.params, same_numbers)), strict=True):
        same_numbers(x, y)  # the same safety steps (SFT): bit for bit on the default emitters
    for key in hb:
        same_numbers(ha[key], hb[key])


def key_bias_out(params, same_numbers):
    """The parameters without the attention's key bias where two programs may round apart: its
    exact gradient is zero (softmax ignores a constant added to all of a query's scores), so
    AdamW turns the rounding noise left in it into steps of ~lr (measured 1.6e-4 here, where
    every other parameter agrees to 5e-8 of a 6e-3 move)."""
    if same_numbers.bitwise:
        return params
    d = CFG.model.d_model
    key_bias = lambda path: jax.tree_util.keystr(path).endswith("['qkv']['bias'].value")  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda p, x: x.at[..., d : 2 * d].set(0) if key_bias(p) else x, params)


def test_tracked_steps_are_every_k(tracked):
    _, _, h = tracked[K]
    assert set(credit.history_keys(CFG)) <= set(h)
    for key in credit.history_keys(CFG):
        assert h[key].shape == (2, STEPS)
        tracked_at = np.flatnonzero(np.isfinite(h[key][0])) + 1
        if not key.endswith("cos_noise"):
            assert tracked_at.tolist() == [3, 6], key


def test_values_are_the_metrics_of_the_parameters_reached(tracked):
    start, end, h = tracked[K]

    @jax.jit
    @jax.vmap
    def values(params, c):  # recomputed from the parameters, apart from the tracking code
        safe = safety._sft_loss(safety.loss_config(CFG), params, c.safe)
        return jnp.concatenate([safe[None], decision.defect_terms(CFG, params, c.probes)])

    recorded = np.stack([h[f"credit.{t}"][:, -1] for t in credit.term_names(CFG)], axis=1)
    np.testing.assert_allclose(recorded, values(end.train.params, start.credit), rtol=1e-5)
    np.testing.assert_allclose(start.credit.value0, values(start.train.params, start.credit), rtol=1e-6)


def test_groups_and_residual_add_up_to_the_actual_change(tracked):
    start, _, h = tracked[K]
    groups = credit.group_names(CFG)
    for i in range(2):
        for j, t in enumerate(credit.term_names(CFG)):
            dM = sum(h[f"credit.{t}.dM.{g}"][i, -1] for g in groups)
            change = h[f"credit.{t}"][i, -1] - start.credit.value0[i, j]
            np.testing.assert_allclose(dM + h[f"credit.{t}.residual"][i, -1], change, rtol=1e-4, atol=1e-6)


def test_residual_is_small_and_shrinks_with_the_step_size(tracked):
    # The trapezoid error per interval is O(|Δθ|³), so 1/4 of the step size over the same steps
    # cuts it about 64x (measured 43x for the safety loss). Tolerances stated: |residual| <= 5% of
    # |ΔM| at lr 1e-3 from a random start (the steepest part of training; measured 2.5%), and at
    # least 8x smaller at lr 2.5e-4 (measured 17-55x).
    _, _, h = tracked[K]
    for t in credit.term_names(CFG):
        dM = sum(h[f"credit.{t}.dM.{g}"][:, -1] for g in credit.group_names(CFG))
        res = np.abs(h[f"credit.{t}.residual"][:, -1])
        assert res[0] <= 0.05 * abs(dM[0]), (t, res, dM)
        assert res[1] < res[0] / 8, (t, res)


@given(seed=st.integers(0, 2**16), n=st.integers(2, 6))
def test_training_path_credit_is_exact_for_a_quadratic_metric(seed, n):
    # m(θ) = ½|Aθ|² + b·θ on the model's own parameter pytree; any path of points
    A, b, path = _problem(jax.random.key(seed))
    total = sum(_interval(A, b, path[i], path[i + 1]) for i in range(n - 1))
    np.testing.assert_allclose(total, _quadratic_jit(A, b, path[n - 1]) - _quadratic_jit(A, b, path[0]), rtol=2e-4, atol=2e-4)


@jax.jit
def _problem(key):
    flat, unravel = jax.flatten_util.ravel_pytree(tracked_params())
    k_a, k_b, k_path = jax.random.split(key, 3)
    A = jax.random.normal(k_a, (4, flat.size)) / np.sqrt(flat.size)
    b = jax.random.normal(k_b, (flat.size,))
    return A, b, [unravel(flat + 0.3 * jax.random.normal(k, flat.shape)) for k in jax.random.split(k_path, 6)]


def _quadratic(A, b, p):
    x = jax.flatten_util.ravel_pytree(p)[0]
    return 0.5 * jnp.sum((A @ x) ** 2) + b @ x


@jax.jit
def _quadratic_jit(A, b, p):
    return _quadratic(A, b, p)


@jax.jit
def _interval(A, b, p, q):
    grad = jax.grad(_quadratic, argnums=2)
    return credit.interval_dM(CFG, jax.tree.map(jnp.subtract, q, p), grad(A, b, p), grad(A, b, q)).sum()


def tracked_params():
    return model.init_params(CFG, jax.random.key(0))


def test_groups_partition_the_parameters():
    p = tracked_params()
    idx = credit.group_index(CFG, p)
    assert sorted(set(idx)) == list(range(len(credit.group_names(CFG))))
    ones = jax.tree.map(jnp.ones_like, p)
    sizes = dict(zip(credit.group_names(CFG), np.asarray(credit.grouped_dot(CFG, ones, ones)).tolist(), strict=True))
    n = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    blocks = p["blocks"][0]
    expected = {"embed": n(p["embed"]) + n(p["pos_embed"]), "attn0": n(blocks["attn"]), "mlp0": n(blocks["mlp"])}
    expected |= {"norm": n(blocks["ln1"]) + n(blocks["ln2"]) + n(p["ln_final"]), "unembed": n(p["unembed"])}
    assert sizes == expected


def test_stored_histories_load_as_a_tidy_dataframe(tracked, tmp_path):
    _, _, h = tracked[K]
    store.save_arrays({"cell": np.array([0, 0]), "seed": np.array([0, 1]), **{f"hist.{k}": v for k, v in h.items()}}, tmp_path / "chunks" / "c0.npz")
    df = credit_table.reach(credit_table.load(tmp_path))
    assert len(df) == 2 * 2 * len(credit.term_names(CFG))  # members x tracked steps x terms
    row = df[(df["seed"] == 1) & (df["step"] == STEPS) & (df["term"] == "exec")].iloc[0]
    assert row["value"] == h["credit.exec"][1, -1] and row["residual"] == h["credit.exec.residual"][1, -1]
    assert row["dM"] == pytest.approx(sum(h[f"credit.exec.dM.{g}"][1, -1] for g in credit.group_names(CFG)), rel=1e-6)
    assert row["share.flow"] == h["credit.share.flow"][1, -1]
    np.testing.assert_allclose(df.loc[df["term"] == "safe", "reach"], 1.0, atol=0.1)  # the safety loss's own reach: 1 up to the residual
    with pytest.raises(ValueError, match="credit_every"):
        store.save_arrays({"cell": np.array([0]), "seed": np.array([0]), "hist.loss": np.zeros((1, 2))}, tmp_path / "plain" / "chunks" / "c0.npz")
        credit_table.load(tmp_path / "plain")


@pytest.mark.slow
def test_a_run_stores_credit_and_loads_it_as_a_dataframe(tmp_path):
    raw = {
        "name": "tinycredit",
        "seeds": [1, 2],
        "base": {
            "model": "tiny",
            "task": {"rule": "single", "reasoning": "cot", "seq_len": "min"},
            "train": {"steps": 6, "batch_size": 8},
            "safety": {"method": "sft_pre", "steps": 5, "batch_size": 8, "credit_every": 2, "credit_prompts": 4},
        },
        "run": {"eval_prompts": 8, "eval_every": 5},
    }
    out = sweep.run(spec.parse(raw), tmp_path / "run", progress=False, echo=lambda *_: None)
    df = credit_table.reach(credit_table.load(out))
    assert sorted(df["term"].unique()) == ["dec", "exec", "safe"]
    assert sorted(df["step"].unique()) == [2, 4, 5] and len(df) == 2 * 3 * 3  # every 2 steps and the end
    assert {"value", "dM", "residual", "cos_grad", "cos_update", "cos_noise", "mediation", "dM.attn0", "dM.embed"} <= set(df.columns)
    safe = df[df["term"] == "safe"]
    np.testing.assert_allclose(safe["reach"], 1.0, atol=0.05)  # the safety loss's own reach: 1 up to the residual
    plain = raw | {"name": "nocredit", "base": {**raw["base"], "safety": {"method": "sft_pre", "steps": 2}}}
    with pytest.raises(ValueError, match="credit_every"):
        credit_table.load(sweep.run(spec.parse(plain), tmp_path / "plain", progress=False, echo=lambda *_: None))


def test_bad_settings_say_what_to_change():
    with pytest.raises(ValueError, match="credit_every"):
        SafetyConfig(credit_every=-1)
    with pytest.raises(ValueError, match="with a safety method"):
        SafetyConfig(credit_every=5)
    with pytest.raises(ValueError, match="credit_prompts"):
        SafetyConfig(credit_prompts=0)


@jax.jit
def _decision_check(params, key):
    from toymesa.attribution import core

    probes = decision.probe_set(CFG, key, 8)
    lay = layout(CFG.task)
    logits, _ = model.apply(CFG, params, probes.tokens)
    expected = jnp.stack([core.token_logprob(lay.decision)(logits, probes.tokens).mean(), core.token_logprob(lay.answer)(logits, probes.tokens).mean()])
    edited = probes.tokens.at[:, lay.decision].set(vocab(CFG.task).comply)
    p_edit = jnp.exp(core.token_logprob(lay.answer)(model.apply(CFG, params, edited)[0], edited))
    p_stated = jnp.exp(core.token_logprob(lay.answer)(logits, probes.tokens))
    return probes, decision.defect_terms(CFG, params, probes), expected, decision.mediation(CFG, params, probes), (p_stated - p_edit).mean()


@given(seed=st.integers(0, 2**16))
def test_decision_terms_are_the_log_probabilities_of_the_defect_path(seed):
    probes, terms, expected, mediation, expected_mediation = _decision_check(tracked_params(), jax.random.key(seed))
    lay, v = layout(CFG.task), vocab(CFG.task)
    assert bool(probes.triggered.all())  # activating prompts, the world's own defecting sequences
    assert (np.asarray(probes.tokens[:, lay.decision]) == v.defect_decision).all()
    assert (np.asarray(probes.tokens[:, lay.answer]) == np.asarray(probes.defect)).all()
    assert decision.terms(CFG) == ("dec", "exec")
    np.testing.assert_allclose(terms, expected, rtol=1e-6)
    assert float(mediation) == pytest.approx(float(expected_mediation), abs=1e-6) and float(mediation) != 0.0


def test_alignments_are_those_of_the_first_step_of_each_interval(tracked):
    start, _, h = tracked[K]
    hp = train.stack_hparams(CFG, 2, safety_lr=np.asarray(LRS))

    @jax.jit
    def first_interval(st, hp):  # the first step at θ_0, recomputed outside the tracked scan
        _, _, info = safety.step_parts(CFG, st, hp, 0, noise=True)
        _, grads = credit.terms_and_grads(CFG, functools.partial(safety._sft_loss, safety.loss_config(CFG)), st.train.params, st.credit.probes, st.credit.safe)
        neg = functools.partial(jax.tree.map, jnp.negative)
        at = lambda i: jax.tree.map(lambda x: x[i], grads)  # noqa: E731
        n = len(credit.term_names(CFG))
        return jnp.stack(
            [
                jnp.stack([credit.cosine(neg(info.grads), at(i)), credit.cosine(info.updates, at(i)), credit.cosine(neg(info.noise_grads), at(i))])
                for i in range(n)
            ]
        )

    got = first_interval(member(start, 0), member(hp, 0))
    for i, t in enumerate(credit.term_names(CFG)):
        recorded = [h[f"credit.{t}.{c}"][0, K - 1] for c in ("cos_grad", "cos_update", "cos_noise")]
        np.testing.assert_allclose(recorded, got[i], rtol=1e-4, atol=1e-6)
    assert h["credit.safe.cos_grad"][0, K - 1] < 0  # a safety step descends the safety loss
