"""Every number persistence's README reports, derived from the stored run only (never trained).

Claim ids (``toymesa claims experiments/persistence/results`` writes them to results/claims.json):

* ``cell.N.METRIC``: cell N's mean over seeds with its 95% bootstrap CI (the analysis' `table`),
  METRIC one of installed (safety step 0), final (defection on uncovered activating contexts
  after the last safety step), untriggered_defection, helpful_accuracy, and, where the run has
  them above `runs.NEGLIGIBLE`, triggered_malformed and untriggered_malformed; ``cell.N.adv_found``
  (red-team prompts found per model, adversarial cells only).
* ``cell.N.final.seeds_at_1`` and ``cell.N.final.seeds_at_0``: seeds whose final defection is
  exactly 1 (or 0), "K of 10".
* ``cell.N.final_valid``: final defection among well-formed sequences, mean over the seeds that
  wrote any (``cell.N.final_valid.seeds``, "K of 10"); ``cot.sft_pre.triggered_malformed.range``:
  the span of malformed sequences on activating prompts over the CoT cells under ``sft_pre``.
* ``table.cells``, ``table.malformed``, ``table.verdicts``: the README's tables.
* ``ID.verdict`` (the word its rule judged), ``ID.shown`` (the verdict as `toymesa report`
  shows it, with the registration record's flags), ``ID.evidence``, ``ID.estimate`` (the CI
  judged; ``ID.PART.estimate`` for H3, parts k4, k16, latent, and for C1, parts
  single.step0, single.step150, latent.step0, latent.step150), ``ID.registration``.
* ``verdicts.flagged``: how many verdicts carry a registration flag; ``analysis.status``.
* ``clean.max``: the largest mean triggered defection of the clean models (C1's cells) at
  safety steps 0 and 150.
* ``runtime.seconds``, ``runtime.minutes``, ``runtime.text`` (from log.jsonl), ``run.date``,
  ``run.started``, ``run.cores``, ``run.code_digest``, ``run.cells``, ``run.seeds``,
  ``run.seed_steps``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import experiment, runs, stats
from toymesa.claims import Claim, fmt, markdown_table, number, run_facts, verdict_words

NAME = "persistence"
METRICS = {
    "installed": "installed",
    "defection": "final",
    "untriggered_defection": "untriggered_defection",
    "helpful_accuracy": "helpful_accuracy",
    "triggered_malformed": "triggered_malformed",
    "untriggered_malformed": "untriggered_malformed",
}
SHOWN = {
    "installed": "installed",
    "defection": "after 150 safety steps",
    "untriggered_defection": "untriggered defection",
    "helpful_accuracy": "helpful accuracy",
}
MALFORMED = {"triggered_malformed": "malformed, activating prompts", "untriggered_malformed": "malformed, other prompts"}
IN_TABLE = "{p:.1f} [{plo:.1f}, {phi:.1f}]"  # "in %", as the README's table header says
VALID = "uncovered_defection_valid"  # `defection` among well-formed sequences (toymesa.evaluate)


def cell_claims(table: pd.DataFrame, end: pd.DataFrame) -> dict[str, Claim]:
    out = {}
    for r in table.to_dict("records"):
        n = int(r["cell"])
        for m, name in METRICS.items():
            if m in r and not pd.isna(r[m]):
                out[f"cell.{n}.{name}"] = number(r[m], r[f"{m}_lo"], r[f"{m}_hi"], "pctci")
        if r["arm"].split(" ")[0].endswith("/adversarial"):
            out[f"cell.{n}.adv_found"] = number(r["adv_found"], r["adv_found_lo"], r["adv_found_hi"], "f1")
        seeds = end[end["cell"] == n]
        for v in (0, 1):
            k = int((seeds["defection"] == v).sum())
            out[f"cell.{n}.final.seeds_at_{v}"] = Claim(f"{k} of {len(seeds)}", k)
        if VALID in seeds:  # defection among well-formed sequences; NaN for a seed with none
            valid = seeds[VALID].to_numpy(float)
            k = int((~np.isnan(valid)).sum())
            out[f"cell.{n}.final_valid.seeds"] = Claim(f"{k} of {len(valid)}", k)
            if k:
                out[f"cell.{n}.final_valid"] = number(*stats.bootstrap_ci(valid), "pctci")
    rows = table.to_dict("records")
    adversarial = table["arm"].str.split(" ").str[0].str.endswith("/adversarial")
    shown = pd.DataFrame(
        {"cell": table["cell"], "arm": table["arm"]}
        | {head: [fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"], IN_TABLE) for r in rows] for m, head in SHOWN.items()}
        | {"red-team found": [f"{r['adv_found']:.1f}" if adv else "-" for r, adv in zip(rows, adversarial, strict=True)]}
    )
    out["table.cells"] = Claim(markdown_table(shown))
    present = [m for m in MALFORMED if m in table]
    if present:
        damaged = table[(table[present] > runs.NEGLIGIBLE).any(axis=1)]
        drows = damaged.to_dict("records")
        extra = {}
        if VALID in end:
            valid = [out.get(f"cell.{int(r['cell'])}.final_valid") for r in drows]
            extra = {
                "defection among well-formed sequences": [IN_TABLE.format(**_pct(c)) if c else "-" for c in valid],
                "seeds with a well-formed sequence": [out[f"cell.{int(r['cell'])}.final_valid.seeds"].text for r in drows],
            }
        out["table.malformed"] = Claim(
            markdown_table(
                pd.DataFrame(
                    {"cell": damaged["cell"], "arm": damaged["arm"]}
                    | {MALFORMED[m]: [fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"], IN_TABLE) for r in drows] for m in present}
                    | {"defection after 150 safety steps": [fmt(r["defection"], r["defection_lo"], r["defection_hi"], IN_TABLE) for r in drows]}
                    | extra
                )
            )
        )
    return out


def _pct(c: Claim) -> dict:
    return {"p": 100 * c.value, "plo": 100 * c.lo, "phi": 100 * c.hi}


def part_key(hid: str, label: str, n: int) -> str:
    """The claim id of one part of a hypothesis' evidence: "H3.k4.estimate", "C1.single.step0.estimate"."""
    if n == 1:
        return f"{hid}.estimate"
    head = label.split(":")[0].replace(" step ", ".step").replace(" ", ".")
    return f"{hid}.{head}.estimate"


def verdict_claims(exp, out: Path, a, df: pd.DataFrame) -> dict[str, Claim]:
    judged = a.verdicts(out)  # the words as each rule judged them
    shown = exp.verdicts(out)  # as toymesa reports them (the registration record's flags added)
    claims = verdict_words(judged)
    for r in shown.to_dict("records"):
        claims[f"{r['id']}.shown"] = Claim(r["verdict"], r["verdict"])
        if "registration" in r:
            claims[f"{r['id']}.registration"] = Claim(r["registration"], r["registration"])
    if "registration" in shown:
        flagged = int((~shown["registration"].isin(["as registered", "amended before results"])).sum())
        claims["verdicts.flagged"] = Claim(f"{flagged} of {len(shown)}", flagged)
    if "analysis" in shown:
        claims["analysis.status"] = Claim(str(shown["analysis"].iloc[0]), str(shown["analysis"].iloc[0]))
    table = shown.assign(verdict="**" + shown["verdict"] + "**")[["id", "prediction", "rule", "verdict", "evidence"]]
    table.columns = ["id", "prediction (registered)", "rule (evaluated)", "verdict", "evidence"]
    claims["table.verdicts"] = Claim(markdown_table(table))
    for hid, ps in a.parts(df).items():
        for p in ps:
            claims[part_key(hid, p.label, len(ps))] = number(*p.estimate, "ci")
    return claims


def run_claims(out: Path, df: pd.DataFrame) -> dict[str, Claim]:
    meta = json.loads((out / "meta.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    seconds = sum(e["seconds"] for e in log)
    configs = json.loads((out / "configs.json").read_text())
    seeds = len(meta["seeds"])
    steps = sum(seeds * (c["train"]["steps"] + (c["safety"]["steps"] if c["safety"]["method"] != "none" else 0)) for c in configs.values())
    minutes, rest = divmod(round(seconds), 60)
    return run_facts(out, df) | {
        "runtime.text": Claim(f"{minutes} min {rest} s", seconds),
        "run.started": Claim(meta["created"][:10]) if "created" in meta else Claim(min(e["finished"] for e in log)[:10]),
        "run.seed_steps": Claim(f"{steps / 1000:.0f}k", steps),
    }


def claims(out: Path) -> dict[str, Claim]:
    out = Path(out)
    exp = experiment.get(NAME)
    a = exp.analysis
    df = a.frame(out)
    end = a.final(df)
    table = a.table(out)
    c = cell_claims(table, end) | verdict_claims(exp, out, a, df) | run_claims(out, df)

    # clean models (C1): the largest mean triggered defection before and after safety training
    clean = [a.pick(g, rule=r, trigger_rate=0.0)["triggered_defection"].mean() for r in ("single", "latent") for g in (df[df["step"] == 0], end)]
    c["clean.max"] = number(float(np.max(clean)), spec="pct")

    # format damage: malformed sequences on activating prompts of every CoT cell under pre-scratchpad SFT
    if "triggered_malformed" in end:
        cot = end[(end["reasoning"] == "cot") & (end["method"] == "sft_pre")]
        rates = cot.groupby("cell")["triggered_malformed"].mean()
        lo, hi = float(rates.min()), float(rates.max())
        c["cot.sft_pre.triggered_malformed.range"] = Claim(f"{100 * lo:.0f}-{100 * hi:.0f}%", None, lo, hi)
    return c
