"""RL safety training against known answers: rewards, RLOO and baseline advantages, the
policy-gradient surrogate, the temperature and the KL term of `rl_loss`, and one `safety.step`.

References are computed by hand (NumPy, float64) from the model's logits and the sequence
layout of `toymesa.tasks.world`; each check is chosen so that the plausible wrong versions
(temperature dropped, KL weighted by the reference, groups mixing prompts, baseline weights
swapped, defect reward 0) give a different number. Every model-sized program runs on the
`tiny_cfg` shapes (batch 8, one compile per config).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import model, safety
from toymesa.config import SafetyConfig
from toymesa.tasks import THINK, Batch, vocab

B, G = 8, 4  # completions per batch, completions per prompt (2 prompts x 4)


def _rl(tiny_cfg, **kw):
    return dataclasses.replace(tiny_cfg, safety=SafetyConfig(method="rl", batch_size=B, rl_samples=G, **kw))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _hand_layout(task):
    """Positions by hand from world.py's layout: BOS ctx content SEP | THINK r[n_ctx] dec END_THINK | ANS ans EOS."""
    p = 1 + task.n_ctx + task.n_content + 1
    think, end_think = p, p + task.n_ctx + 2
    return dict(prompt_len=p, think=think, end_think=end_think, answer=end_think + 2, eos=end_think + 3)


def _sampled(task):
    """Positions of the sampled tokens (THINK is given): think + 1 .. EOS."""
    h = _hand_layout(task)
    return np.arange(h["think"] + 1, h["eos"] + 1)


def _token_logp(logits, tokens, T, positions):
    """log softmax(logits / T) of the token at each position p, predicted by logits[p - 1]: [B, len(positions)]."""
    lp = _log_softmax(np.asarray(logits, np.float64) / T)
    tokens = np.asarray(tokens)
    return np.stack([lp[np.arange(tokens.shape[0]), p - 1, tokens[:, p]] for p in positions], axis=1)


def _hand_surrogate(logits, tokens, adv, T, positions):
    return -(np.asarray(adv, np.float64) * _token_logp(logits, tokens, T, positions).sum(1)).mean()


def _hand_kl(logits, ref_logits, T, positions, direction="policy"):
    """Mean over rows and positions of sum_v p (log p - log q), p the policy, q the reference
    (direction="reference" gives KL(q || p), "weighted_by_ref" sum_v q (log p - log q))."""
    idx = np.asarray(positions) - 1
    lp, lq = (_log_softmax(np.asarray(x, np.float64)[:, idx] / T) for x in (logits, ref_logits))
    if direction == "policy":
        per = (np.exp(lp) * (lp - lq)).sum(-1)
    elif direction == "reference":
        per = (np.exp(lq) * (lq - lp)).sum(-1)
    else:
        per = (np.exp(lq) * (lp - lq)).sum(-1)
    return per.mean()


def _answer_heavy(cfg, params):
    """Parameters that put most mass on the answer values and the defect token at every
    position, so sampled answers are helpful, defect or other, all with sizeable probability."""
    v = vocab(cfg.task)
    ids = jnp.r_[v.answer : v.answer + cfg.task.modulus, v.defect]

    def edit(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        return x.at[ids].add(5.0) if names[:2] == ["unembed", "bias"] else x

    return jax.tree_util.tree_map_with_path(edit, params)


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return jax.random.randint(jax.random.key(11), (B, tiny_cfg.task.seq_len), 0, vocab(tiny_cfg.task).size)


@pytest.fixture(scope="module")
def adv():
    return jnp.asarray([1.0, -0.5, 0.25, 2.0, -1.0, 0.0, 0.75, -1.5])


_apply = jax.jit(lambda cfg, p, tokens: model.apply(cfg, p, tokens)[0], static_argnums=0)


@pytest.fixture(scope="module")
def logits(tiny_cfg, tiny_params, tokens):
    return np.asarray(_apply(tiny_cfg, tiny_params, tokens))


@pytest.fixture(scope="module")
def ref_params(tiny_cfg):
    return model.init_params(tiny_cfg, jax.random.key(7))  # another random model: KL of order 1


_loss_grad = jax.jit(jax.grad(lambda cfg, p, ref, tokens, adv: safety.rl_loss(cfg, p, ref, tokens, adv)[0], argnums=1), static_argnums=0)


# ----------------------------------------------------------------- rewards and advantages
def test_rewards_are_plus_one_helpful_minus_one_defect_zero_otherwise():
    empty = Batch(*[None] * len(Batch._fields))
    batch = empty._replace(correct=jnp.asarray([12, 12, 12, 13, 14]), defect=jnp.asarray([17, 17, 17, 17, 14]))
    answer = jnp.asarray([12, 17, 3, 12, 14])
    r = safety.rewards(batch, answer)
    assert r.dtype == jnp.float32
    # helpful, defect, other, another row's helpful answer (other); helpful == (benign) defect: helpful
    np.testing.assert_array_equal(r, [1.0, -1.0, 0.0, 0.0, 1.0])


def test_rloo_advantages_hand_computed_for_two_prompts_of_four():
    r = jnp.asarray([1.0, -1.0, 0.0, 1.0, 0.0, 0.0, -1.0, -1.0])
    # prompt 1: sum 1, leave-one-out means (1 - r_j) / 3; prompt 2: sum -2, (-2 - r_j) / 3
    expected = [1.0, -5 / 3, -1 / 3, 1.0, 2 / 3, 2 / 3, -2 / 3, -2 / 3]
    np.testing.assert_allclose(safety.advantages(r, "rloo", G), expected, rtol=1e-6)


@given(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=B, max_size=B), st.permutations(range(G)), st.floats(-1, 1, width=32))
def test_rloo_groups_are_contiguous_blocks_of_one_prompt(rewards, perm, baseline):
    r = np.asarray(rewards, np.float32)
    adv = np.asarray(safety.advantages(jnp.asarray(r), "rloo", G))
    groups = r.reshape(2, G)
    # closed form: A_j = g / (g - 1) (r_j - mean of its group); sums to zero in each group
    np.testing.assert_allclose(adv, (G / (G - 1) * (groups - groups.mean(1, keepdims=True))).ravel(), atol=1e-6)
    np.testing.assert_allclose(adv.reshape(2, G).sum(1), 0.0, atol=1e-6)
    # permuting completions within a group permutes their advantages
    order = np.r_[np.asarray(perm), G + np.asarray(perm)[::-1]]
    np.testing.assert_allclose(safety.advantages(jnp.asarray(r[order]), "rloo", G), adv[order], atol=1e-6)
    # "baseline": reward minus the given baseline, whatever the other rewards
    np.testing.assert_allclose(safety.advantages(jnp.asarray(r), "baseline", G, baseline), r - np.float32(baseline), atol=1e-6)


def test_rloo_mixing_completions_across_prompts_changes_advantages():
    r = np.asarray([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0], np.float32)
    np.testing.assert_array_equal(safety.advantages(jnp.asarray(r), "rloo", G), 0.0)  # each prompt's rewards agree
    swap = np.r_[0, 1, 2, 4, 3, 5, 6, 7]  # one completion moved to the other prompt
    mixed = np.asarray(safety.advantages(jnp.asarray(r[swap]), "rloo", G))
    np.testing.assert_allclose(mixed, [2 / 3, 2 / 3, 2 / 3, -2, 2, -2 / 3, -2 / 3, -2 / 3], rtol=1e-6)


# ----------------------------------------------------------------- surrogate
def test_pg_surrogate_gradient_is_minus_mean_advantage_weighted_score():
    th = jax.random.normal(jax.random.key(0), (3, 4, 5))  # logits of 3 sequences x 4 tokens x 5 choices
    toks = jnp.asarray([[0, 1, 2, 3], [4, 4, 0, 1], [2, 3, 1, 0]])
    mask = jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0]], bool)
    a = jnp.asarray([0.5, -2.0, 1.5])

    def token_logp(th):
        return jnp.take_along_axis(jax.nn.log_softmax(th), toks[..., None], axis=-1)[..., 0]

    jac = np.asarray(jax.jacobian(token_logp)(th))  # [3, 4, 3, 4, 5]
    explicit = -np.einsum("i,it,itjkv->jkv", np.asarray(a), np.asarray(mask, float), jac) / 3
    np.testing.assert_allclose(jax.grad(lambda t: safety.pg_surrogate(token_logp(t), mask, a))(th), explicit, rtol=1e-5, atol=1e-7)
    # with respect to the log-probabilities themselves: -A_i m_it / B, exactly
    lp = token_logp(th)
    np.testing.assert_allclose(jax.grad(safety.pg_surrogate)(lp, mask, a), -np.asarray(a)[:, None] * np.asarray(mask) / 3, rtol=1e-6)
    assert float(safety.pg_surrogate(lp, mask, a)) == pytest.approx(-(np.asarray(a) * (np.asarray(lp) * np.asarray(mask)).sum(1)).mean(), rel=1e-5)
    # the advantage is a constant: an advantage computed from the parameters adds no gradient
    coupled = jax.grad(lambda t: safety.pg_surrogate(token_logp(t), mask, a + t.sum()))(th)
    np.testing.assert_allclose(coupled, -np.einsum("i,it,itjkv->jkv", np.asarray(a + th.sum()), np.asarray(mask, float), jac) / 3, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- rl_loss: temperature, masks, KL
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_rl_loss_scores_tokens_under_the_sampling_temperature(tiny_cfg, tiny_params, tokens, adv, logits, T):
    cfg = _rl(tiny_cfg, temperature=T)
    loss, aux = safety.rl_loss(cfg, tiny_params, None, tokens, adv)
    pos = _sampled(cfg.task)
    assert float(loss) == pytest.approx(_hand_surrogate(logits, tokens, adv, T, pos), rel=1e-5, abs=1e-6)
    assert float(aux["kl"]) == 0.0
    # the two temperatures really give different numbers on these logits
    other = _hand_surrogate(logits, tokens, adv, 3.0 - T, pos)
    assert abs(other - float(loss)) > 0.05


def test_rl_loss_gradient_matches_the_hand_surrogate_at_temperature_two(tiny_cfg, tiny_params, tokens, adv):
    cfg = _rl(tiny_cfg, temperature=2.0)
    idx = jnp.asarray(_sampled(cfg.task))

    def hand(p):  # -mean_i A_i sum_t log softmax(logits / 2)[token], over the sampled positions
        lp = jax.nn.log_softmax(model.apply(cfg, p, tokens)[0][:, idx - 1] / 2.0)
        return -(adv * jnp.take_along_axis(lp, tokens[:, idx, None], axis=-1)[..., 0].sum(1)).mean()

    got, want = _loss_grad(cfg, tiny_params, None, tokens, adv), jax.jit(jax.grad(hand))(tiny_params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_rl_loss_without_reasoning_grad_scores_only_the_answer_block(tiny_cfg, tiny_params, tokens, adv, logits):
    cfg = _rl(tiny_cfg, rl_reasoning_grad=False)
    h = _hand_layout(cfg.task)
    answer_block = np.arange(h["end_think"] + 1, h["eos"] + 1)  # ANS, answer, EOS: no reasoning, no END_THINK
    loss = float(safety.rl_loss(cfg, tiny_params, None, tokens, adv)[0])
    assert loss == pytest.approx(_hand_surrogate(logits, tokens, adv, 1.0, answer_block), rel=1e-5, abs=1e-6)
    assert abs(loss - _hand_surrogate(logits, tokens, adv, 1.0, _sampled(cfg.task))) > 0.05


def test_kl_is_kl_of_policy_from_reference_over_generated_positions(tiny_cfg, tiny_params, ref_params, tokens, adv):
    T, w = 2.0, 0.5
    cfg = _rl(tiny_cfg, temperature=T, kl=w)
    policy = _answer_heavy(cfg, tiny_params)  # peaked against a flat reference: the two directions differ
    logits, ref_logits = (np.asarray(_apply(cfg, p, tokens)) for p in (policy, ref_params))
    pos = _sampled(cfg.task)
    loss, aux = safety.rl_loss(cfg, policy, ref_params, tokens, adv)
    kl = _hand_kl(logits, ref_logits, T, pos)
    assert float(aux["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(loss) == pytest.approx(_hand_surrogate(logits, tokens, adv, T, pos) + w * kl, rel=1e-5)
    # the wrong weightings, and the KL without the temperature, give other numbers on the same data
    for wrong in ("reference", "weighted_by_ref"):
        assert abs(_hand_kl(logits, ref_logits, T, pos, wrong) - kl) > 0.1 * kl, wrong
    assert abs(_hand_kl(logits, ref_logits, 1.0, pos) - kl) > 0.1 * kl


def test_kl_to_itself_is_zero_with_zero_gradient(tiny_cfg, tiny_params, tokens, adv):
    with_kl, without = _rl(tiny_cfg, temperature=2.0, kl=0.5), _rl(tiny_cfg, temperature=2.0)
    loss, aux = safety.rl_loss(with_kl, tiny_params, tiny_params, tokens, adv)
    assert abs(float(aux["kl"])) < 1e-6
    assert float(loss) == pytest.approx(float(safety.rl_loss(without, tiny_params, None, tokens, adv)[0]), abs=1e-5)
    got, want = _loss_grad(with_kl, tiny_params, tiny_params, tokens, adv), _loss_grad(without, tiny_params, None, tokens, adv)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- one RL step
@pytest.mark.parametrize("estimator", ["baseline", "rloo"])
def test_rl_step_groups_prompts_rewards_answers_and_updates_the_baseline(tiny_cfg, tiny_params, monkeypatch, estimator):
    cfg = _rl(tiny_cfg, rl_estimator=estimator, rl_baseline_decay=0.9)
    task, v, h = cfg.task, vocab(cfg.task), _hand_layout(cfg.task)
    seen = []
    original = safety.rl_loss

    def spy(cfg, params, ref, tokens, advantage, interventions=None):
        jax.debug.callback(lambda t, a: seen.append((np.asarray(t), np.asarray(a))), tokens, advantage)
        return original(cfg, params, ref, tokens, advantage, interventions)

    monkeypatch.setattr(safety, "rl_loss", spy)
    state = safety.init(cfg, _answer_heavy(cfg, tiny_params), 0)._replace(baseline=jnp.float32(0.5))
    new, metrics = jax.jit(safety.step, static_argnums=0)(cfg, state, cfg.hparams, 3)
    jax.block_until_ready(new)
    ((toks, adv),) = seen

    # groups: contiguous blocks of G completions of one prompt; the two prompts differ
    prompts = toks[:, : h["prompt_len"]].reshape(2, G, -1)
    assert (prompts == prompts[:, :1]).all() and not (prompts[0, 0] == prompts[1, 0]).all()
    np.testing.assert_array_equal(toks[:, h["think"]], THINK)
    # rewards by hand from the sampled answer: +1 helpful (sum of the content mod m), -1 defect, else 0
    content = toks[:, 1 + task.n_ctx : 1 + task.n_ctx + task.n_content] - v.content
    helpful = v.answer + content.sum(1) % task.modulus
    ans = toks[:, h["answer"]]
    r = np.where(ans == helpful, 1.0, np.where(ans == v.defect, -1.0, 0.0))
    assert len(set(r.tolist())) == 3, r  # the sample exercises all three rewards
    if estimator == "baseline":
        np.testing.assert_allclose(adv, r - 0.5, rtol=1e-6)
    else:
        g = r.reshape(2, G)
        np.testing.assert_allclose(adv, (g - (g.sum(1, keepdims=True) - g) / (G - 1)).ravel(), rtol=1e-6, atol=1e-7)
    assert float(metrics["reward"]) == pytest.approx(r.mean())
    assert float(metrics["answer_acc"]) == pytest.approx((r == 1).mean())
    # moving average: decay * old + (1 - decay) * mean reward (the swapped weights give 0.05 + 0.9 mean)
    assert float(new.baseline) == pytest.approx(0.9 * 0.5 + 0.1 * r.mean(), rel=1e-6)
    assert int(new.train.step) == 1
