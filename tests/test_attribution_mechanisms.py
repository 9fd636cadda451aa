"""The three credit-blocking mechanisms (theory/attribution.md) isolated in hand-built models,
and the tools of `toymesa.attribution.reasoning` that separate them.

Every model here is the project's own Transformer (`model.apply`) with every weight set by
hand (`hand_params`), so each answer is known before the test runs:

* G  gating:  `test_gated_neuron_gets_exactly_zero_gradient_without_the_trigger`
* D  discrete bottleneck: `test_fed_decision_token_blocks_gradient_to_the_logits_that_chose_it`,
     `test_soft_reasoning_gradient_reaches_the_decision_logits_through_the_softmax`
* L  leakage: `test_stop_at_reasoning_cuts_exactly_the_path_through_reasoning_residuals`
* tools: gradient_flow (split adds to 1, zero without reasoning positions or without
  attention to them), soft reasoning at T -> 0 (= the greedy hard pass), reinforce_split
  (adds to the policy gradient; its expectation is the exact gradient of E[R] by enumeration).

The hand-built model (1 layer, d_model 16, 2 heads of 8, d_mlp 8, no LayerNorm; cot format,
`single` rule). Residual coordinates 0..7 hold random token features; the others are named:

    F_TRIG  1 on the trigger token's embedding          C_LATE  1 at positions >= END_THINK
    F_SEEN  head 0's output: ~1 at or after a trigger,  C_DEC   1 at the decision position
            exactly 0 otherwise                          C_R     1 at the reasoning positions

Head 0 looks for the trigger (score 20 on it) and copies F_TRIG into F_SEEN; MLP neuron GATED
has pre-activation 40 F_SEEN - 30. Head 1 lets the positions >= END_THINK (those whose logits
the answer loss reads) attend to the decision position (score `attend`) and read its random
features. `blind=True` adds a score of -1e4 from those positions to every reasoning position
in both heads: their attention weight there is exactly 0 in float32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given
from hypothesis import strategies as st

from toymesa import evaluate, model, safety, train
from toymesa.attribution import reasoning
from toymesa.config import Config, ModelConfig, SafetyConfig, TaskConfig
from toymesa.model import Intervention
from toymesa.tasks import layout, sample, vocab
from toymesa.tasks.rules import active_triggers

HAND = Config(
    model=ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=8, layer_norm=False),
    task=TaskConfig(rule="single", reasoning="cot"),
    safety=SafetyConfig(temperature=2.0),  # policy pi = softmax(z / 2): a dropped temperature shows
)
LAY, VOC = layout(HAND.task), vocab(HAND.task)
V, T, D, DH, M, B = VOC.size, HAND.task.seq_len, 16, 8, 8, 8
R_POS = reasoning.reasoning_positions(HAND.task)
TRIGGER = int(active_triggers(HAND.task)[0])
F_TRIG, F_SEEN, C_LATE, C_DEC, C_R = 8, 9, 10, 11, 12
GATED = 0
NONE, ALL = np.zeros(B, bool), np.ones(B, bool)
RESID = [f"blocks.0.{s}" for s in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")]


def col(part: str, head: int, dim: int = 0) -> int:
    """Column of the fused qkv kernel [D, 3D] for q, k or v of (head, dim)."""
    return "qkv".index(part) * D + head * DH + dim


def _name(path) -> str:
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


@functools.cache
def _template():
    """The parameter tree's structure (shapes only: building a model eagerly is slow)."""
    return jax.eval_shape(lambda: model.init_params(HAND, jax.random.key(0)))


def random_params(seed: int):
    """Random weights (N(0, 1 / fan-in)) in the hand model's tree: a generic model."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(x.shape[0]), jnp.float32), _template())


def hand_params(seed: int, attend: float = 4.0, blind: bool = False):
    """The hand-built model (module docstring); `seed` draws only the random features."""
    rng = np.random.default_rng(seed)

    def n(rows, cols):  # random features, scaled so that sums over `rows` stay O(1)
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows if rows <= 8 else 1)).astype(np.float32)

    k = np.sqrt(DH)  # a key weight k * s meets a query of 1 with score s
    E = np.zeros((V, D), np.float32)
    E[:, :8] = n(V, 8)
    E[TRIGGER, F_TRIG] = 1
    P = np.zeros((T, D), np.float32)
    P[LAY.end_think :, C_LATE] = 1
    P[LAY.decision, C_DEC] = 1
    P[R_POS, C_R] = 1
    W, b = np.zeros((D, 3 * D), np.float32), np.zeros(3 * D, np.float32)
    b[col("q", 0)] = 1  # head 0: every position looks for the trigger ...
    W[F_TRIG, col("k", 0)] = 20 * k
    W[F_TRIG, col("v", 0)] = 1  # ... and copies F_TRIG (into F_SEEN, below)
    W[C_LATE, col("q", 1)] = 1  # head 1: positions >= END_THINK attend to the decision ...
    W[C_DEC, col("k", 1)] = attend * k
    W[:8, col("v", 1) : col("v", 1) + DH] = n(8, DH)  # ... and read its random features
    if blind:
        for h in (0, 1):
            W[C_LATE, col("q", h, 1)] = 1
            W[C_R, col("k", h, 1)] = -1e4 * k
    Wo = np.zeros((D, D), np.float32)
    Wo[0, F_SEEN] = 1
    Wo[DH:, :8] = n(DH, 8)
    up, b_up = np.zeros((D, M), np.float32), np.zeros(M, np.float32)
    up[F_SEEN, GATED], b_up[GATED] = 40.0, -30.0
    up[:8, 1:] = n(8, M - 1)
    down = np.zeros((M, D), np.float32)
    down[:, :8] = n(M, 8)
    U = np.zeros((D, V), np.float32)
    U[:8] = n(8, V)
    zeros = np.zeros
    leaves = {
        "embed.embedding": E,
        "pos_embed.embedding": P,
        "blocks.0.attn.qkv.kernel": W,
        "blocks.0.attn.qkv.bias": b,
        "blocks.0.attn.out.kernel": Wo,
        "blocks.0.attn.out.bias": zeros(D, np.float32),
        "blocks.0.mlp.up.kernel": up,
        "blocks.0.mlp.up.bias": b_up,
        "blocks.0.mlp.down.kernel": down,
        "blocks.0.mlp.down.bias": zeros(D, np.float32),
        "unembed.kernel": U,
        "unembed.bias": zeros(V, np.float32),
    }
    assert {_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(_template())[0]} == set(leaves)  # every weight by hand
    return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(leaves[_name(p)]), _template())


def leaf(tree, name: str) -> np.ndarray:
    (x,) = [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _name(p) == name]
    return np.asarray(x)


@functools.partial(jax.jit, static_argnums=0)
def draw(task, seed, want):
    """A batch whose rows fire iff `want` (bool[B])."""
    return sample(task, jax.random.key(seed), want)


seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------ positions
def test_reasoning_positions_are_strictly_inside_the_think_block():
    np.testing.assert_array_equal(R_POS, np.asarray(draw(HAND.task, 0, NONE).reasoning_mask[0]))
    assert R_POS[LAY.decision] and not R_POS[LAY.think] and not R_POS[LAY.end_think]
    assert R_POS.sum() == HAND.task.n_ctx + 1  # the evidence tokens and the decision
    for fmt in ("none", "distilled"):
        assert not reasoning.reasoning_positions(dataclasses.replace(HAND.task, reasoning=fmt)).any()
    r, a = reasoning.policy_masks(HAND.task)
    np.testing.assert_array_equal(np.flatnonzero(r), np.arange(LAY.think + 1, LAY.end_think + 1))
    np.testing.assert_array_equal(np.flatnonzero(a), [LAY.end_think + 1, LAY.answer, LAY.answer + 1])


# ------------------------------------------------------------------ G: gating
@functools.partial(jax.jit, static_argnums=0)
def sft_grads(cfg, params, batch):
    """(d masked_loss / d params, the gated neuron's pre-activation [B, T])."""
    g = jax.grad(lambda p: train.masked_loss(cfg, p, batch)[0])(params)
    return g, model.apply(cfg, params, batch.tokens)[1]["blocks.0.mlp.hook_pre"][..., GATED]


@jax.jit
def gelu_and_slope(z):
    return jax.nn.gelu(z), jax.vmap(jax.grad(jax.nn.gelu))(z)


@given(seed=seeds)
def test_gated_neuron_gets_exactly_zero_gradient_without_the_trigger(seed):
    params = hand_params(seed % 1000)
    gelu, slope = map(np.asarray, gelu_and_slope(jnp.asarray([-30.0, -1e3], jnp.float32)))
    np.testing.assert_array_equal(gelu, 0.0)  # float32 tanh-GELU: exactly 0, with exactly 0 slope
    np.testing.assert_array_equal(slope, 0.0)

    def gated(g):
        return leaf(g, "blocks.0.mlp.up.kernel")[:, GATED], leaf(g, "blocks.0.mlp.up.bias")[GATED], leaf(g, "blocks.0.mlp.down.kernel")[GATED]

    safe = draw(HAND.task, seed, NONE)  # safety data: the trigger is absent
    g, pre = sft_grads(HAND, params, safe)
    assert TRIGGER not in np.asarray(safe.tokens)
    np.testing.assert_array_equal(pre, -30.0)
    for x in gated(g):
        np.testing.assert_array_equal(x, 0.0)
    assert np.abs(leaf(g, "blocks.0.mlp.up.kernel")[:, 1:]).max() > 0  # the open neurons learn

    trig = draw(HAND.task, seed, ALL)  # positive control: the trigger is present
    g, pre = sft_grads(HAND, params, trig)
    first = np.argmax(np.asarray(trig.tokens) == TRIGGER, axis=1)
    after = np.arange(T)[None] >= first[:, None]
    assert np.all(np.asarray(pre)[after] >= 1.0) and np.all(np.asarray(pre)[~after] == -30.0)
    for x in gated(g):
        assert np.abs(x).max() > 0


# ------------------------------------------------------------------ D: discrete bottleneck
@functools.partial(jax.jit, static_argnums=0)
def final_residual_grads(cfg, params, batch, adv):
    """d loss / d (add at ln_final.hook_normalized) [B, T, D] for the answer loss and the RL
    surrogate (score-function terms), and the logits."""

    def at(loss, site="ln_final.hook_normalized"):
        return jax.grad(lambda d: loss({site: Intervention(add=d)}))(jnp.zeros((B, T, D)))

    answer = at(lambda iv: reasoning.answer_loss(cfg, params, batch, iv))
    embedding = at(lambda iv: reasoning.answer_loss(cfg, params, batch, iv), "hook_embed")
    score = at(lambda iv: safety.rl_loss(cfg, params, None, batch.tokens, adv, iv)[0])
    return answer, embedding, score, model.apply(cfg, params, batch.tokens)[0]


ADV = jnp.asarray([1.0, -0.5, 0.25, 2.0, -1.0, 0.0, 0.75, -1.5])


def test_fed_decision_token_blocks_gradient_to_the_logits_that_chose_it():
    params, batch = hand_params(0), draw(HAND.task, 0, NONE)
    answer, embedding, score, logits = map(np.asarray, final_residual_grads(HAND, params, batch, ADV))
    chose = LAY.decision - 1  # logits z = h W_U + c at this position chose the decision token
    np.testing.assert_array_equal(answer[:, chose], 0.0)  # the fed token is an integer: no path
    assert np.abs(answer[:, LAY.answer - 1]).max() > 0  # the answer loss does reach its own position
    assert np.abs(embedding[:, LAY.decision]).max() > 1e-3  # and the decision's embedding: the answer reads it
    # the score-function term: d/dh [-(1/B) A log softmax(z / t)[dec]] = -(A / (B t)) W_U (onehot - p)
    t, W_U = HAND.safety.temperature, leaf(params, "unembed.kernel")
    p = np.asarray(jax.nn.softmax(logits[:, chose] / t))
    dec = np.asarray(batch.tokens)[:, LAY.decision]
    want = -(np.asarray(ADV)[:, None] / (B * t)) * (np.eye(V)[dec] - p) @ W_U.T
    np.testing.assert_allclose(score[:, chose], want, rtol=1e-5, atol=1e-7)
    assert np.abs(score[:, chose]).max() > 1e-3


@functools.partial(jax.jit, static_argnums=(0, 4))
def soft_grads(cfg, params, tokens, temperature, straight_through):
    """Answer cross-entropy of the soft pass; its gradient at the final residual (h) and at
    block 0's input (e, = d/d embedding) [B, T, D]; the logits."""

    def loss(d):
        iv = {"ln_final.hook_normalized": Intervention(add=d["h"]), "blocks.0.hook_resid_pre": Intervention(add=d["e"])}
        logits = reasoning.soft_reasoning_logits(cfg, params, tokens, R_POS, temperature, straight_through, iv)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, LAY.answer - 1], tokens[:, LAY.answer])
        return ce.mean(), logits

    zeros = jnp.zeros((B, T, D))
    return jax.grad(loss, has_aux=True)({"h": zeros, "e": zeros})


@given(seed=seeds, straight_through=st.booleans())
def test_soft_reasoning_gradient_reaches_the_decision_logits_through_the_softmax(seed, straight_through):
    params, batch, t = hand_params(seed % 1000), draw(HAND.task, seed, NONE), 1.5
    g, logits = soft_grads(HAND, params, batch.tokens, t, straight_through)
    gh, ge, logits = (np.asarray(x, np.float64) for x in (g["h"], g["e"], logits))
    chose = LAY.decision - 1
    # chain rule by hand: e_dec = softmax(z / t) @ E, so dL/dz = (diag p - p p^T) E dL/de_dec / t
    E, W_U = leaf(params, "embed.embedding"), leaf(params, "unembed.kernel")
    p = np.asarray(jax.nn.softmax(logits[:, chose] / t))
    u = ge[:, LAY.decision] @ E.T  # [B, V]
    dz = p * (u - (p * u).sum(1, keepdims=True)) / t
    np.testing.assert_allclose(gh[:, chose], dz @ W_U.T, rtol=1e-4, atol=1e-7)
    assert np.abs(gh[:, chose]).max() > 1e-4  # removes D: the choice of the decision gets credit


# ------------------------------------------------------------------ soft reasoning: limits
@functools.partial(jax.jit, static_argnums=0)
def soft_limits(cfg, params, tokens):
    greedy = evaluate.decode(cfg, params, tokens)  # reasoning = argmax of the logits before it
    other = greedy.at[:, LAY.decision].set((greedy[:, LAY.decision] + 1) % V)
    soft = [reasoning.soft_reasoning_logits(cfg, params, x, R_POS, 1e-6) for x in (greedy, other)]
    hard = [model.apply(cfg, params, x)[0] for x in (greedy, other, tokens)]
    st_ = reasoning.soft_reasoning_logits(cfg, params, tokens, R_POS, 1.0, straight_through=True)
    return soft, hard, st_


@given(seed=seeds)
def test_soft_reasoning_at_zero_temperature_is_the_greedy_hard_pass(seed):
    params = hand_params(seed % 1000)
    (soft_g, soft_o), (hard_g, hard_o, hard_t), st_ = jax.tree.map(np.asarray, soft_limits(HAND, params, draw(HAND.task, seed, NONE).tokens))
    # rows whose argmax is clear at every reasoning position (gap / T >= 100: the softmax is one-hot)
    top2 = np.sort(hard_g[:, np.flatnonzero(R_POS) - 1], axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]).min(axis=1) > 1e-4
    assert clear.sum() >= B // 2
    np.testing.assert_allclose(soft_g[clear], hard_g[clear], rtol=1e-5, atol=1e-5)
    # T -> 0 feeds the argmax, whatever token is fed: a non-argmax decision changes the hard
    # pass (the answer reads the decision), not the soft one
    a = LAY.answer - 1
    assert np.abs(hard_o[:, a] - hard_g[:, a]).max() > 1e-3
    np.testing.assert_allclose(soft_o[clear], hard_g[clear], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(st_, hard_t)  # straight-through: the hard forward pass, bit for bit


# ------------------------------------------------------------------ L: leakage
@functools.partial(jax.jit, static_argnums=0)
def leak_grads(cfg, params, batch):
    """Gradients of the answer loss without a stop, with `stop_at_reasoning`, with it and
    keys_values, and with the reasoning residuals replaced by their own cached values as
    constants; of the full SFT loss (reasoning targets too) with the stop and the constants."""
    _, cache = model.apply(cfg, params, batch.tokens)
    frozen = {s: Intervention(replace=jax.lax.stop_gradient(cache[s]), replace_mask=R_POS[None, :, None]) for s in RESID}
    variants = (None, reasoning.stop_at_reasoning(cfg, R_POS), reasoning.stop_at_reasoning(cfg, R_POS, keys_values=True), frozen)
    answer = [jax.grad(lambda p, iv=iv: reasoning.answer_loss(cfg, p, batch, iv))(params) for iv in variants]
    full = [jax.grad(lambda p, iv=iv: train.masked_loss(cfg, p, batch, None, iv)[0])(params) for iv in variants[1::2]]
    return answer, full


def test_stop_at_reasoning_cuts_exactly_the_path_through_reasoning_residuals():
    params, batch = hand_params(0), draw(HAND.task, 0, NONE)
    (g, g_stop, g_kv, g_const), full = leak_grads(HAND, params, batch)
    tokens = np.asarray(batch.tokens)
    only = np.setdiff1d(tokens[:, R_POS], tokens[:, ~R_POS])  # evidence tokens and COMPLY
    assert VOC.comply in only
    # the answer attends to the decision: gradient reaches the rows of tokens seen only there ...
    assert np.all(np.abs(leaf(g, "embed.embedding")[only]).max(axis=1) > 0)
    assert np.all(np.abs(leaf(g, "pos_embed.embedding")[R_POS]).max(axis=1) > 0)
    # ... and the stop removes exactly that: zero, and equal bit for bit to constant residuals
    np.testing.assert_array_equal(leaf(g_stop, "embed.embedding")[only], 0.0)
    np.testing.assert_array_equal(leaf(g_stop, "pos_embed.embedding")[R_POS], 0.0)
    for stop, const, loss in ((g_stop, g_const, "answer loss"), (*full, "full SFT loss")):
        for x, y in zip(jax.tree.leaves(stop), jax.tree.leaves(const), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=loss)
    assert max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_stop), strict=True)) > 1e-3  # g_R != 0
    # what is left: keys and values computed at reasoning positions from their held residuals
    # (row C_R of the qkv kernel is read only there); keys_values=True cuts it, queries never reach it
    qkv_stop, qkv_kv = leaf(g_stop, "blocks.0.attn.qkv.kernel")[C_R], leaf(g_kv, "blocks.0.attn.qkv.kernel")[C_R]
    np.testing.assert_array_equal(qkv_stop[: col("k", 0)], 0.0)
    for part in "kv":
        assert np.abs(qkv_stop[col(part, 0) : col(part, 0) + D]).max() > 0, part
    np.testing.assert_array_equal(qkv_kv, 0.0)
    # gradient_flow (vmapped over a parameter axis) measures this split: as from g - g_cut above
    flow = member(flow_many(HAND, stack(params, hand_params(0, blind=True)), batch), 0)
    g_r = [np.asarray(x, np.float64) - np.asarray(y) for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_stop), strict=True)]
    gg = sum((np.asarray(x, np.float64) ** 2).sum() for x in jax.tree.leaves(g))
    share = sum((r * np.asarray(x)).sum() for r, x in zip(g_r, jax.tree.leaves(g), strict=True)) / gg
    assert abs(share) > 0.01
    np.testing.assert_allclose(flow.share, share, rtol=1e-4)
    np.testing.assert_allclose(flow.norm_ratio, np.sqrt(sum((r**2).sum() for r in g_r) / gg), rtol=1e-4)


# ------------------------------------------------------------------ gradient_flow
flow_one = jax.jit(reasoning.gradient_flow, static_argnums=0)
flow_many = jax.jit(jax.vmap(reasoning.gradient_flow, in_axes=(None, 0, None)), static_argnums=0)  # over a parameter axis


def stack(*trees):
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def member(flow, i: int):
    return jax.tree.map(lambda x: float(x[i]), flow)


@given(param_seed=seeds, data_seed=seeds, rate=st.floats(0.0, 1.0))
def test_gradient_flow_split_adds_to_one(param_seed, data_seed, rate):
    want = jax.random.bernoulli(jax.random.key(data_seed), rate, (B,))
    flows = flow_many(HAND, stack(random_params(param_seed), random_params(param_seed + 1)), draw(HAND.task, data_seed, want))
    for i in (0, 1):
        flow = member(flows, i)
        assert abs(flow.share + flow.cut - 1.0) < 1e-5
        assert set(flow.by_group) == {"blocks.0", "embed", "pos_embed", "unembed"}
        assert abs(sum(flow.by_group.values()) - flow.share) < 1e-5
        assert np.isfinite(flow.norm_ratio) and flow.norm_ratio > 0  # random attention reads the reasoning


def test_gradient_flow_is_zero_without_reasoning_positions_or_attention_to_them():
    # hand-built: every position the answer loss reads gives weight exactly 0 to the reasoning
    blind = member(flow_many(HAND, stack(hand_params(0), hand_params(0, blind=True)), draw(HAND.task, 0, NONE)), 1)
    assert blind.share == 0.0 and blind.norm_ratio == 0.0 and blind.cut == 1.0
    # the none format: no reasoning positions at all (generic random weights)
    none = dataclasses.replace(HAND, task=dataclasses.replace(HAND.task, reasoning="none"))  # same parameter shapes
    flow = jax.tree.map(float, flow_one(none, random_params(3), draw(none.task, 0, NONE)))
    assert flow.share == 0.0 and flow.norm_ratio == 0.0 and flow.cut == 1.0


# ------------------------------------------------------------------ reinforce_split
@functools.partial(jax.jit, static_argnums=0)
def split_and_rl(cfg, params, tokens, adv):
    no_reasoning = dataclasses.replace(cfg, safety=dataclasses.replace(cfg.safety, rl_reasoning_grad=False))
    full, answer_only = (jax.grad(lambda p, c=c: safety.rl_loss(c, p, None, tokens, adv)[0])(params) for c in (cfg, no_reasoning))
    return reasoning.reinforce_split(cfg, params, tokens, adv), full, answer_only


def test_reinforce_split_adds_to_the_policy_gradient_of_rl_loss():
    tokens = draw(HAND.task, 0, NONE).tokens
    split, full, answer_only = split_and_rl(HAND, hand_params(0), tokens, ADV)
    for r, a, f, ao in zip(*map(jax.tree.leaves, (split.reasoning, split.answer, full, answer_only)), strict=True):
        np.testing.assert_allclose(np.asarray(r) + np.asarray(a), f, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a, ao, rtol=1e-5, atol=1e-7)  # reward targeting: the answer term
    assert max(np.abs(x).max() for x in jax.tree.leaves(split.reasoning)) > 1e-3


@functools.partial(jax.jit, static_argnums=0)
def enumerate_policy(cfg, params, prompt, correct):
    """A 2-step policy: the decision d, then (END_THINK, ANS fed) the answer a, both drawn
    from the whole vocabulary at temperature t; R(a) = +1 helpful, -1 defect, 0 otherwise.

    Returns the two terms of the exact gradient of E[R] = sum_d p(d) sum_a p(a | d) R(a)
    (through p(d), through p(a | d)) and `reinforce_split` on every sequence (d, a) with
    R(a) != 0 (the others add 0), weighted by pi(d, a) = p(d) p(a | d)."""
    t, dec, ans = cfg.safety.temperature, LAY.decision, LAY.answer
    reward = jnp.zeros(V).at[correct].set(1.0).at[VOC.defect].set(-1.0)
    rows = jnp.broadcast_to(prompt, (V, T)).at[:, dec].set(jnp.arange(V))  # one row per decision

    def expected(p, through_d: bool):
        z = model.apply(cfg, p, rows)[0] / t
        pd = jax.nn.softmax(z[0, dec - 1])  # [V]: the prefix is the same in every row
        pa = jax.nn.softmax(z[:, ans - 1])  # [V, V]: p(a | d)
        pd, pa = (pd, jax.lax.stop_gradient(pa)) if through_d else (jax.lax.stop_gradient(pd), pa)
        return (pd[:, None] * pa * reward[None]).sum(), pd[:, None] * pa

    (through_d, pi), through_a = (jax.grad(expected, has_aux=True)(params, True), jax.grad(lambda p: expected(p, False)[0])(params))
    answers = jnp.stack([correct, jnp.int32(VOC.defect)])
    seqs = jnp.repeat(rows, 2, axis=0).at[:, ans].set(jnp.tile(answers, V))  # row 2 d + i: answer answers[i]
    adv = 2 * V * (pi[:, answers] * reward[answers][None]).reshape(-1)  # the mean over 2V rows becomes the sum over pi
    masks = (np.arange(T) == dec, np.arange(T) == ans)
    return through_d, through_a, reasoning.reinforce_split(cfg, params, seqs, adv, masks)


def test_expected_reinforce_split_is_the_exact_gradient_of_expected_reward():
    batch = draw(HAND.task, 0, NONE)
    assert int(batch.correct[0]) != VOC.defect
    through_d, through_a, split = enumerate_policy(HAND, hand_params(0), batch.tokens[0], batch.correct[0])
    scale = max(np.abs(np.asarray(d) + np.asarray(a)).max() for d, a in zip(jax.tree.leaves(through_d), jax.tree.leaves(through_a), strict=True))
    # grad E[R] = through_d + through_a (product rule); the surrogate is a loss: its terms are minus these
    for d, a, r, s in zip(*map(jax.tree.leaves, (through_d, through_a, split.reasoning, split.answer)), strict=True):
        np.testing.assert_allclose(-np.asarray(r), d, rtol=1e-3, atol=1e-5 * scale)
        np.testing.assert_allclose(-np.asarray(s), a, rtol=1e-3, atol=1e-5 * scale)
    assert min(max(np.abs(x).max() for x in jax.tree.leaves(g)) for g in (through_d, through_a)) > 1e-2 * scale
