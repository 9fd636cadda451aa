"""The LLC validation table of theory/meter.md: λ̂ against the closed-form λ of reduced-rank
regression and deep linear networks, with ONE frozen setting (`SETTING`) and the automatic
step size for every case (no per-case tuning).

    .venv/bin/python theory/meter_validation.py          # writes theory/meter_validation.json, prints the table

`tests/test_meter_validation.py` reruns every case under `make test-slow` and checks the
stored table against `theory/meter.md` in every run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from toymesa.meter import closed_forms, linear
from toymesa.meter.llc import Settings, estimate

SETTING = Settings(chains=4, draws=64000, burn_in=8000, batch=None, thin=200, plateau=False, step_c=0.05)
N = 1000  # the sample size the posterior is tempered for: nβ = n / log n ≈ 144.8
TOLERANCE = 0.10
CASES = (
    ((5, 3, 4), 0),  # r = 0: w* = 0, where the Hessian vanishes
    ((5, 3, 4), 1),
    ((5, 3, 4), 3),
    ((8, 2, 6), 1),
    ((6, 6, 6), 3),
    ((10, 4, 3), 1),  # N + H < M + r: outside the first regime
    ((2, 2, 8), 1),  # M + H < N + r: outside the first regime
    ((4, 3, 3, 4), 1),  # deep linear networks, L = 3, 4
    ((3, 5, 4, 6), 2),
    ((5, 4, 3, 2, 3), 2),
)
OUT = Path(__file__).with_suffix(".json")


def measure(widths, r: int, seed: int = 0) -> dict:
    """λ̂ of the most singular rank-r truth of a deep linear network (`toymesa.meter.linear`)."""
    w = linear.truth(widths, r, jax.random.key(seed))
    res = estimate(linear.population_loss(linear.product(w)), w, jax.random.key(seed + 100), None, N, SETTING)
    true = closed_forms.dln(widths, r)
    chains = np.asarray(res.chain_llc)
    return {
        "widths": list(widths),
        "L": len(widths) - 1,
        "r": r,
        "d": closed_forms.dln_params(widths),
        "lambda": true,
        "estimate": round(float(res.llc), 3),
        "chain_sd": round(float(chains.std(ddof=1)), 3),
        "rel_error": round(float(res.llc) / true - 1, 4),
        "step": float(res.step),
        "divergent": int(np.asarray(res.divergent).sum()),
    }


def table(rows) -> str:
    head = "| widths (input first) | L | r | d | λ | λ̂ ± sd over chains | relative error |\n|---|---|---|---|---|---|---|\n"

    def row(x):
        cells = (tuple(x["widths"]), x["L"], x["r"], x["d"], f"{x['lambda']:g}", f"{x['estimate']:.2f} ± {x['chain_sd']:.2f}", f"{x['rel_error']:+.1%}")
        return "| " + " | ".join(map(str, cells)) + " |\n"

    return head + "".join(row(x) for x in rows)


def main() -> None:
    rows = []
    t0 = time.perf_counter()
    for widths, r in CASES:
        rows.append(measure(widths, r))
        print(f"{widths} r={r}: λ={rows[-1]['lambda']:g} λ̂={rows[-1]['estimate']:.2f} ({rows[-1]['rel_error']:+.1%})", file=sys.stderr, flush=True)
    setting = {**SETTING._asdict(), "n": N, "nbeta_used": N / np.log(N)}
    OUT.write_text(json.dumps({"setting": setting, "seconds": round(time.perf_counter() - t0, 1), "cases": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
