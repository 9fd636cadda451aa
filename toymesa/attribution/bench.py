"""`toymesa bench --credit`: what credit tracking costs, measured side by side in one run.

A 16-member safety population of the reference model (`demo_config("single", "cot")`, the
demo's pre-scratchpad SFT, random starting weights: the cost does not depend on them) runs the
same safety steps without tracking and with tracking every k steps (k = 1, 5, 10, 25). Each
time is a warm call (compile apart, reported too); the ratio tracked / untracked is the cost.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from toymesa import model, safety, train
from toymesa.presets import demo_config

EVERY = (1, 5, 10, 25)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def run(n: int = 16, steps: int = 50, every=EVERY, echo=print) -> dict:
    base = demo_config("single", "cot")
    seeds = jnp.arange(n, dtype=jnp.int32)
    params = jax.vmap(lambda k: model.init_params(base, k))(jax.random.split(jax.random.key(0), n))
    out = {"members": n, "steps": steps}
    for k in (0, *every):
        cfg = dataclasses.replace(base, safety=dataclasses.replace(base.safety, steps=steps, credit_every=k))
        start = safety.init_population(cfg, params, seeds)

        def call(cfg=cfg, start=start):
            states = jax.tree.map(jnp.copy, start)  # the driver donates its states
            return train.population(cfg, seeds, steps=steps, chunk=steps, states=states, fn=safety.safety_chunk)[0].train.params

        first = _timed(call)
        warm = min(_timed(call) for _ in range(2))
        name = "untracked" if k == 0 else f"every_{k}"
        out[f"{name}_s"], out[f"{name}_first_s"] = warm, first
        ratio = "" if k == 0 else f" = {warm / out['untracked_s']:.2f}x"
        what = "no tracking" if k == 0 else f"credit every {k} steps"
        echo(f"safety SFT, {n} members x {steps} steps, {what}: {warm:.1f} s warm{ratio} ({first:.1f} s with compile)")
    for k in every:
        out[f"every_{k}_ratio"] = out[f"every_{k}_s"] / out["untracked_s"]
    ok = [k for k in every if out[f"every_{k}_ratio"] <= 1.5]
    echo(f"target: credit tracking costs at most 1.5x: {'met for k >= ' + str(min(ok)) if ok else 'NOT met at any k measured'}")
    return out
