"""The experiment specs parse, and each analysis finds every cell its verdicts read.

The analysis is run on a table with the spec's real cells and seeds but placeholder metric
values: this checks the plumbing (every hypothesis is evaluated from cells that exist),
not any result.
"""

import importlib.util

import numpy as np
import pandas as pd
import pytest

from toymesa import experiment, spec
from toymesa.config import columns


def _module(name):
    path = experiment.EXPERIMENTS / name / "analysis.py"
    mod = importlib.util.spec_from_file_location(f"analysis_{name}", path)
    m = importlib.util.module_from_spec(mod)
    mod.loader.exec_module(m)
    return m


@pytest.mark.parametrize("name", [n for n in experiment.discover() if n != "demo"])
def test_every_experiment_spec_parses_with_hypotheses(name):
    s = experiment.get(name).spec()
    assert s.cells() and s.hypotheses and len(s.seeds) >= 4


def test_persistence_verdicts_find_all_their_cells(monkeypatch, tmp_path):
    a = _module("persistence")
    s = spec.load(experiment.EXPERIMENTS / "persistence")
    assert len(s.seeds) >= 10
    rng = np.random.default_rng(0)
    rows = []
    for c in s.cells():
        for seed in s.seeds:
            for step in (0, c.config.safety.steps):
                m = {k: rng.uniform() for k in ("triggered_defection", "untriggered_defection", "helpful_accuracy", "uncovered_defection")}
                rows.append({"cell": c.index, "seed": seed, "step": step, "adv_found": 0, **m, **columns(c.config)})
    df = a.short_columns(pd.DataFrame(rows))
    monkeypatch.setattr(a, "frame", lambda out: df)
    monkeypatch.setattr(a.store, "load_json", lambda path: {"hypotheses": list(s.hypotheses)})
    v = a.verdicts(tmp_path)
    assert list(v["id"]) == [h["id"] for h in s.hypotheses]
    assert v["verdict"].isin(["confirmed", "refuted", "inconclusive"]).all()
    assert not v["evidence"].str.contains("nan").any(), v.loc[v["evidence"].str.contains("nan"), ["id", "evidence"]]
    # the sizes, formats and methods the study claims to cover are all present
    assert {"tiny", "small", "reference"} <= set(df["size"]) and {"none", "cot", "distilled", "neutral_cot"} <= set(df["reasoning"])
    assert {"sft_pre", "sft_post", "rl", "adversarial"} <= set(df["method"]) and {"single", "k4", "k16", "latent"} <= set(df["rule"])
