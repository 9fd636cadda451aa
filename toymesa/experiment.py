"""Named experiments: a spec plus an analysis that only reads stored results.

An experiment is a folder ``experiments/NAME/`` holding ``spec.toml`` (hypotheses,
controls, grid) and, optionally, ``analysis.py`` defining any of

* ``figures(out: Path) -> list[Path]``    draw figures from the results in `out`
* ``table(out: Path) -> DataFrame``       the headline table
* ``verdicts(out: Path) -> DataFrame``    one row per hypothesis: id, verdict, evidence

Missing pieces fall back to generic ones (metrics vs step per cell, final metrics with
CIs, hypotheses listed as "not evaluated"). The demo (`toymesa.demo`) is a built-in
experiment of the same shape.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pandas as pd

from toymesa import prereg, provenance
from toymesa import spec as spec_mod

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
RESULTS = Path("results")


@dataclass(frozen=True)
class Experiment:
    name: str
    spec_path: Path | None
    analysis: ModuleType | None

    def spec(self) -> spec_mod.Spec:
        if self.name == "demo":
            from toymesa import demo

            return demo.spec()
        return spec_mod.load(self.spec_path)

    def _call(self, fn: str, out: Path, default):
        f = getattr(self.analysis, fn, None)
        return f(Path(out)) if f is not None else default(Path(out))

    def figures(self, out) -> list[Path]:
        return self._call("figures", out, generic_figures)

    def table(self, out) -> pd.DataFrame:
        return self._call("table", out, lambda o: pd.read_csv(o / "summary.csv"))

    @property
    def analysis_path(self) -> Path | None:
        """The experiment's analysis file, if it has one."""
        return Path(self.analysis.__file__) if self.analysis is not None and self.name != "demo" else None

    def verdicts(self, out) -> pd.DataFrame:
        """One row per hypothesis, with its decision rule rendered from the rule's data
        (`toymesa.prereg.render`). A verdict on a hypothesis edited or added after results
        existed, or reached by analysis code that changed after results existed (see the run's
        prereg.json, `toymesa.prereg.register`), says so."""
        df = self._call("verdicts", out, generic_verdicts)
        if df.empty:
            return df
        if "rule" not in df:
            rules = {h["id"]: prereg.render(h["rule"]) for h in json.loads((Path(out) / "meta.json").read_text())["hypotheses"] if "rule" in h}
            df = df.assign(rule=[rules.get(i, "(no rule stated as data)") for i in df["id"]])
        record = Path(out) / "prereg.json"
        if record.exists():
            rec = json.loads(record.read_text())
            standing = prereg.registration_status(rec)
            status = pd.Series([standing.get(i, "not registered") for i in df["id"]], index=df.index)
            df = df.assign(registration=status)
            flag = ~status.isin(["as registered", "amended before results"])
            df.loc[flag, "verdict"] = df.loc[flag, "verdict"] + " [" + status[flag] + "]"
            path = self.analysis_path
            analysis = prereg.analysis_status(rec, provenance.file_digest(path) if path else None)
            df = df.assign(analysis=analysis)
            if analysis == "ANALYSIS CHANGED AFTER RESULTS":
                df["verdict"] = df["verdict"] + f" [{analysis}]"
        return df


def _module(path: Path, name: str) -> ModuleType | None:
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"toymesa_experiments.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def discover(root: Path = EXPERIMENTS) -> dict[str, Experiment]:
    """Every experiment: the built-in demo, then each folder of `root` with a spec.toml."""
    from toymesa import demo

    found = {"demo": Experiment("demo", None, demo)}
    for spec_path in sorted(Path(root).glob("*/spec.toml")):
        name = spec_path.parent.name
        found[name] = Experiment(name, spec_path, _module(spec_path.parent / "analysis.py", name))
    return found


def get(name: str, root: Path = EXPERIMENTS) -> Experiment:
    found = discover(root)
    if name not in found:
        raise KeyError(f"no experiment named {name!r}; known: {', '.join(found)} (see `toymesa list`)")
    return found[name]


def for_results(out: Path, root: Path = EXPERIMENTS) -> Experiment:
    """The experiment a results folder came from (by the name in its meta.json)."""
    name = json.loads((Path(out) / "meta.json").read_text())["name"]
    return discover(root).get(name, Experiment(name, None, None))


def result_dirs(results: Path) -> list[Path]:
    """Run folders under `results` (or `results` itself if it is one)."""
    results = Path(results)
    if (results / "meta.json").exists():
        return [results]
    return sorted(p.parent for p in results.glob("*/meta.json"))


def results_dir(name: str, results: Path = RESULTS, root: Path = EXPERIMENTS) -> Path | None:
    """Where experiment `name`'s stored results live: the user's run folder `results/NAME`
    if it holds a meta.json, else the results shipped with the experiment,
    `root/NAME/results`, if they do; None when neither does."""
    for out in (Path(results) / name, Path(root) / name / "results"):
        if (out / "meta.json").exists():
            return out
    return None


def run_state(out: Path | None) -> str:
    """The state of run folder `out`: "finished" (results.csv written), "partial" (meta.json
    or chunks, no results.csv) or "not run" (also for None)."""
    if out is None:
        return "not run"
    out = Path(out)
    if (out / "results.csv").exists():
        return "finished"
    return "partial" if (out / "meta.json").exists() or (out / "chunks").exists() else "not run"


def stored_runs(results: Path = RESULTS, root: Path = EXPERIMENTS) -> list[Path]:
    """Every stored run folder: each experiment's (`results_dir`), then any other run folder
    under `results`; each folder once (by resolved path)."""
    found = [results_dir(name, results, root) for name in discover(root)]
    seen, out = set(), []
    for d in [*(d for d in found if d is not None), *result_dirs(results)]:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


# ----------------------------------------------------------------- generic analysis
def generic_figures(out: Path) -> list[Path]:
    """Behaviour vs step for every cell (`plot.behaviour`): the mean over seeds with its 95%
    bootstrap CI, the statistic of summary.csv; one panel per headline metric that has data
    and differs from the panels before it."""
    import matplotlib.pyplot as plt

    from toymesa import plot, runs

    out = Path(out)
    df = runs.load(out)
    metrics = runs.with_malformed(df, [m for m in runs.EVAL_METRICS if m in df])
    df = df.assign(label=runs.cell_labels(df))
    with plt.rc_context(plot.STYLE):
        return plot.save(plot.behaviour(df, metrics, out.name), out / "figures" / "behaviour")


def generic_verdicts(out: Path) -> pd.DataFrame:
    meta = json.loads((Path(out) / "meta.json").read_text())
    rows = [{"id": h["id"], "statement": h["statement"], "prediction": h["prediction"], "verdict": "not evaluated", "evidence": ""} for h in meta["hypotheses"]]
    return pd.DataFrame(rows, columns=["id", "statement", "prediction", "verdict", "evidence"])
