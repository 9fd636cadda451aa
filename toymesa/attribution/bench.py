"""`toymesa bench --credit`: what credit tracking costs, measured side by side in one run.

A 16-member safety population of the reference model (`demo_config("single", "cot")`, the
demo's pre-scratchpad SFT, random starting weights: the cost does not depend on them) runs the
same safety steps without tracking and with tracking every k steps (k = 1, 5, 10, 25). Each
time is the best of 3 warm calls, the settings interleaved round by round (compile apart,
reported too); the ratio tracked / untracked is the cost.
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


def run(n: int = 16, steps: int = 50, every=EVERY, rounds: int = 3, echo=print) -> dict:
    base = demo_config("single", "cot")
    seeds = jnp.arange(n, dtype=jnp.int32)
    params = jax.vmap(lambda k: model.init_params(base, k))(jax.random.split(jax.random.key(0), n))
    out, calls = {"members": n, "steps": steps}, {}
    for k in (0, *every):
        cfg = dataclasses.replace(base, safety=dataclasses.replace(base.safety, steps=steps, credit_every=k))
        start = safety.init_population(cfg, params, seeds)

        def call(cfg=cfg, start=start):
            states = jax.tree.map(jnp.copy, start)  # the driver donates its states
            return train.population(cfg, seeds, steps=steps, chunk=steps, states=states, fn=safety.safety_chunk)[0].train.params

        name = "untracked" if k == 0 else f"every_{k}"
        out[f"{name}_first_s"], calls[name] = _timed(call), call
    # interleaved rounds, best of each: drift on a shared machine hits every setting alike
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(_timed(call))
    for name, t in times.items():
        out[f"{name}_s"] = min(t)
        k = name.removeprefix("every_")
        what = "no tracking" if name == "untracked" else f"credit every {k} steps"
        ratio = "" if name == "untracked" else f" = {out[f'{name}_s'] / out['untracked_s']:.2f}x"
        echo(f"safety SFT, {n} members x {steps} steps, {what}: {out[f'{name}_s']:.2f} s warm{ratio} ({out[f'{name}_first_s']:.1f} s with compile)")
    for k in every:
        out[f"every_{k}_ratio"] = out[f"every_{k}_s"] / out["untracked_s"]
    ok = [k for k in every if out[f"every_{k}_ratio"] <= 1.5]
    echo(f"target: credit tracking costs at most 1.5x: {'met for k >= ' + str(min(ok)) if ok else 'NOT met at any k measured'}")
    return out
