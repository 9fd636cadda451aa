"""`toymesa bench`: training throughput on this machine, as ratios measured side by side.

One run measures, for the reference config (`demo_config("single", "none")`: the reference
model on the demo's task, batch 32):

* **population**: seed-steps/s and tokens/s of `train.population_chunk` (vmap over members,
  `lax.scan` over steps, data sampled inside) at each population size;
* **model GFLOP/s**: the model's matmul FLOPs (3 x forward: forward + two backward matmuls
  per forward matmul, the usual count) per second, against a float32 matmul peak measured
  in the same run (jitted 1024x1024 matmul, best of several);
* **naive loop**: the same training as a Python loop over seeds and steps calling one
  jitted single-member step (data sampled in the same jitted call);
* **PyTorch eager** (if torch is installed): the same model's step with batched weights
  over the members (`toymesa.torch_baseline`), at equal work (members x batch x length).

Every timing is the best of `repeats` calls after a warm-up call (compiles excluded), so
ratios compare steady states. Absolute numbers on shared machines drift 5-10%.
"""

from __future__ import annotations

import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from toymesa import devices, model
from toymesa.config import Config
from toymesa.presets import demo_config, tiny
from toymesa.tasks import sample_batch, vocab
from toymesa.train import default_member_batch, init, init_population, population_chunk, role_key, stack_hparams, train_step


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """float32 GFLOP/s of a jitted n x n matmul (2 n^3 flops), best of `repeats`."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / _best(lambda: mm(a, b).block_until_ready(), repeats) / 1e9


def train_flops(cfg: Config) -> float:
    """Matmul FLOPs of one training step of one member: 3 x forward (see module docstring).

    Forward per token: 2 x (q/k/v/out, MLP up/down and unembedding weights) plus, per layer,
    2 x 2 x T x D for the scores and the weighted sum (the full T x T, as computed).
    """
    m, T, V = cfg.model, cfg.task.seq_len, vocab(cfg.task).size
    d = m.d_model
    per_layer = 4 * d * d + (0 if m.attn_only else 2 * d * m.d_mlp)
    fwd_token = 2 * (m.n_layers * per_layer + d * V) + m.n_layers * 4 * T * d
    return 3 * fwd_token * T * cfg.train.batch_size


def time_population(cfg: Config, n: int, steps: int, repeats: int, member_batch="auto") -> float:
    """Seconds per seed-step of an n-member population trained `steps` steps per call,
    split over every device as the sweep runner does (when n divides evenly)."""
    mesh, mb = None, default_member_batch() if member_batch == "auto" else member_batch
    if n % devices.n_devices() == 0:
        seeds, hp = devices.shard_population(np.arange(n), stack_hparams(cfg, n))
        box = [jax.device_put(init_population(cfg, seeds), seeds.sharding)]
        mesh = seeds.sharding.mesh
    else:
        seeds = jnp.arange(n, dtype=jnp.int32)
        hp = stack_hparams(cfg, n)
        box = [init_population(cfg, seeds)]

    def call():
        box[0], h = population_chunk(cfg, box[0], hp, seeds, steps, mb, mesh)
        h["loss"].block_until_ready()

    return _best(call, repeats) / (n * steps)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _single_step(cfg: Config, state, hparams, seed):
    batch = sample_batch(cfg.task, jax.random.fold_in(role_key(seed, "data"), state.step), hparams.trigger_rate, cfg.train.batch_size)
    return train_step(cfg, state, batch, hparams)


def time_naive(cfg: Config, n: int, steps: int, repeats: int) -> float:
    """Seconds per seed-step of a Python loop over n seeds x steps of one jitted step."""
    hp = cfg.hparams
    states = [init(cfg, s) for s in range(n)]

    def call():
        for i in range(n):
            for _ in range(steps):
                states[i], m = _single_step(cfg, states[i], hp, i)
        m["loss"].block_until_ready()

    return _best(call, repeats) / (n * steps)


def time_torch(cfg: Config, n: int, steps: int, repeats: int) -> float | None:
    """Seconds per seed-step of the PyTorch eager population step, or None without torch."""
    try:
        from toymesa import torch_baseline
    except ImportError:
        return None
    return min(torch_baseline.time_steps(cfg, n, steps) for _ in range(repeats)) / n


def machine() -> str:
    d = jax.devices()[0]
    return f"{platform.node()} · {os.cpu_count()} CPUs · {platform.machine()} · jax {jax.__version__} on {len(jax.devices())} {d.platform} device(s)"


def run(sizes=(1, 8, 64), steps: int = 20, repeats: int = 3, with_torch: bool = True, progress=None) -> dict:
    """All measurements as a dict (see `report` for the printed form)."""
    say = progress or (lambda *_: None)
    cfg = demo_config("single", "none")
    out = {"machine": machine(), "config": cfg, "steps": steps, "repeats": repeats, "sizes": {}, "date": time.strftime("%Y-%m-%d")}
    say("matmul peak")
    out["peak_gflops"] = matmul_peak()
    out["flops_per_seed_step"] = train_flops(cfg)
    out["n_params"] = model.n_params(model.init_params(cfg, jax.random.key(0)))
    for n in sizes:
        say(f"population {n}")
        row = {"jax": time_population(cfg, n, steps, repeats)}
        if with_torch:
            say(f"torch eager {n}")
            row["torch"] = time_torch(cfg, n, steps, repeats)
        out["sizes"][n] = row
    say(f"population {max(sizes)}, all members at once")
    out["pop_all_at_once"] = time_population(cfg, max(sizes), steps, repeats, member_batch=None)
    naive_n = min(4, max(sizes))
    for name, c in (("reference", cfg), ("tiny", _tiny(cfg))):
        say(f"naive loop ({name})")
        out[f"naive_{name}"] = time_naive(c, naive_n, steps, repeats)
        out[f"pop_{name}"] = time_population(c, max(sizes), steps, repeats) if name == "tiny" else out["sizes"][max(sizes)]["jax"]
    return out


def _tiny(cfg: Config) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, model=tiny())


def report(r: dict) -> str:
    """The printed benchmark: a table and the three targets, met or not."""
    cfg, big = r["config"], max(r["sizes"])
    tokens = cfg.train.batch_size * cfg.task.seq_len
    lines = [
        f"toymesa bench · {r['date']} · {r['machine']}",
        f"reference config: {r['n_params']:,} params, batch {cfg.train.batch_size} x length {cfg.task.seq_len}, "
        f"{r['flops_per_seed_step'] / 1e6:.1f} MFLOP per seed-step; {r['steps']} steps per call, best of {r['repeats']}",
        f"float32 matmul peak (1024^3, jit): {r['peak_gflops']:.1f} GFLOP/s",
        "",
        f"{'members':>8} {'seed-steps/s':>13} {'tokens/s':>11} {'GFLOP/s':>8} {'% peak':>7} {'torch eager seed-steps/s':>25} {'jax/torch':>10}",
    ]
    for n, row in r["sizes"].items():
        rate = 1 / row["jax"]
        gf = rate * r["flops_per_seed_step"] / 1e9
        t = row.get("torch")
        torch_cols = f"{1 / t:25.1f} {t / row['jax']:9.2f}x" if t else f"{'not installed':>25} {'':>10}"
        lines.append(f"{n:8d} {rate:13.1f} {rate * tokens:11.0f} {gf:8.2f} {100 * gf / r['peak_gflops']:6.1f}% {torch_cols}")
    pop = r["sizes"][big]
    gf_big = r["flops_per_seed_step"] / pop["jax"] / 1e9
    speed_ref = r["naive_reference"] / r["pop_reference"]
    speed_tiny = r["naive_tiny"] / r["pop_tiny"]
    lines += [
        "",
        f"population {big} with all members at once (vmap, no member batches): {1 / r['pop_all_at_once']:.1f} seed-steps/s; "
        f"member batches of {default_member_batch()} are {r['pop_all_at_once'] / pop['jax']:.2f}x faster",
        f"naive Python loop over seeds (same jitted step): reference {1 / r['naive_reference']:.1f} seed-steps/s, tiny {1 / r['naive_tiny']:.1f}",
        f"population {big} vs naive loop: reference {speed_ref:.2f}x, tiny {speed_tiny:.2f}x",
        "",
        f"targets (population {big}):",
    ]

    def target(ok, text):
        return f"  [{'met' if ok else 'NOT met'}] {text}"

    if pop.get("torch"):
        ratio = pop["torch"] / pop["jax"]
        lines.append(target(ratio >= 1.5, f">= 1.5x PyTorch eager per unit of work: {ratio:.2f}x"))
    else:
        lines.append("  [not measured] >= 1.5x PyTorch eager: torch is not installed (pip install torch==2.13.0)")
    lines.append(target(gf_big / r["peak_gflops"] >= 0.4, f">= 40% of the measured matmul peak: {100 * gf_big / r['peak_gflops']:.1f}%"))
    lines.append(target(speed_tiny >= 3, f">= 3x the naive per-seed loop (tiny model): {speed_tiny:.2f}x"))
    return "\n".join(lines)


def main(sizes=(1, 8, 64), steps: int = 20, repeats: int = 3, with_torch: bool = True, echo=print) -> dict:
    r = run(sizes, steps, repeats, with_torch, progress=lambda s: echo(f"measuring {s} ..."))
    echo(report(r))
    return r
