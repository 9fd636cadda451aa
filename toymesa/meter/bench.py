"""`toymesa bench --meters`: the meters' cost on this machine, measured side by side in one run.

* **one LLC**: λ̂ of one reference model (`demo_config("single", "none")`, freshly initialised:
  the cost does not depend on the weights) with 4 chains x 2,000 draws after 200 burn-in steps,
  minibatch 32 of a fixed set of 1,024 sequences, automatic step size, no ε-plateau runs (they
  triple the cost). Seconds, compile included and apart.
* **population vs sequential**: the LLC of 8 models x 4 chains (200 draws each) as one compiled
  program (`llc_population`), against 8 calls of the single-model program (compiled once,
  reused): the ratio of the two steady-state times.
* **prequential**: the code length of one behaviour with 11 Voita-Titov blocks x 1 data order
  (11 block models trained from scratch as one population; n = 4,096, the config's steps).

Times are wall seconds of a warm call unless said otherwise; absolute numbers on shared
machines drift 5-10%, ratios less.
"""

from __future__ import annotations

import time

import jax

from toymesa import model
from toymesa.meter import prequential, target
from toymesa.meter.llc import Settings, llc, llc_population
from toymesa.presets import demo_config

ONE = Settings(chains=4, draws=2000, burn_in=200, batch=32, plateau=False)
POP = Settings(chains=4, draws=200, burn_in=0, batch=32, plateau=False, thin=10)


def _timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def run(n_models: int = 8, echo=print) -> dict:
    cfg = demo_config("single", "none")
    loss = target.sequence_loss(cfg)
    seeds = list(range(n_models))
    params = [model.init_params(cfg, jax.random.key(s)) for s in seeds]
    data = [target.fixed_set(cfg, s, 1024) for s in seeds]
    keys = jax.random.split(jax.random.key(0), n_models)
    out = {"n_params": model.n_params(params[0])}

    one = jax.jit(lambda p, k, d, s=ONE: llc(loss, p, k, d, settings=s))
    out["llc_one_first_s"] = _timed(lambda: one(params[0], keys[0], data[0]).llc)
    out["llc_one_s"] = _timed(lambda: one(params[0], keys[0], data[0]).llc)
    echo(f"one LLC (4 chains x 2,000 draws): {out['llc_one_s']:.1f} s warm, {out['llc_one_first_s']:.1f} s with compile")

    single = jax.jit(lambda p, k, d: llc(loss, p, k, d, settings=POP))
    stacked = jax.tree.map(lambda *x: jax.numpy.stack(x), *params)
    data_s = jax.tree.map(lambda *x: jax.numpy.stack(x), *data)
    single(params[0], keys[0], data[0]).llc.block_until_ready()  # compile
    llc_population(loss, stacked, keys, data_s, settings=POP).llc.block_until_ready()  # compile
    out["llc_sequential_s"] = _timed(lambda: [single(p, k, d).llc for p, k, d in zip(params, keys, data, strict=True)])
    out["llc_population_s"] = _timed(lambda: llc_population(loss, stacked, keys, data_s, settings=POP).llc)
    out["population_speedup"] = out["llc_sequential_s"] / out["llc_population_s"]
    pop, seq = out["llc_population_s"], out["llc_sequential_s"]
    echo(f"{n_models} models x 4 chains x 200 draws: one program {pop:.1f} s, {n_models} sequential calls {seq:.1f} s: {seq / pop:.2f}x")

    out["preq_first_s"] = _timed(lambda: prequential.prequential(cfg, 0, orders=1).value)
    out["preq_s"] = _timed(lambda: prequential.prequential(cfg, 0, orders=1).value)
    echo(f"prequential code (11 blocks x 1 order, {cfg.train.steps} steps each): {out['preq_s']:.1f} s warm, {out['preq_first_s']:.1f} s with compile")
    return out
