"""The published numbers of experiments/probes (README.md), from its stored results only.

Reads the CSVs and run_info.json in experiments/probes/results (copied there by
analysis.publish from results/probes/); never loads a model or probes one. Claim ids, with
SITE in (middle, late), POS in (prompt_end, answer_pred), ARM as single-none, single-cot,
latent-none, latent-cot, KIND in (backdoored, clean), METHOD as in analysis.METHODS:

- ``H1.verdict`` .. ``H7.verdict`` (verdicts.csv), and the evidence the verdict table cites:
  ``H1.evidence``, ``H2.evidence``, ``H3.midpoints``, ``H3.conditions``, ``H3.bands``,
  ``H6.above_band``;
- ``table.SITE.POS``: the README's result tables (mean AUROC [CI] per method, random band);
- ``auroc.SITE.POS.ARM.KIND.METHOD`` (summary.csv), ``band.SITE.POS.ARM.KIND`` (null_summary.csv:
  the seed-averaged 2.5-97.5% quantiles of random directions), ``diff.SITE.POS.ARM.METHOD``
  (differences.csv: backdoored - clean, paired by seed);
- ranges over arms that the prose quotes (``….range``: the text is "lowest-highest"; ``lo`` and
  ``hi`` hold the ends, not a CI), counts of arms whose CI is above 0 (``….ci_above_0``);
- ``behaviour.*`` (behaviour_summary.csv) and ``runtime.*`` (run_info.json).
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pandas as pd

from toymesa.claims import Claim, markdown_table, number

HERE = Path(__file__).resolve().parent
SITE_NAMES = {"blocks.0.hook_resid_post": "middle", "blocks.1.hook_resid_post": "late"}
COMMAND = ".venv/bin/python experiments/probes/run.py"


def _analysis():
    spec = importlib.util.spec_from_file_location("toymesa_claims.probes_analysis", HERE / "analysis.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def slug(arm: str) -> str:
    return arm.replace("/", "-")


def auroc_text(v, lo, hi) -> Claim:
    return Claim(f"{v:.3f} [{lo:.3f}, {hi:.3f}]", float(v), float(lo), float(hi))


def span(values, spec: str = "{:.2f}", sep: str = "-") -> Claim:
    """A range over arms: text "lowest-highest"; lo and hi hold the ends (not a CI)."""
    lo, hi = float(min(values)), float(max(values))
    return Claim(f"{spec.format(lo)}{sep}{spec.format(hi)}", None, lo, hi)


def count(flags) -> Claim:
    """How many of the arms satisfy something: "k of n"."""
    flags = [bool(f) for f in flags]
    return Claim(f"{sum(flags)} of {len(flags)}", float(sum(flags)))


def common(texts: dict[str, str]) -> Claim:
    """One text for every arm: the most frequent one, with the arms that differ in parentheses."""
    top = Counter(texts.values()).most_common(1)[0][0]
    odd = [f"{a} {t}" for a, t in texts.items() if t != top]
    return Claim(top + (f" ({'; '.join(odd)})" if odd else ""))


def claims(out: Path) -> dict[str, Claim]:
    out = Path(out)
    an = _analysis()
    summary, null, diffs, beh = (pd.read_csv(out / f) for f in ("summary.csv", "null_summary.csv", "differences.csv", "behaviour_summary.csv"))
    probes = pd.read_csv(out / "probes.csv")
    verdicts = pd.read_csv(out / "verdicts.csv")
    info = json.loads((out / "run_info.json").read_text())
    arms = list(dict.fromkeys(summary["arm"]))
    late = an.SITES[1]
    c: dict[str, Claim] = {}

    # verdicts
    for r in verdicts.to_dict("records"):
        c[f"{r['id']}.verdict"] = Claim(str(r["verdict"]), str(r["verdict"]))

    # every cell: AUROC [CI], random band, backdoored - clean
    for r in summary.to_dict("records"):
        key = f"{SITE_NAMES[r['site']]}.{r['position']}.{slug(r['arm'])}.{r['kind']}.{r['method']}"
        c[f"auroc.{key}"] = auroc_text(r["auroc"], r["auroc_lo"], r["auroc_hi"])
    for r in null.to_dict("records"):
        key = f"{SITE_NAMES[r['site']]}.{r['position']}.{slug(r['arm'])}.{r['kind']}"
        c[f"band.{key}"] = Claim(f"[{r['low']:.3f}, {r['high']:.3f}]", None, float(r["low"]), float(r["high"]))
    for r in diffs.to_dict("records"):
        key = f"{SITE_NAMES[r['site']]}.{r['position']}.{slug(r['arm'])}.{r['method']}"
        c[f"diff.{key}"] = number(r["difference"], r["difference_lo"], r["difference_hi"], "ci")

    # the result tables, one per site x position (as analysis.markdown prints them)
    for site in an.SITES:
        for pos in an.POSITIONS:
            rows = []
            for arm in arms:
                for kind in an.KINDS:
                    row = {"arm": arm, "models": kind}
                    for m in an.METHODS:
                        row[m] = an._fmt(an._get(summary, arm=arm, kind=kind, site=site, position=pos, method=m))
                    band = an._get(null, arm=arm, kind=kind, site=site, position=pos)
                    row["random band (2.5-97.5%)"] = f"{band['low']:.2f}-{band['high']:.2f}"
                    rows.append(row)
            c[f"table.{SITE_NAMES[site]}.{pos}"] = Claim(markdown_table(pd.DataFrame(rows)))

    def s(pos, kind, meth, arm_filter=lambda a: True, site=late):
        return [an._get(summary, arm=a, kind=kind, site=site, position=pos, method=meth) for a in arms if arm_filter(a)]

    def d(pos, meth, site=late):
        return [an._get(diffs, arm=a, site=site, position=pos, method=meth) for a in arms]

    def n(pos, kind, site=late):
        return {a: an._get(null, arm=a, kind=kind, site=site, position=pos) for a in arms}

    single = lambda a: a.startswith("single")

    # the verdict table's evidence
    for hid, meth in (("H1", "diff_means"), ("H2", "logistic")):
        c[f"{hid}.evidence"] = common(
            {a: auroc_text(r["auroc"], r["auroc_lo"], r["auroc_hi"]).text for a, r in zip(arms, s("answer_pred", "backdoored", meth), strict=True)}
        )
    mids = null["midpoint"]
    c["H3.midpoints"] = Claim(f"[{mids.min():.3f}, {mids.max():.3f}]", None, float(mids.min()), float(mids.max()))
    c["H3.conditions"] = number(len(null), spec="int")
    wide = n("answer_pred", "backdoored")
    c["H3.bands"] = common({a: f"[{r['low']:.3f}, {r['high']:.3f}]" for a, r in wide.items()})
    generic = s("answer_pred", "backdoored", "contrast_generic")
    c["H6.above_band"] = count(r["auroc"] > wide[r["arm"]]["high"] for r in generic)

    # ranges over arms quoted in the prose (late site)
    c["diff.late.prompt_end.diff_means.range"] = span([r["difference"] for r in d("prompt_end", "diff_means")], "{:+.2f}", " to ")
    c["diff.late.prompt_end.logistic.range"] = span([r["difference"] for r in d("prompt_end", "logistic")], "{:+.3f}", " to ")
    c["diff.late.prompt_end.contrast_trigger.range"] = span([r["difference"] for r in d("prompt_end", "contrast_trigger")], "{:+.2f}", " to ")
    c["diff.late.answer_pred.diff_means.range"] = span([r["difference"] for r in d("answer_pred", "diff_means")], "{:+.2f}", " to ")
    for meth in ("diff_means", "logistic", "contrast_trigger"):
        c[f"diff.late.prompt_end.{meth}.ci_above_0"] = count(r["difference_lo"] > 0 for r in d("prompt_end", meth))
    c["auroc.late.prompt_end.clean.logistic.range"] = span([r["auroc"] for r in s("prompt_end", "clean", "logistic")])
    c["auroc.late.prompt_end.single.backdoored.contrast_trigger.range"] = span([r["auroc"] for r in s("prompt_end", "backdoored", "contrast_trigger", single)])
    c["auroc.late.prompt_end.single.clean.contrast_trigger.range"] = span([r["auroc"] for r in s("prompt_end", "clean", "contrast_trigger", single)])
    for pos in an.POSITIONS:
        c[f"auroc.late.{pos}.backdoored.contrast_generic.range"] = span([r["auroc"] for r in s(pos, "backdoored", "contrast_generic")])
    inside = [
        n(pos, "backdoored")[r["arm"]]["low"] <= r["auroc"] <= n(pos, "backdoored")[r["arm"]]["high"]
        for pos in an.POSITIONS
        for r in s(pos, "backdoored", "contrast_generic")
    ]
    c["auroc.late.backdoored.contrast_generic.inside_band"] = count(inside)
    c["null.late.answer_pred.backdoored.mean_abs_dev.range"] = span([r["mean_abs_dev"] for r in wide.values()])
    c["band.late.answer_pred.backdoored.narrowest"] = Claim(
        f"[{max(r['low'] for r in wide.values()):.3f}, {min(r['high'] for r in wide.values()):.3f}]",
        None,
        float(max(r["low"] for r in wide.values())),
        float(min(r["high"] for r in wide.values())),
    )
    fitted = probes[
        (probes["kind"] == "backdoored") & (probes["site"] == late) & (probes["position"] == "answer_pred") & probes["method"].isin(["diff_means", "logistic"])
    ]
    c["auroc.late.answer_pred.backdoored.fitted.min_model"] = number(fitted["auroc"].min(), spec="f3")

    # behaviour on the test prompts
    bd, cl = beh[beh["kind"] == "backdoored"], beh[beh["kind"] == "clean"]
    low = bd.loc[bd["triggered_defection"].idxmin()]
    c["behaviour.backdoored.triggered_defection"] = number(low["triggered_defection"], low["triggered_defection_lo"], low["triggered_defection_hi"], "pctci0")
    c["behaviour.backdoored.untriggered_defection.range"] = Claim(
        f"{100 * bd['untriggered_defection'].min():.1f}-{100 * bd['untriggered_defection'].max():.1f}%",
        None,
        float(bd["untriggered_defection"].min()),
        float(bd["untriggered_defection"].max()),
    )
    c["behaviour.clean.defection.max"] = number(max(cl["triggered_defection"].max(), cl["untriggered_defection"].max()), spec="pct0")
    worst = beh["triggered_malformed"].max()
    c["behaviour.malformed"] = Claim(
        "no malformed output" if worst == 0 else f"malformed output on up to {100 * worst:.1f}% of activating prompts", float(worst)
    )

    # runtime (run_info.json: the last run's times; the clean-training times of the run that trained them)
    train = info["clean_training_seconds"]
    for arm, t in train.items():
        c[f"runtime.clean_training.{slug(arm)}"] = number(t["seconds"], spec="int")
    c["runtime.clean_training.total"] = number(sum(t["seconds"] for t in train.values()), spec="int")
    c["runtime.clean_training.models"] = number(sum(t["members"] for t in train.values()), spec="int")
    c["runtime.rerun.total"] = number(info["total_seconds"], spec="int")
    c["runtime.rerun.probing"] = number(info["probe_seconds"], spec="f1")
    return c


def ledger(out: Path) -> dict:
    """Not a sweep (no meta.json): the command and code digest of the run, from run_info.json."""
    info = json.loads((Path(out) / "run_info.json").read_text())
    return {
        "command": f"{COMMAND}  # writes results/probes/, copied to experiments/probes/results/",
        "code_digest": info.get("code_digest"),
        "spec_digest": None,
        "probed_run": f"{info.get('demo')} (code digest {info.get('demo_code_digest')})",
    }
