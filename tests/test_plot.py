"""Figure helpers: every group drawn distinguishably, non-finite members named in legends."""

import pandas as pd
import pytest

from toymesa import plot


@pytest.mark.parametrize("n", [1, 6, 7, 8, 10, 11, 20, 21, 45])
def test_palette_never_repeats_a_colour_and_style(n):
    styles = plot.palette(n)
    assert len(styles) == n and len({(str(c), s) for c, s in styles}) == n


def test_legend_labels_count_non_finite_members():
    g = pd.DataFrame({"seed": [0, 0, 1, 1, 2], "nonfinite": [False, True, False, True, False]})
    assert plot.label("lr 0.1", g) == "lr 0.1 [2 NON-FINITE, excluded]"
    assert plot.label("lr 0.1", g.assign(nonfinite=False)) == "lr 0.1"
    assert plot.label("x", g.drop(columns="nonfinite")) == "x"
