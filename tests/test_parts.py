"""`toymesa.parts`: the CIs hypotheses are judged on, from per-seed values (known answers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from toymesa import parts, stats


def cell(values, seeds=None, nonfinite=None):
    seeds = list(range(len(values))) if seeds is None else seeds
    df = pd.DataFrame({"seed": seeds, "m": values})
    return df if nonfinite is None else df.assign(nonfinite=nonfinite)


def test_level_is_the_bootstrap_ci_shifted_by_minus():
    values = [0.1, 0.4, 0.9, 0.6]
    p = parts.level("x", cell(values), "m", minus=0.5)
    mean, lo, hi = stats.bootstrap_ci(values)
    assert p.estimate == pytest.approx((mean - 0.5, lo - 0.5, hi - 0.5))
    assert p.arms[0].values.tolist() == values


def test_paired_difference_matches_seeds_whatever_the_row_order():
    a = cell([1.0, 0.0, 1.0, 1.0], seeds=[3, 1, 2, 0])
    b = cell([0.0, 0.0, 1.0, 0.0], seeds=[0, 1, 2, 3])
    p = parts.difference("a-b", a, b, "m", ("a", "b"), paired=True)
    # by seed: a = [1, 0, 1, 1], b = [0, 0, 1, 0]: differences [1, 0, 0, 1]
    assert p.estimate == pytest.approx(stats.difference_ci([1, 0, 1, 1], [0, 0, 1, 0], paired=True))
    with pytest.raises(ValueError, match="same seeds in both arms"):
        parts.difference("a-b", a, cell([0.0, 1.0], seeds=[0, 9]), "m", ("a", "b"), paired=True)


def test_a_seed_broken_in_either_arm_leaves_the_pair_and_is_counted():
    a = cell([1.0, 0.5, np.nan, 1.0], nonfinite=[False, False, True, False])
    b = cell([0.0, 0.5, 0.5, 0.0], nonfinite=[False, True, False, False])
    p = parts.difference("a-b", a, b, "m", ("a", "b"), paired=True)
    assert [arm.values.tolist() for arm in p.arms] == [[1.0, 1.0], [0.0, 0.0]]
    assert [arm.nonfinite for arm in p.arms] == [2, 2]
    unpaired = parts.difference("a-b", a, b, "m", ("a", "b"))
    assert [arm.nonfinite for arm in unpaired.arms] == [1, 1]
