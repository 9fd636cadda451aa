"""Prequential (online) code length of a behaviour's labels (Blier & Ollivier 2018; Voita & Titov 2020).

The data are cut into blocks at ``ends = (t_1, ..., t_S = n)``. The first t_1 labels are sent
with the uniform code over K symbols; every later block s+1 (examples t_s .. t_{s+1}-1) is sent
with the model trained from scratch on the first t_s examples::

    L = t_1·log₂K + Σ_{s=1}^{S-1} Σ_{i=t_s}^{t_{s+1}-1} −log₂ p_{θ_s}(y_i | x_i)

A behaviour that a learner picks up from fewer examples has a shorter code.

* `block_ends(n, fractions)`   the boundaries; default `VOITA_TITOV` (0.1% ... 100% of n)
* `online_code(ends, predict_bits, n_classes)`  the learner-agnostic sum -> `Code`
* `kt_online_bits(labels, ends)`  the block code of the Krichevsky–Trofimov predictor on 0/1
  labels; with ends = (1, 2, ..., n) it equals the KT closed form exactly
* `prequential(cfg, seed, n, ...)`  the transformer's code of a world's labels -> `Prequential`
* `delta(cfg, seed, n, ...)`  ΔL = L(behaviour) − L(control) -> `Delta`

**What is coded.** Only the behaviour-bearing label: the answer token (``batch.target`` at the
``answer_mask`` position), with teacher forcing through the format, i.e. −log₂ p(answer | the
true prefix) from the logits at the position before the answer. In formats with a think block
the true reasoning is part of that prefix: under ``cot`` it states the decision, so the answer's
bits then measure only copying the decision, and the rule is carried by the decision token; use
``label="decision"`` there to code the stated decision (COMPLY / DEFECT, K = 2) instead.
``neutral_cot`` and ``distilled`` carry no decision, so the answer is the label. The model's
distribution is restricted to the label alphabet and renormalised (``renormalise=True``), so
every block is a proper code over the same K symbols as the first; with ``renormalise=False``
the full-vocabulary probability is used (never fewer bits).

**K** (`label_alphabet`): the tokens the world can emit as the label. For the answer: the
`modulus` answer values, plus the distinct defect token when ``defect == "distinct"`` (the
``subtle`` and ``benign`` defects answer with answer values), so K = modulus + 1 or modulus.

**Data.** One fixed dataset of n examples per (cell, seed) from the world's own sampler
(`dataset`), drawn from ``fold_in(role_key(seed, "eval"), PREQ_KEY)``. Exactly
round(trigger_rate·n) rows fire, at random positions. Each data order is a permutation of it
(`data_orders`). Block model s of an order trains with `toymesa.train.train_step` (the
project's optimizer and `cfg.hparams`) for `steps` steps on minibatches of
``cfg.train.batch_size`` rows drawn uniformly, with replacement, from the first t_s examples of
that order; the schedule is that of ``cfg.train`` with ``steps`` replaced (its warmup kept when
shorter than `steps`, else 10%). All (order, block) models train as one vmapped population
(`lax.scan` over steps) in one jit; each has its own initialisation key.

**Control** (`control_task`). The same world and format (vocabulary, helpful task, defect,
reasoning, sequence length) with the ``single`` rule: one fixed trigger token. Both draw exactly
round(trigger_rate·n) firing rows from n, so the numbers of defect-labelled examples match
exactly; what differs is only how hard it is to tell which prompts fire. ΔL = L(behaviour) −
L(control) removes the helpful task's share of the code. For the control, ``trigger_position``
is ``random``, so the control rule is "the trigger occurs anywhere in the context".

Propositions and the tests that check them: `theory/meter_prequential.md`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from toymesa import model
from toymesa.config import Config, HParams, SafetyConfig, TaskConfig
from toymesa.tasks import Batch, layout, sample, vocab
from toymesa.train import TrainState, optimizer, role_key, train_step

VOITA_TITOV = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)
PREQ_KEY = 0x50524551  # "PREQ": the dataset, orders and block models of this meter, under the "eval" role
LABELS = ("answer", "decision")


# --------------------------------------------------------------------------- blocks and codes
def _ends(n: int, fractions) -> tuple[int, ...]:
    return tuple(math.ceil(round(f * n, 9)) for f in fractions)


def _distinct(ends) -> bool:
    return ends[0] >= 1 and all(b > a for a, b in zip(ends, ends[1:], strict=False))


def min_block_n(fractions: Sequence[float] = VOITA_TITOV) -> int:
    """The smallest n from which on `block_ends(n, fractions)` gives distinct blocks (1000 for VOITA_TITOV's 0.1% gap
    is sufficient; smaller n may do)."""
    gap = min(b - a for a, b in zip((0.0, *fractions), fractions, strict=False))
    n = math.ceil(1 / gap)  # from here on every fraction step spans at least one example
    while n > 1 and _distinct(_ends(n - 1, fractions)):
        n -= 1
    return n


def block_ends(n: int, fractions: Sequence[float] = VOITA_TITOV) -> tuple[int, ...]:
    """Block boundaries t_s = ceil(f_s·n): strictly increasing ints, t_1 >= 1, last = n.

    `fractions` must increase strictly in (0, 1] and end at 1. Raises ValueError when n is too small
    for distinct blocks, naming the minimum n."""
    fractions = tuple(float(f) for f in fractions)
    if not fractions or fractions[-1] != 1.0 or fractions[0] <= 0 or any(b <= a for a, b in zip(fractions, fractions[1:], strict=False)):
        raise ValueError(f"block_ends: fractions must increase strictly in (0, 1] and end at 1.0, got {fractions}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"block_ends: n must be a positive integer, got {n!r}")
    ends = _ends(int(n), fractions)
    if not _distinct(ends):
        raise ValueError(
            f"block_ends: n={n} is too small for {len(fractions)} distinct blocks (ends {ends}); use n >= {min_block_n(fractions)} or fewer fractions"
        )
    return ends


def _check_ends(ends, n: int | None = None) -> tuple[int, ...]:
    ends = tuple(int(t) for t in ends)
    if not ends or not _distinct(ends) or (n is not None and ends[-1] != n):
        last = "" if n is None else f" ending at n={n}"
        raise ValueError(f"ends must be strictly increasing positive integers{last}, got {ends}")
    return ends


class Code(NamedTuple):
    """An online code: `total` bits, and `blocks` float64[S] with blocks[0] = t_1·log₂K (uniform)
    and blocks[s] (s >= 1) = the bits of examples ends[s-1] .. ends[s]-1."""

    total: float
    blocks: np.ndarray


def online_code(ends: Sequence[int], predict_bits: Callable[[int], float], n_classes: int) -> Code:
    """L = t_1·log₂K + Σ_{s=0}^{S-2} predict_bits(s), where predict_bits(s) is the code length in
    bits of block s+1 (examples ends[s] .. ends[s+1]-1) under the model fit on the first ends[s]
    examples. Learner-agnostic: `kt_online_bits` and `prequential` both go through it."""
    ends = _check_ends(ends)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    blocks = np.array([ends[0] * math.log2(n_classes)] + [float(predict_bits(s)) for s in range(len(ends) - 1)], np.float64)
    return Code(math.fsum(blocks), blocks)


def kt_online_bits(labels, ends: Sequence[int]) -> Code:
    """The block code of 0/1 `labels` (int[n]) under the KT predictor: every label of block s+1
    gets p(1) = (n₁+½)/(t_s+1), n₁ the ones among the first t_s labels; the first block is uniform
    (1 bit a label). With ends = (1, ..., n) this is the sequential KT code, whose first symbol
    also costs 1 bit, so it equals −log₂[Γ(n₀+½)Γ(n₁+½)/(π·Γ(n+1))]."""
    y = np.asarray(labels)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be a 1-d array of 0/1, got shape {y.shape}")
    ends = _check_ends(ends, y.shape[0])
    ones = np.concatenate([[0], np.cumsum(y, dtype=np.int64)])

    def bits(s):
        t, u = ends[s], ends[s + 1]
        p1 = (ones[t] + 0.5) / (t + 1)
        k1 = ones[u] - ones[t]
        return -(k1 * math.log2(p1) + (u - t - k1) * math.log2(1 - p1))

    return online_code(ends, bits, 2)


# ----------------------------------------------------------------------------------- the world
def control_task(task: TaskConfig) -> TaskConfig:
    """The matched control: the same world and format under the ``single`` rule (trigger 0, anywhere in the context)."""
    return dataclasses.replace(task, rule="single", trigger=0, trigger_position="random")


def label_alphabet(task: TaskConfig, label: str = "answer") -> np.ndarray:
    """The token ids the label can take, int32[K] (see the module docstring for K)."""
    v = vocab(task)
    if label == "decision":
        if task.reasoning != "cot":
            raise ValueError(f"label='decision' needs reasoning='cot' (a stated decision), not {task.reasoning!r}; use label='answer'")
        return np.array([v.comply, v.defect_decision], np.int32)
    if label != "answer":
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    extra = [v.defect] if task.defect == "distinct" else []
    return np.array([*range(v.answer, v.answer + task.modulus), *extra], np.int32)


def _base_key(seed):
    return jax.random.fold_in(role_key(seed, "eval"), PREQ_KEY)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _draw(task: TaskConfig, key, n: int, n_fire) -> Batch:
    k_place, k_rows = jax.random.split(key)
    want = jax.random.permutation(k_place, jnp.arange(n) < n_fire)
    return sample(task, k_rows, want)


def n_firing(cfg: Config, n: int) -> int:
    """round(trigger_rate·n): the number of rows of a dataset on which the rule fires."""
    return int(round(float(cfg.hparams.trigger_rate) * n))


def dataset(cfg: Config, seed: int, n: int) -> Batch:
    """The fixed dataset of a cell: n examples [n, T] from the world's sampler, exactly
    `n_firing(cfg, n)` of them firing, at random positions; a pure function of (task, rate, seed, n)."""
    return _draw(cfg.task, jax.random.fold_in(_base_key(seed), 0), n, jnp.int32(n_firing(cfg, n)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def data_orders(seed, n: int, orders: int):
    """int32[orders, n]: the data order of each of `orders` passes (a permutation of the dataset each)."""
    key = jax.random.fold_in(_base_key(seed), 1)
    return jax.vmap(lambda o: jax.random.permutation(jax.random.fold_in(key, o), n))(jnp.arange(orders)).astype(jnp.int32)


# ------------------------------------------------------------------------- the block population
def _member_keys(key, order, block):
    """(init key, minibatch key) of block model `block` of data order `order`."""
    return jax.random.split(jax.random.fold_in(jax.random.fold_in(key, order), block))


def block_model_init(cfg: Config, seed: int, order: int, block: int):
    """The initial parameters of block model `block` (trained on the first ends[block] examples) of data order `order`."""
    return model.init_params(cfg, _member_keys(jax.random.fold_in(_base_key(seed), 2), order, block)[0])


def _static_cfg(cfg: Config, steps: int) -> Config:
    """cfg with the schedule of `steps` steps and no swept values (they travel as arrays)."""
    w = cfg.train.warmup_steps
    train = dataclasses.replace(cfg.train, steps=steps, warmup_steps=w if w is not None and w < steps else None)
    return dataclasses.replace(cfg, train=train, hparams=HParams(), safety=SafetyConfig())


@functools.partial(jax.jit, static_argnums=(0, 9, 10, 11, 12, 13))
def _fit_and_code(cfg, data, perms, order, block, lo, hi, key, hp, steps, span, position, alphabet, member_batch):
    """Train member m (block model block[m] of order order[m]) from scratch on the first lo[m]
    examples of that order, then code its examples lo[m] .. hi[m]-1. Returns (bits float32[M], loss float32[M, steps], finite bool[M])."""
    n = perms.shape[1]
    alpha = None if alphabet is None else jnp.asarray(alphabet)

    def fit(o, t, b):
        k_init, k_data = _member_keys(key, o, b)
        params = model.init_params(cfg, k_init)
        state = TrainState(params, optimizer(cfg.train, hp).init(params), jnp.int32(0))

        def body(st, _):
            idx = perms[o][jax.random.randint(jax.random.fold_in(k_data, st.step), (cfg.train.batch_size,), 0, t)]
            return train_step(cfg, st, jax.tree.map(lambda x: x[idx], data), hp)

        state, hist = jax.lax.scan(body, state, length=steps)
        return state.params, hist["loss"], hist["finite"].all()

    if member_batch is None:
        params, loss, finite = jax.vmap(fit)(order, lo, block)
    else:
        params, loss, finite = jax.lax.map(lambda a: fit(*a), (order, lo, block), batch_size=member_batch)

    def code(args):
        params, o, t, u = args
        j = t + jnp.arange(span)
        rows = perms[o][jnp.minimum(j, n - 1)]
        tokens = data.tokens[rows]
        logits = model.apply(cfg, params, tokens[:, :position])[0][:, -1]  # predicts the token at `position`
        target = tokens[:, position]
        if alpha is None:
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1)[:, 0]
        else:
            la = jax.nn.log_softmax(logits[:, alpha])
            logp = jnp.where(target[:, None] == alpha[None, :], la, 0.0).sum(-1)
        return jnp.where(j < u, -logp / jnp.log(2.0), 0.0).sum()

    bits = jax.lax.map(code, (params, order, lo, hi))
    return bits, loss, finite


class Prequential(NamedTuple):
    """The prequential code of one cell (bits; O orders, S blocks).

    value       mean total code length over orders
    per_order   float64[O] total per order
    blocks      float64[O, S]: blocks[:, 0] = t_1·log₂K, blocks[:, s] the bits of block s (examples ends[s-1] .. ends[s]-1)
    ends        the block boundaries
    n_classes   K, the size of the label alphabet
    uniform     n·log₂K, the code without learning
    n_fire      firing (defect-labelled) rows in the dataset
    final_loss  float64[O, S-1]: each block model's training loss, mean of its last max(1, steps // 10) steps
    loss        float64[O, S-1, steps]: each block model's training loss per step
    finite      every block model's loss, gradients and parameters stayed finite
    """

    value: float
    per_order: np.ndarray
    blocks: np.ndarray
    ends: tuple[int, ...]
    n_classes: int
    uniform: float
    n_fire: int
    final_loss: np.ndarray
    loss: np.ndarray
    finite: bool


def prequential_on(
    cfg: Config,
    data: Batch,
    seed: int,
    ends: Sequence[int] | None = None,
    steps: int | None = None,
    orders: int = 3,
    label: str = "answer",
    renormalise: bool = True,
    member_batch: int | None = None,
) -> Prequential:
    """The prequential code of the labels of a given dataset `data` (Batch [n, T]) of `cfg.task`.

    Data orders come from `data_orders(seed, n, orders)`, block models' keys from `seed`.
    `ends` default `block_ends(n)`; `steps` default ``cfg.train.steps``; `member_batch`: train
    that many block models at a time (`lax.map`) instead of all at once (speed only)."""
    n = int(data.tokens.shape[0])
    ends = block_ends(n) if ends is None else _check_ends(ends, n)
    steps = cfg.train.steps if steps is None else int(steps)
    if steps < 1 or orders < 1:
        raise ValueError(f"steps and orders must be >= 1, got steps={steps}, orders={orders}")
    alphabet = label_alphabet(cfg.task, label)
    lay = layout(cfg.task)
    position = lay.answer if label == "answer" else lay.decision
    if not np.isin(np.asarray(data.tokens[:, position]), alphabet).all():
        raise ValueError(f"a label at position {position} lies outside the alphabet {alphabet.tolist()}: is `data` a dataset of this task?")
    S = len(ends)
    order = np.repeat(np.arange(orders), S - 1).astype(np.int32)
    block = np.tile(np.arange(S - 1), orders).astype(np.int32)
    lo = np.tile(np.array(ends[:-1]), orders).astype(np.int32)
    hi = np.tile(np.array(ends[1:]), orders).astype(np.int32)
    span = int(np.diff(ends).max())
    hp = HParams(*(jnp.float32(v) for v in cfg.hparams))
    key = jax.random.fold_in(_base_key(seed), 2)
    bits, loss, finite = _fit_and_code(
        _static_cfg(cfg, steps),
        data,
        data_orders(seed, n, orders),
        jnp.asarray(order),
        jnp.asarray(block),
        jnp.asarray(lo),
        jnp.asarray(hi),
        key,
        hp,
        steps,
        span,
        position,
        tuple(alphabet.tolist()) if renormalise else None,
        member_batch,
    )
    bits = np.asarray(bits, np.float64).reshape(orders, S - 1)
    loss = np.asarray(loss, np.float64).reshape(orders, S - 1, steps)
    K = len(alphabet)
    codes = [online_code(ends, lambda s, o=o: bits[o, s], K) for o in range(orders)]
    per_order = np.array([c.total for c in codes])
    return Prequential(
        value=float(per_order.mean()),
        per_order=per_order,
        blocks=np.stack([c.blocks for c in codes]),
        ends=ends,
        n_classes=K,
        uniform=n * math.log2(K),
        n_fire=int(np.asarray(data.triggered).sum()),
        final_loss=loss[:, :, -max(1, steps // 10) :].mean(-1),
        loss=loss,
        finite=bool(np.asarray(finite).all()),
    )


def prequential(
    cfg: Config,
    seed: int,
    n: int = 4096,
    ends: Sequence[int] | None = None,
    steps: int | None = None,
    orders: int = 3,
    label: str = "answer",
    renormalise: bool = True,
    member_batch: int | None = None,
) -> Prequential:
    """The prequential code of the labels of `dataset(cfg, seed, n)` under cfg's transformer,
    averaged over `orders` data orders. Defaults: n = 4096, `block_ends(n)` (Voita–Titov),
    3 orders, ``cfg.train.steps`` steps per block model. See `prequential_on`."""
    return prequential_on(cfg, dataset(cfg, seed, n), seed, ends, steps, orders, label, renormalise, member_batch)


class Delta(NamedTuple):
    """ΔL = behaviour.value − control.value (bits), and both codes."""

    value: float
    behaviour: Prequential
    control: Prequential


def delta(cfg: Config, seed: int, n: int = 4096, control: Config | None = None, **kw) -> Delta:
    """ΔL of cfg's behaviour over its matched control (default: `control_task` of cfg.task, same
    everything else, so the same number of firing rows). `kw` as for `prequential`."""
    control = cfg.replace(task=control_task(cfg.task)) if control is None else control
    b, c = prequential(cfg, seed, n, **kw), prequential(control, seed, n, **kw)
    if b.n_fire != c.n_fire:
        raise ValueError(f"behaviour and control have {b.n_fire} and {c.n_fire} firing rows; give them the same trigger_rate")
    return Delta(b.value - c.value, b, c)
