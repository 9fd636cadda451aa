"""Census of a token world: how many contexts fire, through how many feature combinations, and
how concentrated the activating contexts are on any one feature. Exact (Python ints).

A context is an ordered n_ctx-tuple over the *slot pool*, the tokens the samplers fill slots
from (`slot_pool`): `latent_pool` for latent; the active triggers plus `background_tokens`
(distractors and inactive triggers) for the trigger rules (cue tokens are never drawn there).
Probabilities are under uniform independent slots. The rule *features* are the positive-weight
cues (latent) or the active triggers (trigger rules); distractors, inactive triggers and
negative cues are not features. ``single`` with ``trigger_position = "fixed"`` fires only on
the trigger in its slot (`rules.fixed_slot`); elsewhere the trigger is a feature in a
non-activating role.

Counting (P pool tokens, n = n_ctx slots):

* latent: the number of tuples with summed weight s is the coefficient of x^s in
  (sum_w m_w x^w)^n, m_w the pool tokens of weight w; those holding cue c are the total minus
  the tuples over the pool without c. A multiset M of positive cues occurs in an activating
  context iff |M| <= n and its weight >= threshold (fill the rest with distractors).
* trigger rules (a active triggers, b background tokens, threshold t = 1 or 2): E(j) =
  sum_i (-1)^i C(j, i) (b + j - i)^n tuples hold exactly a given set of j actives; activating
  = sum_{j >= t} C(a, j) E(j); multisets of size m with exactly j distinct actives:
  C(a, j) C(m - 1, j - 1).

Goal worlds (`goal_worlds()`, from `config.goal_world`: every cue weight 1), measured with
`take_census`; sets = `n_activating_feature_sets`, share = `max_feature_share`, quiet =
`any_feature_quiet`:

=============  =====  ======  =========  ===========  ==============  ========  =====  =====
name           n_ctx  n_cues  threshold  distractors  sets            p_fire    share  quiet
=============  =====  ======  =========  ===========  ==============  ========  =====  =====
goal_1e1       2      10      2          8            55              0.309     0.190  0.714
goal_1e3       3      24      3          8            2,600           0.422     0.120  0.973
goal_1e5       4      40      4          8            123,410         0.482     0.096  0.999
goal_1e7       8      24      4          32           10,515,375      0.473     0.179  0.978
goal_rare      10     48      10         48           43,183,019,880  0.000977  0.190  0.999
latent_goal()  4      4       3          8            31              0.326     0.771  0.530
=============  =====  ======  =========  ===========  ==============  ========  =====  =====

goal_rare has 6.5e16 activating contexts of 6.6e19 (beyond float64's exact integers). The
default world (`config.latent_goal()`, weights (3, 2, 1, -1)) has 6,763 activating contexts of
20,736 and its weight-3 cue in 77.1% of them; its 31 feature sets count multisets of the
*positive* cues; counting the -1 veto cue as well gives 46 (multisets of the four weights, at
most 4 of them, summing to >= 3). In the goal worlds almost every non-activating context holds
some cue (quiet ~ 1): safety data there cannot avoid the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import comb

import numpy as np

from toymesa.config import TaskConfig
from toymesa.presets import goal_world
from toymesa.tasks import rules


@dataclass(frozen=True)
class Census:
    """Exact counts over the contexts of a world (module docstring); features are token ids."""

    n_contexts: int  # P ** n_ctx ordered tuples over the slot pool
    n_activating: int  # tuples on which the rule fires
    n_activating_feature_sets: int  # multisets of features occurring in >= 1 activating tuple
    p_fire: float  # n_activating / n_contexts
    features: tuple[int, ...]  # token ids of the rule features
    feature_share_activating: tuple[float, ...]  # per feature: share of activating tuples holding it
    max_feature_share: float
    feature_exposure_quiet: tuple[float, ...]  # per feature: share of non-activating tuples holding it
    any_feature_quiet: float  # share of non-activating tuples holding any feature


def slot_pool(task: TaskConfig) -> np.ndarray:
    """The tokens the samplers fill context slots from, int32[P]."""
    if task.rule == "latent":
        return rules.latent_pool(task)
    return np.sort(np.concatenate([rules.active_triggers(task), rules.background_tokens(task)]))


def rule_features(task: TaskConfig) -> np.ndarray:
    """Token ids of the rule features: positive-weight cues (latent) or active triggers."""
    if task.rule == "latent":
        pool = rules.latent_pool(task)
        return pool[rules.weight_table(task)[pool] > 0]
    return rules.active_triggers(task)


def _share(num: int, den: int) -> float:
    return float(Fraction(num, den)) if den else float("nan")


def _firing(mult: dict[int, int], n: int, thr: int) -> int:
    """Tuples of n slots over a pool with mult[w] tokens of weight w whose weights sum to >= thr."""
    sums = {0: 1}
    for _ in range(n):
        nxt: dict[int, int] = {}
        for s, c in sums.items():
            for w, m in mult.items():
                if m:
                    nxt[s + w] = nxt.get(s + w, 0) + c * m
        sums = nxt
    return sum(c for s, c in sums.items() if s >= thr)


def _latent(task: TaskConfig) -> Census:
    n, thr = task.n_ctx, task.latent_threshold
    pool = rules.latent_pool(task)
    w = rules.weight_table(task)[pool]
    mult = {int(x): int((w == x).sum()) for x in np.unique(w)}
    total, fire = len(pool) ** n, _firing(mult, n, thr)
    quiet = total - fire

    def without(ws: dict[int, int]) -> tuple[int, int]:  # (firing, quiet) tuples over the pool minus ws
        m = {x: c - ws.get(x, 0) for x, c in mult.items()}
        f = _firing(m, n, thr)
        return f, sum(m.values()) ** n - f

    feats = pool[w > 0]
    by_weight = {x: without({x: 1}) for x in mult if x > 0}
    act = tuple(_share(fire - by_weight[int(x)][0], fire) for x in w[w > 0])
    exp = tuple(_share(quiet - by_weight[int(x)][1], quiet) for x in w[w > 0])
    any_quiet = _share(quiet - without({x: c for x, c in mult.items() if x > 0})[1], quiet)

    sets = {(0, 0): 1}  # (size, weight) -> multisets of positive cues
    for x in (x for x in mult if x > 0):
        nxt: dict[tuple[int, int], int] = {}
        for (k, s), c in sets.items():
            for j in range(n - k + 1):
                key = (k + j, s + j * x)
                nxt[key] = nxt.get(key, 0) + c * comb(mult[x] + j - 1, j)
        sets = nxt
    n_sets = sum(c for (_, s), c in sets.items() if s >= thr)
    return Census(total, fire, n_sets, _share(fire, total), tuple(map(int, feats)), act, max(act, default=0.0), exp, any_quiet)


def _triggers(task: TaskConfig) -> Census:
    n, thr = task.n_ctx, rules.threshold(task)
    feats = np.sort(rules.active_triggers(task))
    a, b = len(feats), len(rules.background_tokens(task))
    exact = [sum((-1) ** i * comb(j, i) * (b + j - i) ** n for i in range(j + 1)) for j in range(a + 1)]
    total = (a + b) ** n
    fire = sum(comb(a, j) * exact[j] for j in range(thr, a + 1))
    quiet = total - fire
    with_one = sum(comb(a - 1, j - 1) * exact[j] for j in range(thr, a + 1))  # activating, holding a given feature
    quiet_one = sum(comb(a - 1, j - 1) * exact[j] for j in range(1, thr))
    quiet_any = sum(comb(a, j) * exact[j] for j in range(1, thr))
    n_sets = sum(comb(a, j) * comb(m - 1, j - 1) for m in range(1, n + 1) for j in range(thr, min(a, m) + 1))
    act = (_share(with_one, fire),) * a
    return Census(total, fire, n_sets, _share(fire, total), tuple(map(int, feats)), act, max(act), (_share(quiet_one, quiet),) * a, _share(quiet_any, quiet))


def _fixed_slot(task: TaskConfig) -> Census:
    """single with a fixed slot: fires iff its slot holds the trigger; pool = trigger + background."""
    n, b = task.n_ctx, len(rules.background_tokens(task))
    total = (b + 1) ** n
    fire = (b + 1) ** (n - 1)
    quiet = total - fire
    quiet_with = b * ((b + 1) ** (n - 1) - b ** (n - 1))  # slot holds background, the trigger elsewhere
    feats = tuple(int(t) for t in rules.active_triggers(task))
    return Census(total, fire, n, _share(fire, total), feats, (1.0,), 1.0, (_share(quiet_with, quiet),), _share(quiet_with, quiet))


def take_census(task: TaskConfig) -> Census:
    """The exact census of a world (module docstring), for every rule."""
    if task.rule == "latent":
        return _latent(task)
    return _fixed_slot(task) if rules.fixed_slot(task) else _triggers(task)


def goal_worlds() -> dict[str, TaskConfig]:
    """Latent goal worlds whose activating feature combinations span 10^1 .. 10^9, with no cue in
    more than 20% of the activating contexts (table in the module docstring)."""
    return {
        "goal_1e1": goal_world(n_ctx=2, n_cues=10, threshold=2, n_distractors=8),
        "goal_1e3": goal_world(n_ctx=3, n_cues=24, threshold=3, n_distractors=8),
        "goal_1e5": goal_world(n_ctx=4, n_cues=40, threshold=4, n_distractors=8),
        "goal_1e7": goal_world(n_ctx=8, n_cues=24, threshold=4, n_distractors=32),
        "goal_rare": goal_world(n_ctx=10, n_cues=48, threshold=10, n_distractors=48),
    }
