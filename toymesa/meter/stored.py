"""The meters as measurements of stored models (`toymesa.measure`): what `toymesa meter` runs.

Each builder returns a `toymesa.measure.Measurement`, a function over a population of one
static config (params with a leading member axis, their seeds) returning per-member columns.
Every member is measured on its own fixed data set, drawn once from its "meter" key
(`toymesa.meter.target`), so a measurement is a pure function of (config, seed, parameters,
settings) and reruns to the same numbers.

Columns (one row per cell x seed x meter in ``meter.csv``; `value` is the meter's number):

* ``llc``: λ̂ on the training distribution, with its diagnostics (``llc_sd`` over chains,
  ``plateau_ok``, ``llc_eps2``/``llc_eps4`` at ε/2 and ε/4, ``divergent`` chains, ``rhat``,
  ``drift``, ``step``, ``loss0`` = L_n(w*) in nats per sequence: a loss near 0 means a
  saturated fit, where λ̂ is not comparable across models; see `METER` in theory/meter.md).
* ``llc_act``: the data-refined λ̂ on activating prompts only.
* ``norm``: the balanced squared norm (rescaling symmetries removed, `toymesa.meter.norm`).
* ``compress``: the fewest bits that keep every behaviour metric within δ
  (`toymesa.meter.compress`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from toymesa import measure, stats, store
from toymesa.measure import Measurement
from toymesa.meter import compress, norm, prequential, target
from toymesa.meter.llc import Settings, llc_population
from toymesa.meter.names import METER_NAMES
from toymesa.train import role_key

# the settings `toymesa meter` uses on transformers unless told otherwise: cheap enough for a
# population of reference models on 2 cores; frozen across the models a comparison covers.
# c = 0.025, half the value validated on deep linear networks: at c = 0.05 the demo's single-
# trigger models lost 20-33% of λ̂ from ε to ε/4 (the automatic step sits at its λ_max floor
# there, and the typical set is stiffer than w*), while ε/2 and ε/4 agreed within 10%
DEFAULT = Settings(chains=2, draws=300, burn_in=100, batch=32, thin=15, plateau=True, step_c=0.025)
N_SET = 1024  # sequences in each member's fixed data set


def _keys(seeds, salt: int):
    return jax.vmap(lambda s: jax.random.fold_in(role_key(s, "meter"), salt))(seeds)


def llc_meter(settings: Settings = DEFAULT, n: int = N_SET, part: str = "all") -> Measurement:
    """λ̂ of every stored model on its fixed set (`part`: all / activating / quiet prompts)."""
    settings.check()
    name = "llc" if part == "all" else f"llc_{part[:3]}"

    def fn(cfg, params, seeds):
        data = target.fixed_sets(target.shape_config(cfg), seeds, n, part, cfg.hparams.trigger_rate)
        res = jax.device_get(llc_population(target.sequence_loss(cfg), params, _keys(seeds, 1), data, settings=settings))
        by_step = np.asarray(res.llc_by_step)
        return {
            "value": np.asarray(res.llc),
            "llc_sd": np.asarray(res.llc_std),
            "plateau_ok": np.asarray(res.plateau_ok, float),
            "llc_eps2": by_step[:, 1] if by_step.shape[1] > 1 else np.full(len(seeds), np.nan),
            "llc_eps4": by_step[:, -1] if by_step.shape[1] > 1 else np.full(len(seeds), np.nan),
            "divergent": np.asarray(res.divergent).sum(axis=(1, 2)).astype(float),
            "rhat": np.asarray(res.rhat),
            "drift": np.asarray(res.drift).mean(axis=1),
            "step": np.asarray(res.step),
            "loss0": np.asarray(res.loss0),
        }

    return Measurement(name, fn, (settings, n, part))


@functools.cache
def _norm_program(cfg, margin: float):
    def one(p, d):
        b, m = norm.balanced_norm(cfg, p), norm.margin_norm(cfg, p, d, margin)
        return {
            "value": b["total"],
            "raw": b["raw"],
            "invariant": b["invariant"],
            "margin": m["margin"],
            "margin_norm": m["norm"],
            "efficiency": m["efficiency"],
        }

    return jax.jit(jax.vmap(one))


def norm_meter(n: int = N_SET, margin: float = 5.0) -> Measurement:
    """The balanced squared norm (`value`), and at a fixed logit margin on activating prompts
    (``margin_norm``, ``efficiency`` = margin per unit norm, ``margin`` = the model's own)."""

    def fn(cfg, params, seeds):
        shape = target.shape_config(cfg)
        data = target.fixed_sets(shape, seeds, n, "activating", cfg.hparams.trigger_rate)
        return {k: np.asarray(v) for k, v in jax.device_get(_norm_program(shape, margin)(params, data)).items()}

    return Measurement("norm", fn, (n, margin))


COMPRESS_GRID = tuple((f, b) for f in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0) for b in (2, 3, 4, 6, 8))


def compress_meter(delta: float = 0.05, n_per_class: int = 128, grid=COMPRESS_GRID) -> Measurement:
    """The fewest bits (`value`) of a pruned and quantised model whose triggered defection (on
    activating prompts) and untriggered defection and helpful accuracy (on the others) each stay
    within δ of the stored model's; ``bits_per_weight`` = value / number of weights."""

    def fn(cfg, params, seeds):
        rows = []
        for i, seed in enumerate(np.asarray(seeds).tolist()):
            p = jax.tree.map(lambda x, i=i: x[i], params)
            r = compress.min_bits(compress.behaviour_metrics(cfg, seed, n_per_class), p, grid, delta, batch_size=8)
            rows.append((r.code_bits, r.code_bits / (r.uncompressed_bits / compress.FLOAT_BITS), r.keep_fraction, r.bits, float(r.compressed)))
        cols = np.asarray(rows, float).T
        return dict(zip(("value", "bits_per_weight", "keep_fraction", "quant_bits", "compressed"), cols, strict=True))

    return Measurement("compress", fn, (delta, n_per_class, tuple(grid)))


def preq_meter(n: int = 4096, orders: int = 3) -> Measurement:
    """Prequential code length (bits) of the cell's behaviour labels (`value`) and ΔL against the
    single-trigger control with matched defect counts (``delta``). It measures the behaviour,
    not the stored model: each member's seed only sets the data and the block models' inits."""

    def fn(cfg, params, seeds):
        out = [prequential.delta(cfg, int(s), n, orders=orders) for s in np.asarray(seeds).tolist()]
        cols = {"value": [d.behaviour.value for d in out], "delta": [d.value for d in out], "control": [d.control.value for d in out]}
        return {k: np.asarray(v, float) for k, v in cols.items()}

    return Measurement("preq", fn, (n, orders))


METERS = {  # name -> builder of its Measurement from the LLC settings (the other meters ignore them)
    "llc": llc_meter,
    "llc_act": lambda s: llc_meter(s, part="activating"),
    "norm": lambda s: norm_meter(),
    "compress": lambda s: compress_meter(),
    "preq": lambda s: preq_meter(),
}


assert tuple(METERS) == METER_NAMES  # the spec checker's list (toymesa.meter.names)


def parse_meters(text: str) -> list[str]:
    """Meter names from "llc,norm" (unknown names raise ValueError listing the valid ones)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in METERS]
    if unknown or not names:
        raise ValueError(f"unknown meter(s) {unknown or [text]}; choose from {', '.join(METERS)} (comma-separated, e.g. --meters llc,norm)")
    return names


def measure_run(out, names, which: str = "final", settings: Settings = DEFAULT, progress: bool = True, echo=print) -> pd.DataFrame:
    """Every meter in `names` on every stored model of run folder `out`: one row per cell x
    seed x meter, written as ``out/meter.csv`` (meters measured earlier and not asked for now
    are kept in it). Each meter resumes from its finished chunks (`toymesa.measure`)."""
    out = Path(out)
    frames = []
    for name in names:
        m = METERS[name](settings)._replace(name=f"meter/{name}")
        frames.append(measure.run(out, m, which, progress=progress, echo=echo).assign(meter=name, model=which))
    df = pd.concat(frames, ignore_index=True)
    path = out / "meter.csv"
    if path.exists():
        old = pd.read_csv(path)
        old = old[~(old["meter"].isin(names) & (old["model"] == which))]
        df = pd.concat([old, df], ignore_index=True)
    store.save_frame(df, path)
    return df


def spec_phase(spec, out, progress: bool = True, echo=print) -> pd.DataFrame | None:
    """The meter phase of a sweep: the meters a spec's ``[meter]`` section asks for, on every
    stored model of its run folder (None without the section)."""
    m = spec.meter
    if not m:
        return None
    return measure_run(out, m["meters"], m["model"], settings(m.get("chains"), m.get("draws")), progress, echo)


def settings(chains: int | None = None, draws: int | None = None, step: float | None = None, burn_in: int | None = None) -> Settings:
    """`DEFAULT` with the given overrides (None keeps the default); the trace is thinned to
    about 20 windows (the largest divisor of `draws` at most draws/20). Checked."""
    s = DEFAULT._replace(**{k: v for k, v in (("chains", chains), ("draws", draws), ("step", step), ("burn_in", burn_in)) if v is not None})
    if draws is not None:
        s = s._replace(thin=max(d for d in range(1, max(1, draws // 20) + 1) if draws % d == 0))
    return s.check()


def check_divergence(df: pd.DataFrame) -> None:
    """Raise ValueError (after everything is saved) if every LLC chain at ε diverged for some
    model (its λ̂ is NaN, `toymesa.meter.llc.LLC`): only a smaller step can fix that."""
    if "divergent" not in df:
        return
    llc = df[df["meter"].str.startswith("llc")]
    every = llc[llc["value"].isna()]
    if len(every):
        steps = ", ".join(f"{x:.3g}" for x in sorted(set(every["step"].round(12)))[:3])
        raise ValueError(
            f"every LLC chain diverged for {len(every)} of {len(llc)} models (step ε = {steps}); their λ̂ is NaN. "
            "Pass a smaller --step, or omit --step for the automatic step size; the other measurements are saved in meter.csv"
        )
    some = llc[llc["divergent"] > 0]
    if len(some):
        print(f"note: {int(some['divergent'].sum())} divergent chains in {len(some)} models are left out of their λ̂ (see meter.csv, column divergent)")


def by_arm(df: pd.DataFrame) -> pd.DataFrame:
    """One row per label x meter: the value's mean and 95% bootstrap CI over seeds, and the
    diagnostics that decide whether to believe it (plateau held, divergent chains, L_n(w*))."""
    rows = []
    for (label, meter), g in df.groupby(["label", "meter"], sort=False):
        row = {"label": label, "meter": meter, "n": len(g)}
        row["value"], row["value_lo"], row["value_hi"] = stats.bootstrap_ci(g["value"].to_numpy(float))
        if "plateau_ok" in g and g["plateau_ok"].notna().any():
            row["plateau held"] = f"{int(g['plateau_ok'].sum())}/{len(g)}"
            row["divergent chains"] = int(g["divergent"].sum())
            row["L_n(w*)"] = f"{g['loss0'].mean():.3g}"
            row["drift"] = f"{g['drift'].mean():+.3g}"
        rows.append(row)
    return pd.DataFrame(rows)
