"""Every number persistence_cot's README reports, derived from the stored run only (never trained).

Claim ids (``toymesa claims experiments/persistence_cot/results`` writes them to results/claims.json):

* ``RULE.REASONING.METHOD.METRIC``: each cell's mean at the last safety step with its 95%
  bootstrap CI (the analysis' `table`), e.g. ``single.cot.sft_full.kept``,
  ``latent.cot.sft_post.untriggered_malformed``.
* ``ID.verdict`` (the judged word), ``ID.evidence``, ``ID.RULE.estimate``: each hypothesis' CIs as
  judged; ``analysis.status``, ``analysis.registered_digest``, ``analysis.digest``: the standing
  of analysis.py against the registration record (`toymesa.prereg.analysis_status`).
* ``table.results``, ``table.verdicts`` (verdicts as toymesa reports them, flags included),
  ``table.coverage``: the README's tables.
* ``coverage.nN.pP``, ``coverage.nN.range``: the CI coverage simulation (`analysis.coverage`, 1000
  trials each; deterministic code, not the run).
* ``cot.sft_full.triggered_malformed.max``: the larger of the CoT arms' malformed rates under sft_full.
* ``runtime.seconds``, ``runtime.minutes`` (from log.jsonl), ``run.date``, ``run.cores``,
  ``run.code_digest``, ``run.cells``, ``run.seeds``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from toymesa import experiment, prereg, provenance
from toymesa.claims import Claim, fmt, markdown_table, number, run_facts, verdict_words

NAME = "persistence_cot"
METRICS = {
    "kept": "kept",
    "untriggered_defection": "untriggered defection",
    "helpful_accuracy": "helpful accuracy",
    "triggered_other": "triggered other",
    "triggered_malformed": "triggered malformed",
    "untriggered_malformed": "untriggered malformed",
}
COVERAGE_N = (10, 25)
COVERAGE_TRIALS = 1000


def results_claims(table: pd.DataFrame) -> dict[str, Claim]:
    out = {}
    for r in table.to_dict("records"):
        for m in ("installed", *METRICS):
            out[f"{r['arm'].replace('/', '.')}.{m}"] = number(r[m], r[f"{m}_lo"], r[f"{m}_hi"], "pctci")
    rows = table.to_dict("records")
    shown = pd.DataFrame({"cell": table["arm"]} | {head: [fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"], "pctci") for r in rows] for m, head in METRICS.items()})
    out["table.results"] = Claim(markdown_table(shown))
    cot_full = table[table["arm"].str.endswith("/cot/sft_full")]
    out["cot.sft_full.triggered_malformed.max"] = number(cot_full["triggered_malformed"].max(), spec="pct")
    return out


def verdict_claims(exp, out: Path, analysis) -> dict[str, Claim]:
    judged = analysis.verdicts(out)  # the words as each rule judged them
    shown = exp.verdicts(out)  # as toymesa reports them (flags of the registration record added)
    claims = verdict_words(judged)
    table = shown.assign(verdict="**" + shown["verdict"] + "**")[["id", "prediction", "verdict", "evidence"]]
    claims["table.verdicts"] = Claim(markdown_table(table))
    for hid, ps in analysis.verdict_parts(analysis.frame(out)).items():
        for p in ps:
            claims[f"{hid}.{p.label.split('/')[0].split(',')[0]}.estimate"] = number(*p.estimate, "ci")
    record = json.loads((out / "prereg.json").read_text())
    registered = next((a["digest"] for a in record.get("analyses", []) if a.get("digest")), None)
    current = provenance.file_digest(exp.analysis_path)
    status = prereg.analysis_status(record, current)
    claims["analysis.status"] = Claim(status, status)
    claims["analysis.registered_digest"] = Claim(str(registered), registered)
    claims["analysis.digest"] = Claim(str(current), current)
    return claims


def coverage_claims(analysis) -> dict[str, Claim]:
    claims, rows = {}, []
    for n in COVERAGE_N:
        cov = analysis.coverage(n, trials=COVERAGE_TRIALS)
        for r in cov.to_dict("records"):
            claims[f"coverage.n{n}.p{r['p_high']:g}"] = number(r["coverage"], spec="pct0")
        lo, hi = cov["coverage"].min(), cov["coverage"].max()
        claims[f"coverage.n{n}.range"] = Claim(f"{100 * lo:.0f}-{100 * hi:.0f}%", None, float(lo), float(hi))
        rows.append(
            {
                "n": n,
                "share of seeds near 1": " / ".join(f"{p:g}" for p in cov["p_high"]),
                "coverage of the nominal 95% CI": " / ".join(fmt(v, spec="pct0") for v in cov["coverage"]),
            }
        )
    claims["table.coverage"] = Claim(markdown_table(pd.DataFrame(rows)))
    return claims


def claims(out: Path) -> dict[str, Claim]:
    out = Path(out)
    exp = experiment.get(NAME)
    a = exp.analysis
    df = a.frame(out)
    return results_claims(a.table(out)) | verdict_claims(exp, out, a) | coverage_claims(a) | run_facts(out, df)
