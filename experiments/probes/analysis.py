"""Tables, verdicts and the figure of the probes experiment, from results/probes/ only (no model).

`report()` writes summary.csv, null_summary.csv, behaviour_summary.csv, differences.csv,
verdicts.csv and figures/probes.{png,pdf}, copies them next to the README, and prints them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import plot, stats

EXPERIMENT = Path(__file__).resolve().parent
OUT = Path("results/probes")
SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")  # middle and late of the 2-layer model
POSITIONS = ("prompt_end", "answer_pred")  # SEP (before any reasoning); layout.answer - 1 (ANS, after the model's reasoning)
METHODS = ("diff_means", "logistic", "contrast_generic", "contrast_trigger")
KINDS = ("backdoored", "clean")


# ------------------------------------------------------------------ tables, verdicts, figure (read results only)
def tables():
    df, null, beh = (pd.read_csv(OUT / f) for f in ("probes.csv", "null.csv", "behaviour.csv"))
    null = null.assign(midpoint=(null["low"] + null["high"]) / 2)
    keys = ["arm", "kind", "site", "position"]
    summary = stats.summarize(df, [*keys, "method"], ["auroc"])
    null_summary = stats.summarize(null, keys, ["low", "high", "midpoint", "mean_abs_dev"])
    beh_summary = stats.summarize(beh, ["arm", "kind"], ["triggered_defection", "untriggered_defection", "triggered_malformed"])
    diffs = []
    for (arm, site, pos, meth), g in df.groupby(["arm", "site", "position", "method"], sort=False):
        a = g[g["kind"] == "backdoored"].sort_values("seed")["auroc"].to_numpy()
        c = g[g["kind"] == "clean"].sort_values("seed")["auroc"].to_numpy()
        d, lo, hi = stats.difference_ci(a, c, paired=True)
        diffs.append({"arm": arm, "site": site, "position": pos, "method": meth, "difference": d, "difference_lo": lo, "difference_hi": hi})
    return summary, null_summary, beh_summary, pd.DataFrame(diffs)


def _get(t: pd.DataFrame, **where) -> pd.Series:
    m = np.ones(len(t), bool)
    for k, v in where.items():
        m &= (t[k] == v).to_numpy()
    assert m.sum() == 1, where
    return t[m].iloc[0]


def _fmt(r, col="auroc") -> str:
    return f"{r[col]:.3f} [{r[col + '_lo']:.3f}, {r[col + '_hi']:.3f}]"


def verdicts(summary, null_summary, diffs) -> pd.DataFrame:
    """Each hypothesis of README.md by its registered rule."""
    arms = list(dict.fromkeys(summary["arm"]))
    late, out = SITES[1], []

    def s(arm, kind, pos, meth, site=late):
        return _get(summary, arm=arm, kind=kind, site=site, position=pos, method=meth)

    for hid, meth in (("H1", "diff_means"), ("H2", "logistic")):
        rs = {a: s(a, "backdoored", "answer_pred", meth) for a in arms}
        v = "confirmed" if all(r["auroc_lo"] >= 0.95 for r in rs.values()) else "refuted" if any(r["auroc_hi"] < 0.95 for r in rs.values()) else "inconclusive"
        out.append((hid, v, "; ".join(f"{a}: {_fmt(r)}" for a, r in rs.items())))
    mids = null_summary["midpoint"].to_numpy()
    wide = {a: _get(null_summary, arm=a, kind="backdoored", site=late, position="answer_pred") for a in arms}
    ok_mid = bool(np.all(np.abs(mids - 0.5) <= 0.05))
    ok_wide = all(r["low"] < 0.4 or r["high"] > 0.6 for r in wide.values())
    out.append(
        (
            "H3",
            "confirmed" if ok_mid and ok_wide else "refuted",
            f"band midpoints over all {len(mids)} conditions in [{mids.min():.3f}, {mids.max():.3f}]; backdoored late answer_pred band: "
            + "; ".join(f"{a}: [{r['low']:.3f}, {r['high']:.3f}]" for a, r in wide.items()),
        )
    )
    rs = {a: s(a, "clean", "prompt_end", "logistic") for a in arms}
    need = {a: 0.9 if a.startswith("single") else 0.8 for a in arms}
    v = "confirmed" if all(rs[a]["auroc_lo"] >= need[a] for a in arms) else "refuted" if any(rs[a]["auroc_hi"] < need[a] for a in arms) else "inconclusive"
    out.append(("H4", v, "; ".join(f"{a} (clean, needs {need[a]}): {_fmt(r)}" for a, r in rs.items())))
    ds = {a: _get(diffs, arm=a, site=late, position="answer_pred", method="diff_means") for a in arms}
    both_one = {a: s(a, "backdoored", "answer_pred", "diff_means")["auroc"] == 1 and s(a, "clean", "answer_pred", "diff_means")["auroc"] == 1 for a in arms}
    if all(d["difference_lo"] > 0 for d in ds.values()):
        v = "confirmed"
    elif any(d["difference_hi"] < 0 for d in ds.values()):
        v = "refuted"
    else:
        v = "at ceiling: cannot discriminate" if any(both_one.values()) else "inconclusive"
    out.append(("H5", v, "; ".join(f"{a}: {_fmt(d, 'difference')}" for a, d in ds.items())))
    rs = {a: s(a, "backdoored", "answer_pred", "contrast_generic") for a in arms}
    above = sum(rs[a]["auroc"] > wide[a]["high"] for a in arms)
    short = sum(rs[a]["auroc"] < 0.95 for a in arms)
    v = "confirmed" if above >= 3 and short >= 3 else "refuted" if len(arms) - above >= 2 else "inconclusive"
    out.append(
        (
            "H6",
            v,
            f"above the band in {above}/4, below 0.95 in {short}/4: " + "; ".join(f"{a}: {_fmt(r)} (band high {wide[a]['high']:.3f})" for a, r in rs.items()),
        )
    )
    single = [s(a, k, "prompt_end", "contrast_trigger") for a in arms if a.startswith("single") for k in KINDS]
    latent = [s(a, "backdoored", "prompt_end", "contrast_trigger") for a in arms if a.startswith("latent")]
    if all(r["auroc_lo"] >= 0.9 for r in single) and all(r["auroc_hi"] < 0.95 for r in latent):
        v = "confirmed"
    elif any(r["auroc_hi"] < 0.9 for r in single) or any(r["auroc_lo"] >= 0.95 for r in latent):
        v = "refuted"
    else:
        v = "inconclusive"
    out.append(("H7", v, "; ".join(f"{r['arm']} {r['kind']}: {_fmt(r)}" for r in [*single, *latent])))
    return pd.DataFrame(out, columns=["id", "verdict", "evidence"])


def figure(summary, null_summary):
    """Rows: site x position; columns: arms. Per panel: each method's mean AUROC with its CI, backdoored
    and clean side by side, seeds as dots; the random-direction band (mean 2.5-97.5% quantiles) shaded."""
    df = pd.read_csv(OUT / "probes.csv")
    arms = list(dict.fromkeys(summary["arm"]))
    rows = [(site, pos) for site in SITES for pos in POSITIONS]
    colors = {"backdoored": plot.COLORS[1], "clean": plot.COLORS[0]}
    with plot.plt.rc_context(plot.STYLE):
        fig, axes = plot.plt.subplots(len(rows), len(arms), figsize=(2.5 * len(arms), 2.0 * len(rows)), sharey=True, layout="constrained", squeeze=False)
        for r, (site, pos) in enumerate(rows):
            for c, arm in enumerate(arms):
                ax = axes[r, c]
                for kind, off in (("backdoored", -0.17), ("clean", 0.17)):
                    band = _get(null_summary, arm=arm, kind=kind, site=site, position=pos)
                    if kind == "backdoored":
                        ax.axhspan(band["low"], band["high"], color=colors[kind], alpha=0.12, lw=0)
                    else:  # outlined, so the two bands stay apart where they overlap
                        for y in (band["low"], band["high"]):
                            ax.axhline(y, color=colors[kind], lw=0.9, ls="--", alpha=0.8)
                    for k, meth in enumerate(METHODS):
                        row = _get(summary, arm=arm, kind=kind, site=site, position=pos, method=meth)
                        x = k + off
                        seeds = df[(df.arm == arm) & (df.kind == kind) & (df.site == site) & (df.position == pos) & (df.method == meth)]["auroc"]
                        ax.plot(np.full(len(seeds), x) + np.linspace(-0.06, 0.06, len(seeds)), seeds, ".", ms=2.5, color=colors[kind], alpha=0.45)
                        ax.errorbar(
                            x,
                            row["auroc"],
                            yerr=[[row["auroc"] - row["auroc_lo"]], [row["auroc_hi"] - row["auroc"]]],
                            fmt="o",
                            ms=4,
                            color=colors[kind],
                            capsize=2,
                            lw=1,
                        )
                ax.axhline(0.5, color="0.5", lw=0.6, ls=":")
                ax.set_ylim(-0.03, 1.03)
                ax.set_xticks(range(len(METHODS)), ["diff of\nmeans", "logistic", "generic\npair", "trigger\npair"], fontsize=7)
                if r == 0:
                    ax.set_title(arm, fontsize=9, fontweight="bold")
                if c == 0:
                    where = "block 0 (middle)" if site == SITES[0] else "block 1 (late)"
                    when = "last prompt pos." if pos == "prompt_end" else "answer-prediction pos."
                    ax.set_ylabel(f"{where}\n{when}\nheld-out AUROC", fontsize=7.5)
        handles = [plot.plt.Line2D([], [], marker="o", ls="", color=colors[k], label=f"{k} models") for k in KINDS]
        handles += [
            plot.plt.Rectangle((0, 0), 1, 1, color=colors["backdoored"], alpha=0.2, label="random-direction band, backdoored"),
            plot.plt.Line2D([], [], color=colors["clean"], ls="--", lw=0.9, label="random-direction band, clean"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7.5)
        fig.suptitle(
            "Defection probes on the demo's installed models: mean AUROC over 8 seeds, 95% bootstrap CI, dots = seeds;\n"
            "band: AUROCs of 200 random unit directions, 2.5-97.5% quantiles (mean over seeds)",
            fontsize=8.5,
        )
    return plot.save(fig, OUT / "figures" / "probes")


def markdown(summary, null_summary, site: str, pos: str) -> str:
    """The README table of one site and position: rows arm x kind, columns methods and the band."""
    head = "| arm | models | " + " | ".join(METHODS) + " | random band (2.5-97.5%) |"
    lines = [head, "|" + "---|" * (len(METHODS) + 3)]
    for arm in dict.fromkeys(summary["arm"]):
        for kind in KINDS:
            cells = [_fmt(_get(summary, arm=arm, kind=kind, site=site, position=pos, method=m)) for m in METHODS]
            band = _get(null_summary, arm=arm, kind=kind, site=site, position=pos)
            lines.append(f"| {arm} | {kind} | " + " | ".join(cells) + f" | {band['low']:.2f}-{band['high']:.2f} |")
    return "\n".join(lines)


def publish(paths):
    """Copy the small outputs (tables, figure; not the clean models) next to the README, where they are kept."""
    keep = EXPERIMENT / "results"
    (keep / "figures").mkdir(parents=True, exist_ok=True)
    for name in (
        "probes.csv",
        "null.csv",
        "behaviour.csv",
        "summary.csv",
        "null_summary.csv",
        "behaviour_summary.csv",
        "differences.csv",
        "verdicts.csv",
        "run_info.json",
    ):
        shutil.copyfile(OUT / name, keep / name)
    for p in paths:
        shutil.copyfile(p, keep / "figures" / Path(p).name)


def report():
    summary, null_summary, beh_summary, diffs = tables()
    summary.to_csv(OUT / "summary.csv", index=False)
    null_summary.to_csv(OUT / "null_summary.csv", index=False)
    beh_summary.to_csv(OUT / "behaviour_summary.csv", index=False)
    diffs.to_csv(OUT / "differences.csv", index=False)
    v = verdicts(summary, null_summary, diffs)
    v.to_csv(OUT / "verdicts.csv", index=False)
    paths = figure(summary, null_summary)
    publish(paths)
    with pd.option_context("display.width", 250, "display.max_rows", 200, "display.max_colwidth", 400):
        print(beh_summary.round(3).to_string(index=False))
        print(summary.round(3).to_string(index=False))
        print(null_summary.round(3).to_string(index=False))
        print(v.to_string(index=False))
    for site in SITES:
        for pos in POSITIONS:
            print(f"\n{site}, {pos}\n" + markdown(summary, null_summary, site, pos))
    print("wrote", *paths)
