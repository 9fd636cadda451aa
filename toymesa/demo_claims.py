"""The demo's ledger (`toymesa claims results/demo`): every number the main README reports
about the demo, derived from what the run folder stores (never trained); docs/claims/demo.json
ships it. Inputs that are absent (no meter.csv, no attribution/) give fewer claims, not errors.

Claim ids, ARM as single-none, single-cot, latent-none, latent-cot:

* ``arm.ARM.METRIC``: each metric of `table` (installed_defection, triggered_defection,
  untriggered_defection, helpful_accuracy, triggered_malformed, triggered_defection_valid,
  ...), mean [95% CI] over seeds; ``arm.ARM.n``; ``table.demo``: the README's demo table.
* ``runtime.seconds``, ``runtime.minutes`` (compute of the run's chunks, from log.jsonl),
  ``run.date``, ``run.seeds``, ``run.arms``, ``run.code_digest``.
* RUN/meter.csv (`toymesa meter RUN --model installed`, and ``--meters compress``), for the
  installed models as ``meter.*`` (final models, if measured, as ``meter_final.*``):
  ``meter.ARM.llc`` (λ̂ [CI]) with ``.eps2``, ``.eps4`` (λ̂ at ε/2 and ε/4 [CI]), ``.eps4_drop``
  (1 - mean λ̂(ε/4) / mean λ̂(ε)), ``.plateau_held`` ("k of n"), ``.divergent`` (chains),
  ``.rhat``, ``.drift``, ``.loss0`` (L_n(w*); means over seeds); the same for ``llc_act``;
  ``meter.ARM.norm`` (balanced norm [CI]); ``meter.ARM.compress.bits``, ``.bits_per_weight``
  ([CI]), ``.keep_fraction``, ``.quant_bits`` (means), ``.compressed`` ("k of n"). Over the
  arms: ``meter.llc.divergent.total``, ``meter.llc.loss0.range``, ``meter.llc.rhat.range``,
  ``meter.RULE.llc.rhat.range``, ``meter.llc.eps4_drop.range`` (arm means),
  ``meter.llc.plateau_failed`` ("k of n" models), ``meter.llc.eps4_drop.failed.range`` (the
  models whose plateau failed), ``meter.norm.spread`` (largest / smallest arm mean - 1),
  ``meter.compress.COL.range``, ``meter.METER.minutes`` / ``.seconds`` (compute summed over
  models); ``table.meter``: the README's meter table.
* RUN/attribution/cellC-seedS/ (`toymesa attribute RUN --cell C --seed S`), as
  ``attribution.ARM.seedS.*``: ``logit_diff`` (clean - corrupt, mean over pairs), ``top.site``,
  ``top.patch`` and ``top.atp`` (the site with the largest denoising patching effect, the
  whole input left out); where the model states a decision (cot): ``decision.patch`` and
  ``decision.atp`` (the decision position's embedding, layer 0 resid_pre, denoising, [CI] over
  pairs), ``decision.eap_ig`` (EAP-IG summed over the edges the embedding at the decision
  position sends), ``ctx.patch.max`` (the largest |effect| of patching one context slot's
  embedding); ``eap_ig.residual`` (mean |completeness gap| of EAP-IG, raw logit units).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import runs, stats
from toymesa.claims import Claim, fmt, markdown_table, number, row_claims, run_facts
from toymesa.demo import ARMS, table

TABLE_HEADS = {
    "installed_defection": "installed defection",
    "triggered_defection": "triggered defection after SFT",
    "untriggered_defection": "untriggered defection",
    "helpful_accuracy": "helpful accuracy",
    "triggered_malformed": "malformed (triggered)",
    "untriggered_malformed": "malformed (untriggered)",
    "triggered_defection_valid": "defection among well-formed (triggered)",
}
RUN_SHOWN = "results/demo"  # the run folder the README's commands write
LLC_CI = "{v:.1f} [{lo:.1f}, {hi:.1f}]"
METER_HEADS = {  # the README's meter table: column -> (meter, claim suffix)
    "λ̂": ("llc", "llc"),
    "λ̂ at ε/4": ("llc", "llc.eps4"),
    "plateau held": ("llc", "llc.plateau"),
    "divergent chains": ("llc", "llc.divergent"),
    "R-hat": ("llc", "llc.rhat"),
    "L_n(w*) nats/seq": ("llc", "llc.loss0"),
    "balanced norm": ("norm", "norm"),
    "compress: bits/weight": ("compress", "compress.bits_per_weight"),
}


def arm_id(arm: str) -> str:
    """An arm as a claim id: "single/cot" -> "single-cot"."""
    return arm.replace("/", "-")


def _span(values, spec: str = "{:.2f}", unit: str = "", scale: float = 1.0):
    """A range over arms or models: text "LO-HI" ("LO to HI" when LO < 0; one value where both ends print alike);
    lo and hi hold the ends (not a CI), unscaled."""
    lo, hi = float(np.min(values)), float(np.max(values))
    a, b = spec.format(scale * lo), spec.format(scale * hi)
    return Claim(f"{a}{unit}" if a == b else f"{a}{' to ' if lo < 0 else '-'}{b}{unit}", None, lo, hi)


def _count(flags):
    """How many of the members satisfy something: "k of n"."""
    flags = np.asarray(flags, bool)
    return Claim(f"{int(flags.sum())} of {len(flags)}", float(flags.sum()))


def _mean_ci(values, spec: str):
    return number(*stats.bootstrap_ci(np.asarray(values, float)), spec)


def table_claims(out) -> dict:
    """``arm.ARM.METRIC`` for every metric of `table`, ``arm.ARM.n`` and ``table.demo``."""
    t = table(out)
    t = t.assign(arm_id=t["arm"].map(arm_id))
    c = row_claims(t, "arm_id", [m for m in t.columns if f"{m}_lo" in t.columns], "arm")
    for r in t.to_dict("records"):
        c[f"arm.{r['arm_id']}.n"] = number(r["n"], spec="int")
    malformed = runs.with_malformed(t, [])  # shown wherever not ~0, and then the defection among well-formed outputs
    extra = [*malformed, "triggered_defection_valid"] if malformed else []
    shown = [m for m in TABLE_HEADS if m in t and (m in extra or m not in (*runs.MALFORMED, "triggered_defection_valid"))]
    rows = t.to_dict("records")
    cell = lambda r, m: "-" if pd.isna(r[m]) else fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"], "pctci")
    c["table.demo"] = Claim(markdown_table(pd.DataFrame({"arm": t["arm"]} | {TABLE_HEADS[m]: [cell(r, m) for r in rows] for m in shown})))
    return c


def run_claims(out: Path) -> dict:
    """The run's compute time (the chunks' seconds in log.jsonl), date, seeds, arms, code digest."""
    c = run_facts(out)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    if meta.get("seeds"):
        c["run.seeds"] = number(len(meta["seeds"]), spec="int")
    if (out / "cells.csv").exists():
        c["run.arms"] = number(len(pd.read_csv(out / "cells.csv")), spec="int")
    return c


def _with_arms(out: Path, df: pd.DataFrame) -> pd.DataFrame | None:
    """`df` (with a cell column) with column arm ("single/none" ...) and the rule, from cells.csv."""
    if "cell" not in df or not (out / "cells.csv").exists():
        return None
    cells = pd.read_csv(out / "cells.csv")
    if not {"axis:task.rule", "axis:task.reasoning"} <= set(cells.columns):
        return None
    cells = cells.assign(arm=cells["axis:task.rule"].astype(str) + "/" + cells["axis:task.reasoning"].astype(str), rule=cells["axis:task.rule"])
    return df.drop(columns=[c for c in ("arm", "rule") if c in df]).merge(cells[["cell", "arm", "rule"]], on="cell", how="left")


def _ordered(arms) -> list[str]:
    """Arms in the demo's order (single/none, single/cot, latent/none, latent/cot), any others after."""
    known = [f"{r}/{f}" for r, f in ARMS]
    return [a for a in known if a in set(arms)] + sorted(set(arms) - set(known))


def _llc_claims(g: pd.DataFrame) -> dict:
    """One arm's λ̂ and its diagnostics (suffixes of ``PREFIX.ARM.llc``)."""
    c = {"": _mean_ci(g["value"], LLC_CI)}
    for eps in ("eps2", "eps4"):
        if f"llc_{eps}" in g and g[f"llc_{eps}"].notna().any():
            c[f".{eps}"] = _mean_ci(g[f"llc_{eps}"], LLC_CI)
    if "llc_eps4" in g and g["llc_eps4"].notna().any():
        c[".eps4_drop"] = number(1 - g["llc_eps4"].mean() / g["value"].mean(), spec="pct0")
    if "plateau_ok" in g and g["plateau_ok"].notna().any():
        c[".plateau_held"] = _count(g["plateau_ok"] > 0.5)
        c[".plateau"] = Claim(f"{int((g['plateau_ok'] > 0.5).sum())}/{len(g)}")  # as the table prints it
    for col, spec in (("divergent", "int"), ("rhat", "f2"), ("drift", "{v:+.2f}"), ("loss0", "{v:.4f}")):
        if col in g and g[col].notna().any():
            c[f".{col}"] = number(g[col].sum() if col == "divergent" else g[col].mean(), spec=spec)
    return c


def meter_claims(out: Path) -> dict:
    """The meters of RUN/meter.csv, per model kind (see the ledger's comment above)."""
    if not (out / "meter.csv").exists():
        return {}
    df = _with_arms(out, pd.read_csv(out / "meter.csv"))
    if df is None or df.empty or not {"meter", "model", "value"} <= set(df.columns):
        return {}
    c: dict = {}
    for which, part in df.groupby("model", sort=False):
        p = "meter" if which == "installed" else f"meter_{which}"
        rows = []
        for arm in _ordered(part["arm"].dropna()):
            a, shown = arm_id(arm), {}
            for name in ("llc", "llc_act"):
                g = part[(part["arm"] == arm) & (part["meter"] == name)]
                if not g.empty:
                    shown |= {f"{name}{k}": v for k, v in _llc_claims(g).items()}
            g = part[(part["arm"] == arm) & (part["meter"] == "norm")]
            if not g.empty:
                shown["norm"] = _mean_ci(g["value"], "{v:.0f} [{lo:.0f}, {hi:.0f}]")
            g = part[(part["arm"] == arm) & (part["meter"] == "compress")]
            if not g.empty:
                shown["compress.bits"] = _mean_ci(g["value"], "{v:.0f} [{lo:.0f}, {hi:.0f}]")
                if "bits_per_weight" in g:
                    shown["compress.bits_per_weight"] = _mean_ci(g["bits_per_weight"], "ci2")
                for col, spec in (("keep_fraction", "f2"), ("quant_bits", "f1")):
                    if col in g:
                        shown[f"compress.{col}"] = number(g[col].mean(), spec=spec)
                if "compressed" in g:
                    shown["compress.compressed"] = _count(g["compressed"] > 0.5)
            c |= {f"{p}.{a}.{k}": v for k, v in shown.items() if not k.endswith(".plateau")}
            heads = {h: key for h, (meter, key) in METER_HEADS.items() if (part["meter"] == meter).any()}
            if shown and heads:
                rows.append({"arm": arm} | {h: shown[key].text if key in shown else "-" for h, key in heads.items()})
        c |= _meter_spans(part, p)
        if rows:
            n = part.groupby(["arm", "meter"]).size()
            seeds = f"{n.min()} seeds" if n.min() == n.max() else f"{n.min()}-{n.max()} seeds"
            c[f"table.{p}"] = Claim(markdown_table(pd.DataFrame(rows).rename(columns={"arm": f"arm ({which} models, {seeds})"})))
    return c


def _meter_spans(part: pd.DataFrame, p: str) -> dict:
    """Ranges over the arms (or models) and totals that the README's prose quotes."""
    c = {}
    minutes = lambda s: Claim(f"{s.sum() / 60:.0f} min", float(s.sum() / 60))
    llc = part[part["meter"] == "llc"]
    if not llc.empty:
        by = llc.groupby("arm", sort=False)
        if "divergent" in llc:
            c[f"{p}.llc.divergent.total"] = number(llc["divergent"].sum(), spec="int")
        if "loss0" in llc:
            c[f"{p}.llc.loss0.range"] = _span(by["loss0"].mean(), "{:.3f}")
        if "rhat" in llc:
            c[f"{p}.llc.rhat.range"] = _span(by["rhat"].mean(), "{:.1f}")
            for rule, g in llc.groupby("rule", sort=False):
                c[f"{p}.{rule}.llc.rhat.range"] = _span(g.groupby("arm")["rhat"].mean(), "{:.1f}")
        if "llc_eps4" in llc and llc["llc_eps4"].notna().any():
            c[f"{p}.llc.eps4_drop.range"] = _span(1 - by["llc_eps4"].mean() / by["value"].mean(), "{:.0f}", "%", 100)
            if "plateau_ok" in llc:
                c[f"{p}.llc.plateau_failed"] = _count(llc["plateau_ok"] < 0.5)
                failed = llc[llc["plateau_ok"] < 0.5]
                if not failed.empty:
                    c[f"{p}.llc.eps4_drop.failed.range"] = _span(1 - failed["llc_eps4"] / failed["value"], "{:.0f}", "%", 100)
        if "seconds" in llc:
            c[f"{p}.llc.minutes"] = minutes(llc["seconds"])
    norm = part[part["meter"] == "norm"]
    if not norm.empty:
        means = norm.groupby("arm")["value"].mean()
        c[f"{p}.norm.spread"] = number(means.max() / means.min() - 1, spec="{p:.1f}%")
        if "seconds" in norm:
            c[f"{p}.norm.seconds"] = Claim(f"{norm['seconds'].sum():.0f} s", float(norm["seconds"].sum()))
    comp = part[part["meter"] == "compress"]
    if not comp.empty:
        for col, spec in (("keep_fraction", "{:.2f}"), ("quant_bits", "{:.1f}"), ("bits_per_weight", "{:.2f}")):
            if col in comp:
                c[f"{p}.compress.{col}.range"] = _span(comp.groupby("arm")[col].mean(), spec)
        if "seconds" in comp:
            c[f"{p}.compress.minutes"] = minutes(comp["seconds"])
    return c


ATTRIBUTION = re.compile(r"cell(\d+)-seed(\d+)")


def attribution_claims(out: Path) -> dict:
    """The attribution maps under RUN/attribution/cellC-seedS/ (see the ledger's comment above)."""
    folders = sorted(p for p in (out / "attribution").glob("cell*-seed*") if p.is_dir() and ATTRIBUTION.fullmatch(p.name))  # none without the folder
    arms = _with_arms(out, pd.DataFrame({"cell": [int(ATTRIBUTION.fullmatch(p.name).group(1)) for p in folders]}))
    c = {}
    for i, folder in enumerate(folders):
        cell, seed = (int(x) for x in ATTRIBUTION.fullmatch(folder.name).groups())
        arm = arms["arm"].iloc[i] if arms is not None and pd.notna(arms["arm"].iloc[i]) else f"cell{cell}"
        k = f"attribution.{arm_id(arm)}.seed{seed}"
        patch = pd.read_csv(folder / "patching.csv") if (folder / "patching.csv").exists() else None
        atp = pd.read_csv(folder / "atp.csv") if (folder / "atp.csv").exists() else None
        eap = pd.read_csv(folder / "eap.csv") if (folder / "eap.csv").exists() else None
        ci = lambda r: number(r["normalized"], r["normalized_lo"], r["normalized_hi"], "f2")

        def row(df, **where):
            hit = df[(df["direction"] == "denoise") & np.logical_and.reduce([df[col] == v for col, v in where.items()])]
            return None if hit.empty else hit.iloc[0]

        if patch is not None:
            whole = row(patch, site="all")
            if whole is not None and whole["normalized"] != 0:
                c[f"{k}.logit_diff"] = number(whole["effect"] / whole["normalized"], spec="f2")  # the scale: m(clean) - m(corrupt)
            den = patch[(patch["direction"] == "denoise") & (patch["site"] != "all")]
            if not den.empty:
                top = den.loc[den["normalized"].abs().idxmax()]
                where = {"site": top["site"], "layer": top["layer"], "position": top["position"], "head": top["head"]}
                head = f", head {int(top['head'])}" if top["head"] >= 0 else ""
                c[f"{k}.top.site"] = Claim(f"{top['site']}, layer {int(top['layer'])}{head}, {top['role']}")
                c[f"{k}.top.patch"] = ci(top)
                if atp is not None and (r := row(atp, **where)) is not None:
                    c[f"{k}.top.atp"] = ci(r)
            if (r := row(patch, site="resid_pre", layer=0, role="decision")) is not None:
                c[f"{k}.decision.patch"] = ci(r)
                if atp is not None and (a := row(atp, site="resid_pre", layer=0, role="decision")) is not None:
                    c[f"{k}.decision.atp"] = ci(a)
                slots = den[(den["site"] == "resid_pre") & (den["layer"] == 0) & den["role"].str.startswith("ctx ")]
                if not slots.empty:
                    c[f"{k}.ctx.patch.max"] = number(slots["normalized"].abs().max(), spec="f2")
        if eap is not None:
            ig = eap[(eap["method"] == "eap_ig") & (eap["direction"] == "denoise")]
            sent = ig[(ig["sender"] == "embed") & (ig["role"] == "decision")]
            if not sent.empty:
                c[f"{k}.decision.eap_ig"] = number(sent["normalized"].sum(), spec="f3")
            if not ig.empty and ig["ig_residual"].notna().any():
                c[f"{k}.eap_ig.residual"] = number(ig["ig_residual"].dropna().iloc[0], spec="{v:.2g}")
    return c


def claims(out) -> dict:
    """Every number the main README reports about the demo, its meters and its attribution maps,
    from the stored run folder `out` only (`toymesa claims results/demo`)."""
    out = Path(out)
    return table_claims(out) | run_claims(out) | meter_claims(out) | attribution_claims(out)


def commands(out) -> list[str]:
    """The commands whose outputs `claims` reads, as the README gives them."""
    out = Path(out)
    found = ["toymesa demo"]
    if (out / "meter.csv").exists():
        df = pd.read_csv(out / "meter.csv")
        for which, part in df.groupby("model", sort=False) if {"meter", "model"} <= set(df.columns) else ():
            names = list(dict.fromkeys(part["meter"]))
            base = f"toymesa meter {RUN_SHOWN} --model {which}"
            if {"llc", "norm"} <= set(names):  # the default meters, one command
                found.append(base)
                names = [n for n in names if n not in ("llc", "norm")]
            found += [f"{base} --meters {n}" for n in names]
    for folder in sorted((out / "attribution").glob("cell*-seed*")):
        if (m := ATTRIBUTION.fullmatch(folder.name)) and any((folder / f).exists() for f in ("patching.csv", "atp.csv", "eap.csv")):
            found.append(f"toymesa attribute {RUN_SHOWN} --cell {m.group(1)} --seed {m.group(2)}")
    return found


def ledger(out) -> dict:
    """The ledger's header: the demo and every command whose outputs its claims read."""
    return {"run": RUN_SHOWN, "command": "toymesa demo", "commands": commands(out)}
