"""Verdicts for the quickstart sweep, computed from stored results only; each hypothesis is
judged by the rule its spec states (`toymesa.prereg`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from toymesa import prereg, runs, stats, store


def _arm(name: str, g: pd.DataFrame) -> prereg.Arm:
    return prereg.arm(name, g["triggered_defection"].to_numpy(), g["nonfinite"].to_numpy(bool) if "nonfinite" in g else None)


def parts(df: pd.DataFrame) -> dict[str, list[prereg.Part]]:
    """hypothesis id -> the CIs it is judged on."""
    last = runs.last_step(df)
    h1 = []
    for rule, g in last[last["hparams.lr"] == 3e-3].groupby("task.rule"):
        a = _arm(rule, g)
        h1.append(prereg.Part(f"{rule}, lr 3e-3, step {int(g['step'].max())}", stats.bootstrap_ci(a.values), (a,)))
    h2 = []
    for lr, g in df[df["step"] == 100].groupby("hparams.lr"):
        s, la = _arm("single", g[g["task.rule"] == "single"]), _arm("latent", g[g["task.rule"] == "latent"])
        h2.append(prereg.Part(f"single - latent, lr {lr:g}, step 100", stats.difference_ci(s.values, la.values), (s, la)))
    return {"H1": h1, "H2": h2}


def verdicts(out: Path) -> pd.DataFrame:
    return prereg.verdict_table(store.load_json(Path(out) / "meta.json")["hypotheses"], parts(runs.load(out)))
