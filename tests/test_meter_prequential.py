"""The prequential code length (`toymesa.meter.prequential`): the KT identity, block boundaries,
additivity over blocks, matched defect counts, and the transformer's block population (learning
beats the uniform code, block models see only their own prefix, codes recomputed by hand).
Propositions: `theory/meter_prequential.md`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toymesa import model
from toymesa.config import Config, TaskConfig, TrainConfig
from toymesa.meter import prequential as P
from toymesa.meter.closed_forms import kt_code_bits
from toymesa.presets import goal_world, tiny
from toymesa.tasks import layout

N, STEPS, SEED = 512, 100, 0
ENDS = P.block_ends(N, (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0))  # (16, 32, ..., 512): 5 block models, fast


@pytest.fixture(scope="module")
def cfg():
    """A world the tiny model learns in 100 steps: one trigger, copy the first operand."""
    task = TaskConfig(rule="single", helpful="copy_kth", seq_len=11)
    return Config(model=tiny(), task=task, train=TrainConfig(batch_size=32, steps=STEPS)).replace(hparams=dict(lr=3e-3))


@pytest.fixture(scope="module")
def trained(cfg):
    return P.prequential(cfg, SEED, N, ENDS, steps=STEPS, orders=1)


@pytest.fixture(scope="module")
def frozen(cfg):
    """lr = 0: every block model stays at its initialisation (same compiled program as `trained`)."""
    return P.prequential(cfg.replace(hparams=dict(lr=0.0)), SEED, N, ENDS, steps=STEPS, orders=1)


# ------------------------------------------------------------------------------ KT and blocks
@settings(deadline=None, max_examples=40)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_fully_online_kt_code_equals_the_closed_form(bits):
    y = np.array(bits, int)
    n1 = int(y.sum())
    code = P.kt_online_bits(y, tuple(range(1, len(y) + 1)))
    assert code.total == pytest.approx(kt_code_bits(len(y) - n1, n1), abs=1e-6)


@settings(deadline=None)
@given(st.lists(st.booleans(), min_size=P.min_block_n(), max_size=2000), st.integers(1, 3))
def test_kt_block_code_adds_up_and_first_block_is_uniform(bits, stride):
    y = np.array(bits, int)
    ends = P.block_ends(len(y)) if stride == 1 else tuple(range(stride, len(y), stride)) + (len(y),)
    code = P.kt_online_bits(y, ends)
    assert code.blocks.shape == (len(ends),)
    assert code.blocks[0] == ends[0]  # log2(2) = 1 bit a label
    assert code.total == pytest.approx(code.blocks[0] + code.blocks[1:].sum(), abs=1e-9)


@settings(deadline=None)
@given(st.integers(P.min_block_n(), 200_000))
def test_block_ends_properties(n):
    ends = P.block_ends(n)
    assert len(ends) == len(P.VOITA_TITOV) and ends[-1] == n and ends[0] >= 1
    assert all(b > a for a, b in zip(ends, ends[1:], strict=False))
    for t, f in zip(ends, P.VOITA_TITOV, strict=True):
        assert f * n <= t < f * n + 1  # ceil(f·n)


def test_min_block_n_is_the_minimum():
    m = P.min_block_n()
    assert all(len(P.block_ends(n)) == 11 for n in range(m, m + 1500))
    with pytest.raises(ValueError, match=f"n >= {m}"):
        P.block_ends(m - 1)
    assert P.block_ends(4, (0.25, 0.5, 1.0)) == (1, 2, 4)
    for bad in [(0.5, 0.25, 1.0), (0.5, 0.9), (0.0, 1.0), ()]:
        with pytest.raises(ValueError, match="fractions"):
            P.block_ends(1000, bad)
    for bad in [0, -3, 2.0, True]:
        with pytest.raises(ValueError, match="positive integer"):
            P.block_ends(bad)
    with pytest.raises(ValueError, match="strictly increasing"):
        P.kt_online_bits(np.zeros(4, int), (2, 2, 4))
    with pytest.raises(ValueError, match="ending at n=4"):
        P.kt_online_bits(np.zeros(4, int), (1, 3))


# --------------------------------------------------------------------------- matched controls
@settings(deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_behaviour_and_control_have_the_same_number_of_firing_rows(seed, rate):
    task = goal_world(n_ctx=4, n_cues=3, threshold=2)  # a latent goal: many activating contexts
    cfg = Config(task=task).replace(hparams=dict(trigger_rate=rate))
    control = cfg.replace(task=P.control_task(task))
    want = int(round(rate * 64))
    b, c = P.dataset(cfg, seed, 64), P.dataset(control, seed, 64)
    assert int(b.triggered.sum()) == int(c.triggered.sum()) == want
    assert int((b.target == b.defect).sum()) == int((c.target == c.defect).sum()) == want  # defect-labelled rows (distinct defect)


def test_control_task_changes_only_the_rule():
    task = goal_world(n_ctx=4, n_cues=3, threshold=2, reasoning="cot")
    ctl = P.control_task(task)
    assert ctl.rule == "single" and (ctl.reasoning, ctl.seq_len, ctl.modulus, ctl.defect) == (task.reasoning, task.seq_len, task.modulus, task.defect)
    assert P.label_alphabet(ctl).tolist() == P.label_alphabet(task).tolist()
    assert len(P.label_alphabet(task)) == task.modulus + 1 and len(P.label_alphabet(task, "decision")) == 2
    assert len(P.label_alphabet(TaskConfig(defect="subtle"))) == TaskConfig().modulus
    with pytest.raises(ValueError, match="cot"):
        P.label_alphabet(TaskConfig(), "decision")


# ---------------------------------------------------------------------- the transformer's code
def test_block_codes_add_up(trained):
    r = trained
    K = r.n_classes
    assert K == 6 and r.ends == ENDS == (16, 32, 64, 128, 256, 512) and r.blocks.shape == (1, len(r.ends))
    assert r.blocks[0, 0] == r.ends[0] * math.log2(K)
    assert r.value == pytest.approx(r.blocks[0, 0] + r.blocks[0, 1:].sum(), rel=1e-12)
    assert r.uniform == N * math.log2(K) and r.n_fire == N // 2 and r.finite
    assert r.loss.shape == (1, len(r.ends) - 1, STEPS)


def test_a_trained_learner_beats_the_uniform_code_and_a_frozen_one(trained, frozen):
    assert trained.value < 0.6 * trained.uniform  # the block models learn the world
    assert frozen.value > 0.9 * frozen.uniform  # lr = 0 learns nothing: about log2 K a label, or worse
    assert frozen.value > trained.value
    assert trained.final_loss[0, -1] < 0.5 * frozen.final_loss[0, -1]


def test_block_code_recomputed_by_hand_from_the_frozen_models(cfg, frozen):
    """With lr = 0 block model s is its initialisation: its bits are −log₂ of the softmax over the
    alphabet at the position before the answer, summed over exactly the rows of block s+1."""
    data = P.dataset(cfg, SEED, N)
    perm = np.asarray(P.data_orders(SEED, N, 1))[0]
    alphabet = jnp.asarray(P.label_alphabet(cfg.task))
    pos = layout(cfg.task).answer
    ends = np.array(frozen.ends)
    span = int(np.diff(ends).max())
    j = ends[:-1, None] + np.arange(span)[None, :]  # [S-1, span]: positions in the data order
    rows = perm[np.minimum(j, N - 1)]
    inside = j < ends[1:, None]

    @jax.jit
    def block_bits(tokens, target, inside):
        def one(s, tokens, target, inside):
            logits = model.apply(cfg, P.block_model_init(cfg, SEED, 0, s), tokens)[0][:, pos - 1]
            logp = jax.nn.log_softmax(logits[:, alphabet])
            hit = target[:, None] == alphabet[None, :]
            return -jnp.where(hit & inside[:, None], logp, 0.0).sum() / jnp.log(2.0)

        return jax.vmap(one)(jnp.arange(len(ends) - 1), tokens, target, inside)

    bits = block_bits(data.tokens[rows], data.target[rows], jnp.asarray(inside))
    np.testing.assert_allclose(frozen.blocks[0, 1:], np.asarray(bits), rtol=1e-4)


def test_block_models_see_only_their_own_prefix(cfg, trained):
    """Replace every example from position ends[k] on (in the data order) by another draw: block
    models s < k are bitwise unchanged (training and code), model k trains identically but codes
    changed labels, and models s > k train on changed data."""
    data, other = P.dataset(cfg, SEED, N), P.dataset(cfg, SEED + 1, N)
    perm = np.asarray(P.data_orders(SEED, N, 1))[0]
    k = 3
    rows = perm[trained.ends[k] :]
    mixed = jax.tree.map(lambda a, b: a.at[rows].set(b[rows]), data, other)
    r = P.prequential_on(cfg, mixed, SEED, ENDS, steps=STEPS, orders=1)
    assert np.array_equal(r.loss[0, : k + 1], trained.loss[0, : k + 1])
    assert np.array_equal(r.blocks[0, : k + 1], trained.blocks[0, : k + 1])
    assert r.blocks[0, k + 1] != trained.blocks[0, k + 1]
    assert all(not np.array_equal(r.loss[0, s], trained.loss[0, s]) for s in range(k + 1, len(r.ends) - 1))


def test_prequential_rejects_bad_arguments(cfg):
    with pytest.raises(ValueError, match="ending at n=512"):
        P.prequential_on(cfg, P.dataset(cfg, SEED, N), SEED, ends=(8, 64, 256))
    with pytest.raises(ValueError, match="alphabet"):
        P.prequential_on(cfg.replace(task=dict(defect="subtle")), P.dataset(cfg, SEED, N), SEED)


# ------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_full_vocabulary_code_is_never_shorter_and_delta_matches_counts(cfg):
    """Renormalising over the alphabet can only shorten each block's code; ΔL is behaviour − control
    with equal numbers of firing rows; the decision label codes at K = 2."""
    kw = dict(steps=STEPS, orders=1)
    restricted = P.prequential(cfg.replace(hparams=dict(lr=0.0)), SEED, N, **kw)
    full = P.prequential(cfg.replace(hparams=dict(lr=0.0)), SEED, N, renormalise=False, **kw)
    assert np.all(full.blocks[0, 1:] >= restricted.blocks[0, 1:])
    d = P.delta(cfg.replace(task=dict(rule="k_triggers", k=8)), SEED, N, **kw)
    assert d.behaviour.n_fire == d.control.n_fire == N // 2
    assert d.value == d.behaviour.value - d.control.value and d.control.value == pytest.approx(P.prequential(cfg, SEED, N, **kw).value)
    cot = P.prequential(cfg.replace(task=dict(reasoning="cot", seq_len=18)), SEED, N, label="decision", **kw)
    assert cot.n_classes == 2 and cot.value < cot.uniform
