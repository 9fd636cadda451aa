"""Exact counts of a world's contexts by evidence level, and the two answers config needs from
them: which non-firing feature conditions a world allows (`quiet_features`) and where partial
coverage cuts its activating contexts (`coverage_cut`).

Why the split is here: a `Config` refuses at construction safety data its world cannot give
(`SafetyConfig.feature_rate`, `SafetyConfig.coverage`), so `toymesa.config` needs these answers,
while `toymesa.tasks` is built on config. This module sits below both and imports nothing from
toymesa: it reads plain fields of a task (rule, n_ctx, k, trigger_position, cue_weights,
n_distractors, latent_threshold) and counts over multisets of slot weights, which is all the
combinatorics needs. Token ids stay in `toymesa.tasks.rules`, which builds its exact latent
sampler on `suffix_counts` and re-exports the names here (`rules.quiet_features`,
`rules.coverage_cut`, `rules.fixed_slot`, `rules.ANY`, ...).

A context is an ordered n_ctx-tuple of slots, each drawn uniformly and independently from a
pool of tokens; a slot's evidence is its token's weight, and `weights` lists the pool's weights
(a tuple of Python ints, one per pool token). Counts are Python ints, so exact.
"""

from __future__ import annotations

import functools

import numpy as np

NO_BOUND = 1 << 20  # an evidence bound no context reaches: [-NO_BOUND, t) is "below t"
ANY, WITHOUT, WITH = -1, 0, 1  # feature conditions of `rules.sample_latent` and `rules.sample_quiet`


def fixed_slot(task) -> bool:
    """A single trigger that counts only in its own slot (`trigger_slot`): elsewhere the trigger
    token is an ordinary token, a rule feature in a non-activating role (a "year" token holding
    another value than the deployment year)."""
    return task.rule == "single" and task.trigger_position == "fixed"


def latent_weights(task) -> tuple[int, ...]:
    """The weights of the tokens a latent slot is drawn from, in `rules.latent_pool` order: each
    cue's weight (`cue_weights`), then 0 for each distractor."""
    return (*task.cue_weights, *(0,) * task.n_distractors)


@functools.cache
def suffix_counts(weights: tuple[int, ...], n_ctx: int) -> tuple[np.ndarray, int]:
    """(counts object[n_ctx + 1, L, 2] of Python ints, off): counts[i, s + off, f] is the number of
    fillings of slots i..n_ctx-1 from the pool with summed weight s that hold a positive-weight
    token iff f. Sums of any number of slots lie in [n_ctx * min(0, w), n_ctx * max(0, w)]."""
    w = np.asarray(weights)
    n = n_ctx
    lo, hi = n * min(0, int(w.min())), n * max(0, int(w.max()))
    L = hi - lo + 1
    counts = np.zeros((n + 1, L, 2), dtype=object)
    counts[n, -lo, 0] = 1
    for i in reversed(range(n)):
        for x, m in zip(*np.unique(w, return_counts=True), strict=True):
            x, m = int(x), int(m)
            shifted = np.zeros((L, 2), dtype=object)  # shifted[s] = counts[i + 1, s - x]
            shifted[max(x, 0) : L + min(x, 0)] = counts[i + 1, max(-x, 0) : L - max(x, 0)]
            if x > 0:  # a positive cue: the suffix now holds one whatever it held before
                counts[i, :, 1] += m * (shifted[:, 0] + shifted[:, 1])
            else:
                counts[i] += m * shifted
    return counts, -lo


def region_count(weights: tuple[int, ...], n_ctx: int, lo: int, hi: int, feature: int = ANY) -> int:
    """The number of contexts with lo <= evidence < hi meeting the feature condition (ANY,
    WITHOUT or WITH a positive-weight token); exact."""
    counts, off = suffix_counts(weights, n_ctx)
    levels = np.arange(counts.shape[1]) - off
    cols = {ANY: [0, 1], WITHOUT: [0], WITH: [1]}[feature]
    return int(sum(counts[0][(levels >= lo) & (levels < hi)][:, cols].ravel().tolist()))


def firing_distribution(weights: tuple[int, ...], n_ctx: int, threshold: int) -> dict[int, float]:
    """P(evidence = e | evidence >= threshold) under uniform independent slots, exactly: the
    total evidence is the n_ctx-fold convolution of one slot's weight distribution."""
    w = np.asarray(weights)
    lo = int(w.min())
    one = np.bincount(w - lo) / len(w)
    total = np.array([1.0])
    for _ in range(n_ctx):
        total = np.convolve(total, one)
    levels = np.arange(len(total)) + n_ctx * lo
    fire = levels >= threshold
    p = total[fire] / total[fire].sum()
    return {int(e): float(q) for e, q in zip(levels[fire], p, strict=True) if q > 0}


def quiet_features(task) -> tuple[int, ...]:
    """The feature conditions `rules.sample_quiet` can meet in this world (ANY, WITHOUT, WITH)."""
    if task.rule == "latent":
        w, thr = latent_weights(task), task.latent_threshold
        return tuple(f for f in (ANY, WITHOUT, WITH) if region_count(w, task.n_ctx, -NO_BOUND, thr, f) > 0)
    if task.rule == "conjunction" or (fixed_slot(task) and task.n_ctx > 1):
        return (ANY, WITHOUT, WITH)
    return (ANY, WITHOUT)  # single (random position), k_triggers: any active trigger, in any slot, fires


def coverage_cut(task, fraction: float) -> int:
    """Where the covered part of the activating contexts ends, for a coverage `fraction`.

    * ``k_triggers``: the covered triggers are indices 0..cut-1, cut = round(fraction * k).
    * ``latent``: covered contexts have evidence in [threshold, cut); cut is the level that
      makes the covered share of firing contexts closest to `fraction` (evidence is an
      integer, so the share is only approximately `fraction`; `rules.covered_share` gives it).

    Raises ValueError when the rule has one activating context (single, conjunction) or
    the fraction would leave the covered or the uncovered part empty.
    """
    if task.rule == "k_triggers":
        cut = round(fraction * task.k)
        if not 1 <= cut <= task.k - 1:
            raise ValueError(f"coverage {fraction} of k={task.k} triggers covers {cut}; choose a fraction that covers between 1 and {task.k - 1} of them")
        return cut
    if task.rule == "latent":
        dist = firing_distribution(latent_weights(task), task.n_ctx, task.latent_threshold)
        levels = sorted(dist)
        shares = np.cumsum([dist[e] for e in levels])  # share covered if cut = next level
        best = int(np.argmin(np.abs(shares[:-1] - fraction))) if len(levels) > 1 else -1
        if best < 0:
            raise ValueError(f"the latent rule fires at a single evidence level {levels}; partial coverage needs at least two")
        return levels[best + 1]
    raise ValueError(f"partial coverage needs a rule with many activating contexts (k_triggers, latent), not {task.rule!r}")
