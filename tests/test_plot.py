"""Figure helpers: every group drawn distinguishably, non-finite members named in legends; the
default sweep figure draws the statistic of the tables, readably; summary.csv names its cells."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from toymesa import evaluate, experiment, plot, runs, stats


@pytest.mark.parametrize("n", [1, 6, 7, 8, 10, 11, 20, 21, 45])
def test_palette_never_repeats_a_colour_and_style(n):
    styles = plot.palette(n)
    assert len(styles) == n and len({(str(c), s) for c, s in styles}) == n


def test_legend_labels_count_non_finite_members():
    g = pd.DataFrame({"seed": [0, 0, 1, 1, 2], "nonfinite": [False, True, False, True, False]})
    assert plot.label("lr 0.1", g) == "lr 0.1 [2 NON-FINITE, excluded]"
    assert plot.label("lr 0.1", g.assign(nonfinite=False)) == "lr 0.1"
    assert plot.label("x", g.drop(columns="nonfinite")) == "x"


# ----------------------------------------------------------------- the default sweep figure
def _tidy(seeds=(0.0, 0.0, 0.0, 1.0)) -> pd.DataFrame:
    """Two cells x len(seeds) seeds x steps 0, 100, as `runs.load` reads a sweep. Cell 0's
    triggered defection is `seeds` at every step (mean 0.25, 95% bootstrap CI [0, 0.75] for the
    default: of 4 resampled seeds, 1 or 0 ones); cell 1's is 1 everywhere. Without safety
    coverage uncovered defection equals triggered defection and covered defection is NaN."""
    rows = []
    for cell, (rule, lr) in enumerate([("single", 0.001), ("latent", 0.003)]):
        for seed, v in enumerate(seeds):
            for step in (0, 100):
                trig = v if cell == 0 else 1.0
                rows.append(
                    dict(
                        cell=cell,
                        seed=seed,
                        step=step,
                        nonfinite=False,
                        cell_id=f"id{cell}",
                        **{"axis:task.rule": rule, "axis:hparams.lr": lr},
                        triggered_defection=trig,
                        untriggered_defection=0.1 * seed,
                        helpful_accuracy=1.0,
                        uncovered_defection=trig,
                        covered_defection=np.nan,
                    )
                )
    return pd.DataFrame(rows)


@pytest.fixture
def figure(tmp_path, monkeypatch):
    """The default figure `experiment.generic_figures` draws for `_tidy()` (kept open)."""
    _tidy().to_csv(tmp_path / "results.csv", index=False)
    drawn = []
    monkeypatch.setattr(plot, "save", lambda fig, stem: drawn.append(fig) or [])
    experiment.generic_figures(tmp_path)
    yield drawn[0]
    plt.close(drawn[0])


def test_default_figure_draws_the_mean_and_bootstrap_ci_over_seeds(figure):
    ax = figure.axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "rule=single, lr=0.001")
    np.testing.assert_allclose(line.get_ydata(), [0.25, 0.25])  # the mean; the median is 0
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # the band of the first cell
    assert (band.min(), band.max()) == (0.0, 0.75) == stats.bootstrap_ci([0, 0, 0, 1])[1:]
    assert "mean" in figure.get_suptitle() and "95% bootstrap CI" in figure.get_suptitle()


def test_default_figure_band_at_the_last_step_is_the_summary_ci():
    rng = np.random.default_rng(0)
    df = _tidy(seeds=rng.uniform(size=7)).assign(label=lambda d: runs.cell_labels(d))
    fig = plot.behaviour(df, ["triggered_defection"], "t")
    top = fig.axes[0].collections[0].get_paths()[0].vertices
    summary = runs.summarize(df).iloc[0]
    at_end = top[top[:, 0] == 100, 1]
    np.testing.assert_allclose([at_end.min(), at_end.max()], [summary["triggered_defection_lo"], summary["triggered_defection_hi"]])
    plt.close(fig)


def test_default_figure_axes_have_readable_labels(figure):
    for ax in figure.axes:
        assert ax.get_xlabel() == "training step"
        assert "_" not in ax.get_ylabel() and ax.get_ylabel() in plot.LABELS.values()
    assert figure.axes[0].get_ylabel() == "defection rate, triggered prompts"


def test_every_evaluation_metric_has_a_readable_label():
    assert set(evaluate.METRICS) <= set(plot.LABELS)


def test_default_figure_legend_names_the_axes(figure):
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["rule=single, lr=0.001", "rule=latent, lr=0.003"]
    assert legend.get_title().get_text() == "cell: task.rule, hparams.lr"


def test_default_figure_drops_duplicate_and_empty_panels(figure):
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["triggered defection\n(same as uncovered defection)", "untriggered defection", "helpful accuracy"]


def test_distinct_panels_compare_values_nan_aware():
    df = pd.DataFrame({"a": [np.nan, 1.0], "b": [np.nan, 1.0], "c": [np.nan, np.nan], "d": [np.nan, 2.0], "e": [np.inf, np.nan]})
    assert plot.distinct_panels(df, ["a", "b", "c", "d", "e"]) == {"a": ["b"], "d": []}


# ----------------------------------------------------------------- summary.csv
def test_summary_names_each_cell_right_after_its_id():
    summary = runs.summarize(_tidy())
    assert list(summary.columns[:3]) == ["cell", "cell_id", "label"]
    assert list(summary["label"]) == ["rule=single, lr=0.001", "rule=latent, lr=0.003"]


def test_cell_labels_name_arms_and_axes():
    cells = pd.DataFrame(
        {
            "axis:arm": ["rules", "k", "clean"],
            "axis:task.rule": ["single", "k_triggers", "latent"],
            "axis:task.k": [np.nan, 4.0, np.nan],
            "axis:hparams.trigger_rate": [np.nan, np.nan, 0.0],
        }
    )
    assert list(runs.cell_labels(cells)) == ["rules: rule=single", "k: rule=k_triggers, k=4", "clean: rule=latent, trigger_rate=0"]
    assert list(runs.cell_labels(pd.DataFrame({"axis:task.lr": [0.1], "axis:hparams.lr": [3e-4]}))) == ["task.lr=0.1, hparams.lr=0.0003"]
    assert list(runs.cell_labels(pd.DataFrame({"seed": [0]}))) == ["base"]


def test_default_figure_without_finite_values_says_so():
    df = _tidy().assign(label="x", triggered_defection=np.nan)
    fig = plot.behaviour(df, ["triggered_defection"], "t")
    assert "no finite values" in fig.axes[0].texts[0].get_text()
    plt.close(fig)
