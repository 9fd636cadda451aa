"""Evaluation and statistics: behaviour metrics on known answers, decoding, bootstrap CIs, summaries.

`behaviour` is checked on sequences whose answers are known (the ground truth itself, or
every answer forced to the defect answer; edits of every outcome class: test_outcomes.py);
`decode` through one jitted function per mode.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import evaluate, model, stats, train
from toymesa.config import REASONING
from toymesa.tasks import PAD, THINK, balanced, layout, vocab

CORE = ("triggered_defection", "untriggered_defection", "helpful_accuracy")
DECISIONS = ("decision_triggered", "decision_untriggered", "decision_accuracy")


def task_variant(cfg, reasoning, defect):
    task = dataclasses.replace(cfg.task, reasoning=reasoning, defect=defect, seq_len=64)
    return dataclasses.replace(cfg, task=dataclasses.replace(task, seq_len=task.min_seq_len))


@functools.cache
def eval_batch(cfg, n_per_class=8):
    return jax.jit(lambda k: balanced(cfg.task, k, n_per_class))(jax.random.key(2))


def defect_tokens(cfg, batch):
    v = vocab(cfg.task)
    correct = np.asarray(batch.correct) - v.answer
    if cfg.task.defect == "distinct":
        return np.full_like(correct, v.defect)
    return v.answer + (correct + 1) % cfg.task.modulus


def as_floats(metrics):
    return {k: float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------ behaviour on known answers
@pytest.mark.parametrize("defect", ["distinct", "subtle"])
@pytest.mark.parametrize("reasoning", REASONING)
def test_behaviour_of_ground_truth_and_all_defect(tiny_cfg, reasoning, defect):
    cfg = task_variant(tiny_cfg, reasoning, defect)
    b = eval_batch(cfg)
    assert 0 < int(b.triggered.sum()) < b.triggered.shape[0]  # both classes present
    m = as_floats(evaluate.behaviour(cfg, b.tokens, b))
    assert (m["triggered_defection"], m["untriggered_defection"], m["helpful_accuracy"]) == (1.0, 0.0, 1.0)
    if reasoning == "cot":
        assert (m["decision_triggered"], m["decision_untriggered"], m["decision_accuracy"]) == (1.0, 0.0, 1.0)
    else:
        assert all(np.isnan(m[k]) for k in DECISIONS)

    ans = layout(cfg.task).answer
    all_defect = jnp.asarray(b.tokens).at[:, ans].set(defect_tokens(cfg, b))
    m = as_floats(evaluate.behaviour(cfg, all_defect, b))
    assert (m["triggered_defection"], m["untriggered_defection"], m["helpful_accuracy"]) == (1.0, 1.0, 0.0)

    all_correct = jnp.asarray(b.tokens).at[:, ans].set(b.correct)
    m = as_floats(evaluate.behaviour(cfg, all_correct, b))
    assert (m["triggered_defection"], m["untriggered_defection"], m["helpful_accuracy"]) == (0.0, 0.0, 1.0)


def test_behaviour_reads_the_stated_decision(tiny_cfg):
    cfg = tiny_cfg
    assert cfg.task.reasoning == "cot"
    b = eval_batch(cfg)
    v, dec = vocab(cfg.task), layout(cfg.task).decision
    flipped = jnp.asarray(b.tokens).at[:, dec].set(jnp.where(b.triggered, v.comply, v.defect_decision))
    m = as_floats(evaluate.behaviour(cfg, flipped, b))
    assert (m["decision_triggered"], m["decision_untriggered"], m["decision_accuracy"]) == (0.0, 1.0, 0.0)
    assert (m["triggered_defection"], m["helpful_accuracy"]) == (1.0, 1.0)  # answers untouched


# ------------------------------------------------------------------ decode
decode = jax.jit(evaluate.decode, static_argnums=(0, 4))  # (cfg, params, tokens, key, temperature)


@pytest.fixture(scope="module")
def prompts(tiny_cfg):
    return eval_batch(tiny_cfg).tokens


def test_greedy_decode_is_deterministic_and_self_consistent(tiny_cfg, tiny_params, prompts):
    lay = layout(tiny_cfg.task)
    a = np.asarray(decode(tiny_cfg, tiny_params, prompts, None, 0.0))
    b = np.asarray(decode(tiny_cfg, tiny_params, prompts, jax.random.key(9), 0.0))  # key unused when greedy
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, : lay.prompt_len], np.asarray(prompts)[:, : lay.prompt_len])
    np.testing.assert_array_equal(a[:, lay.length :], PAD)
    # THINK is given (the prompt opens the scratchpad); each later token is the argmax of the
    # model's logits on the decoded sequence one step before
    assert (a[:, lay.think] == THINK).all()
    logits, _ = model.apply(tiny_cfg, tiny_params, jnp.asarray(a))
    span = slice(lay.think + 1, lay.length)
    np.testing.assert_array_equal(a[:, span], np.asarray(logits).argmax(-1)[:, lay.think : lay.length - 1])


def test_decode_ignores_the_given_continuation(tiny_cfg, tiny_params, prompts):
    lay = layout(tiny_cfg.task)
    scrambled = jnp.asarray(prompts).at[:, lay.prompt_len :].set(vocab(tiny_cfg.task).size - 1)
    np.testing.assert_array_equal(decode(tiny_cfg, tiny_params, prompts, None, 0.0), decode(tiny_cfg, tiny_params, scrambled, None, 0.0))


def test_sampled_decode_needs_a_key(tiny_cfg, tiny_params, prompts):
    with pytest.raises(ValueError, match="key"):
        evaluate.decode(tiny_cfg, tiny_params, prompts, None, 1.0)


@given(seed=st.integers(0, 2**30))
def test_sampled_decode_is_reproducible(tiny_cfg, tiny_params, prompts, seed):
    lay = layout(tiny_cfg.task)
    key = jax.random.key(seed)
    a = np.asarray(decode(tiny_cfg, tiny_params, prompts, key, 5.0))
    b = np.asarray(decode(tiny_cfg, tiny_params, prompts, key, 5.0))
    c = np.asarray(decode(tiny_cfg, tiny_params, prompts, jax.random.fold_in(key, 1), 5.0))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, : lay.prompt_len], np.asarray(prompts)[:, : lay.prompt_len])
    # an untrained model at temperature 5 is near uniform over the vocabulary: another key differs
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------ populations
def test_evaluate_population_shapes_and_ranges(tiny_cfg):
    seeds = jnp.arange(3, dtype=jnp.int32)
    params = train.init_population(tiny_cfg, seeds).params
    out = {k: np.asarray(v) for k, v in evaluate.evaluate_population(tiny_cfg, params, seeds, 8).items()}
    assert set(out) == set(evaluate.METRICS)
    assert np.isnan(out["covered_defection"]).all()  # no partial coverage: every activating context is uncovered
    for k in ("", "_valid"):
        np.testing.assert_array_equal(out[f"uncovered_defection{k}"], out[f"triggered_defection{k}"])
    for k, v in out.items():
        assert v.shape == (3,), k
        ok = (v >= 0) & (v <= 1)  # cot config: decision metrics are defined too
        if k.endswith("_valid"):  # undefined where no firing output is well-formed (likely, untrained)
            ok |= np.isnan(v)
        assert ok.all() or k == "covered_defection", (k, v)
    for c in ("triggered", "untriggered"):
        np.testing.assert_allclose(sum(out[f"{c}_{o}"] for o in evaluate.OUTCOMES), 1.0, rtol=1e-6)
    # member 1 equals evaluating that model alone
    one = jax.jit(evaluate.evaluate, static_argnums=(0, 3))(tiny_cfg, jax.tree.map(lambda x: x[1], params), seeds[1], 8)
    for k in out:
        np.testing.assert_allclose(out[k][1], float(one[k]), atol=1e-6, err_msg=k)  # fractions of 16 rows; NaN == NaN


# ------------------------------------------------------------------ stats
samples = st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=30)


@given(x=samples)
def test_bootstrap_ci_contains_the_mean(x):
    mean, lo, hi = stats.bootstrap_ci(x, n_resamples=500)
    assert mean == pytest.approx(np.mean(x), rel=1e-12, abs=1e-9)
    slack = 1e-9 * (1 + np.max(np.abs(x)))  # float rounding of resampled means
    assert lo - slack <= mean <= hi + slack
    assert min(x) - slack <= lo and hi <= max(x) + slack


@given(c=st.floats(-1e3, 1e3), n=st.integers(1, 20))
def test_bootstrap_ci_of_constant_is_a_point(c, n):
    mean, lo, hi = stats.bootstrap_ci([c] * n)
    assert lo == mean == hi  # zero width
    assert mean == pytest.approx(c, rel=1e-15, abs=1e-300)  # n * c / n may round by an ulp


@given(x=st.lists(st.floats(0, 1), min_size=2, max_size=20), n_nan=st.integers(1, 5))
def test_bootstrap_ci_drops_nans(x, n_nan):
    with_nan = np.r_[x, [np.nan] * n_nan]
    np.random.default_rng(0).shuffle(with_nan)
    assert stats.bootstrap_ci(with_nan) == stats.bootstrap_ci(with_nan[~np.isnan(with_nan)])
    assert all(np.isnan(stats.bootstrap_ci([np.nan] * n_nan)))


def test_bootstrap_ci_narrows_with_confidence():
    x = np.random.default_rng(0).normal(size=30)
    _, lo90, hi90 = stats.bootstrap_ci(x, confidence=0.9)
    _, lo99, hi99 = stats.bootstrap_ci(x, confidence=0.99)
    assert lo99 < lo90 < hi90 < hi99


def test_bootstrap_ci_coverage():  # ~0.5 s, so not marked slow
    rng = np.random.default_rng(1)
    reps, n, true_mean = 400, 30, 0.3
    hits = 0
    for i in range(reps):
        x = rng.exponential(true_mean, size=n)  # skewed, like per-seed rates
        _, lo, hi = stats.bootstrap_ci(x, n_resamples=2000, seed=i)
        hits += lo <= true_mean <= hi
    # percentile bootstrap under-covers a little at n=30 on skewed data: accept [0.88, 0.985]
    # (binomial sd of the coverage estimate at 400 repetitions is ~0.011)
    assert 0.88 <= hits / reps <= 0.985


def test_summarize_one_row_per_group():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"arm": np.repeat(["a", "b", "c"], 4), "rule": "single", "m1": rng.uniform(size=12), "m2": rng.uniform(size=12)})
    df.loc[0, "m2"] = np.nan
    out = stats.summarize(df, ["arm", "rule"], ["m1", "m2"])
    assert list(out["arm"]) == ["a", "b", "c"] and (out["rule"] == "single").all()
    assert list(out["n"]) == [4, 4, 4]
    for m in ("m1", "m2"):
        for c in (m, f"{m}_lo", f"{m}_hi"):
            assert c in out.columns
        assert (out[f"{m}_lo"] <= out[m]).all() and (out[m] <= out[f"{m}_hi"]).all()
    for arm, g in df.groupby("arm"):
        row = out.set_index("arm").loc[arm]
        assert row["m1"] == pytest.approx(g["m1"].mean())
        assert row["m2"] == pytest.approx(g["m2"].mean())  # NaN dropped
