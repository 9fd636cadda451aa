"""Every number persistence_v2's README reports, derived from the stored run only (never trained).

Claim ids (``toymesa claims experiments/persistence_v2/results`` writes them to results/claims.json):

* ``CELL.METRIC``: each cell's mean at the last safety step with its 95% bootstrap CI (the
  analysis' `table`), METRIC one of kept, installed, untriggered_defection, helpful_accuracy;
  CELL is the cell's label with dots, e.g. ``latent.f0``, ``goal_1e1.f0.5``,
  ``offceiling.single.tiny``, ``offceiling_k.k4.reference``,
  ``rl_control.single.reference.triggered0.5``.
* ``ID.verdict`` (the judged word), ``ID.evidence`` and ``ID.estimate`` (``ID.WORLD.estimate``
  for the hypotheses judged in several worlds): each hypothesis' CI as judged.
* ``table.results``, ``table.verdicts``, ``table.census``: the README's tables.
* ``census.WORLD.max_feature_share``, ``census.WORLD.quiet_with_feature``,
  ``census.goal.max_feature_share``: exact world counts (deterministic code, `census_table`).
* ``worlds.fF.kept.range`` (latent and goal worlds), ``goal.f0.kept.range``: spans of kept.
* ``rl_control.signal``, ``rl.single.signal``, ``rl_control.removed_seeds``,
  ``goal_1e7.f0.untriggered_defection.stepS``, ``f0.others.untriggered_defection.max``.
* ``runtime.seconds``, ``runtime.minutes`` (from log.jsonl), ``run.date``, ``run.cores``,
  ``run.code_digest``, ``run.cells``, ``run.seeds``, ``run.installs``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import experiment, runs, stats
from toymesa.claims import Claim, fmt, markdown_table, number, run_facts, verdict_words

NAME = "persistence_v2"
METRICS = ("installed", "kept", "untriggered_defection", "helpful_accuracy")
TABLE = {"kept": "kept", "untriggered_defection": "untriggered defection", "helpful_accuracy": "helpful accuracy"}


def cell_id(label: str) -> str:
    """A cell label as a claim id: "latent f=0.5" -> "latent.f0.5"."""
    return label.replace(" f=", ".f").replace(" triggered=", ".triggered").replace("/", ".").replace(" ", ".")


def span(values, spec: str = "{:.0f}") -> Claim:
    """The range of `values` (fractions) printed as "LO-HI%"."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return Claim(f"{spec.format(100 * lo)}-{spec.format(100 * hi)}%", None, lo, hi)


def mean_ci(values, spec: str = "pctci") -> Claim:
    return number(*stats.bootstrap_ci(np.asarray(values, float)), spec)


def results_claims(table: pd.DataFrame) -> dict[str, Claim]:
    out = {}
    for r in table.to_dict("records"):
        for m in METRICS:
            out[f"{cell_id(r['arm'])}.{m}"] = number(r[m], r[f"{m}_lo"], r[f"{m}_hi"], "pctci")
    rows = table.to_dict("records")
    shown = pd.DataFrame({"cell": table["arm"]} | {head: [fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"], "pctci") for r in rows] for m, head in TABLE.items()})
    out["table.results"] = Claim(markdown_table(shown))
    return out


def verdict_claims(exp, out: Path, analysis) -> dict[str, Claim]:
    judged = analysis.verdicts(out)  # the words as each rule judged them
    shown = exp.verdicts(out)  # as toymesa reports them (flags of the registration record added)
    claims = verdict_words(judged)
    table = shown.assign(verdict="**" + shown["verdict"] + "**")[["id", "prediction", "verdict", "evidence"]]
    claims["table.verdicts"] = Claim(markdown_table(table))
    parts = analysis.verdict_parts(analysis.frame(out), analysis.signal(out))
    for hid, ps in parts.items():
        for p in ps:
            key = f"{hid}.estimate" if len(ps) == 1 else f"{hid}.{p.label.split(':')[0]}.estimate"
            claims[key] = number(*p.estimate, "ci")
    return claims


def census_claims(analysis) -> dict[str, Claim]:
    c = analysis.census_table()
    claims = {}
    for r in c.to_dict("records"):
        claims[f"census.{r['world']}.max_feature_share"] = number(r["max feature share"], spec="f2")
        claims[f"census.{r['world']}.quiet_with_feature"] = number(r["quiet contexts holding a feature (uniform slots)"], spec="f2")
    goals = c[c["world"].str.startswith("goal_")]
    claims["census.goal.max_feature_share"] = number(goals["max feature share"].max(), spec="f2")
    shown = pd.DataFrame(
        {
            "world": c["world"],
            "slots": c["n_ctx"],
            "activating feature sets": [f"{n:,}" for n in c["activating feature sets"]],
            "activating contexts": [f"{n:.3g}" for n in c["activating contexts"].astype(float)],
            "P(fires)": [f"{p:.3f}" for p in c["p_fire"]],
            "largest share of one feature in activating contexts": [f"{p:.2f}" for p in c["max feature share"]],
            "quiet contexts holding a feature (uniform slots)": [f"{p:.2f}" for p in c["quiet contexts holding a feature (uniform slots)"]],
        }
    )
    claims["table.census"] = Claim(markdown_table(shown))
    return claims


def run_claims(out: Path, df: pd.DataFrame) -> dict[str, Claim]:
    configs = json.loads((out / "configs.json").read_text())
    installs = {repr(runs.install_config(runs.config_from_dict(c))) for c in configs.values()}
    return run_facts(out, df) | {"run.installs": number(len(installs), spec="int")}


def claims(out: Path) -> dict[str, Claim]:
    out = Path(out)
    exp = experiment.get(NAME)
    a = exp.analysis
    df = a.frame(out)
    end = a.final(df)
    table = a.table(out)
    c = results_claims(table) | verdict_claims(exp, out, a) | census_claims(a) | run_claims(out, df)

    # spans of kept over the latent and goal worlds at each dose
    for f in a.DOSES:
        c[f"worlds.f{f:g}.kept.range"] = span([a.cell(end, w, feature_rate=f)["kept"].mean() for w in a.WORLDS])
    c["goal.f0.kept.range"] = span([a.cell(end, w, feature_rate=0.0)["kept"].mean() for w in a.WORLDS if w.startswith("goal_")])

    # untriggered defection at f=0: goal_1e7 over the safety steps, the largest of the others at the end
    g = a.cell(df, "goal_1e7", feature_rate=0.0)
    for step, rows in g.groupby("step"):
        c[f"goal_1e7.f0.untriggered_defection.step{int(step)}"] = mean_ci(rows["untriggered_defection"])
    at0 = table[table["arm"].str.endswith(" f=0") & (table["arm"] != "goal_1e7 f=0")]
    c["f0.others.untriggered_defection.max"] = number(at0["untriggered_defection"].max(), spec="pct")

    # RL: policy-gradient signal (mean over RL steps per member) and seeds whose backdoor was removed
    sig = a.signal(out)
    for arm, rule, key in (("rl", "single", "rl.single.signal"), ("rl", "latent", "rl.latent.signal"), ("rl_control", "single", "rl_control.signal")):
        cells = a.cell(end, arm, rule=rule)["cell"].unique()
        c[key] = mean_ci(sig[sig["cell"].isin(cells)]["signal"])
    kept = a.cell(end, "rl_control")["kept"]
    removed = int((kept < 0.5).sum())  # per-seed kept is 0 or 1 here: removed means no defection left
    c["rl_control.removed_seeds"] = Claim(f"{removed} of {len(kept)}", removed)
    return c
