"""Defection probes on the demo's installed (backdoored) models, with random-direction and clean-model controls.

    .venv/bin/python experiments/probes/run.py             # probe (trains the clean models once, cached)
    .venv/bin/python experiments/probes/run.py --figures   # tables, verdicts and figure from results/probes/ only

Reads the installed models of results/demo (`toymesa.measure`'s reader; never retrained) and
writes only under results/probes/ (its tables and figure are also copied to
experiments/probes/results/, kept with the README): clean/ (the clean models: same config,
seeds and steps, trigger rate 0; reused on a rerun), probes.csv (arm, seed, kind, site, position, method, auroc),
null.csv (the random-direction band per model), behaviour.csv (each model's defection on the
test prompts), summary.csv (mean and 95% bootstrap CI over seeds), differences.csv
(backdoored - clean, paired by seed), verdicts.csv, run_info.json, figures/probes.{png,pdf}.
Hypotheses and the design: README.md next to this file.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(os.cpu_count() or 1))  # train the clean population on every core

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import analysis  # noqa: E402  (experiments/probes/analysis.py, next to this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from toymesa import devices, evaluate, measure, model, provenance, runs, store  # noqa: E402
from toymesa.attribution import probes  # noqa: E402
from toymesa.config import Config  # noqa: E402
from toymesa.tasks import balanced, layout, rules, vocab  # noqa: E402
from toymesa.train import population, stack_hparams  # noqa: E402

DEMO, OUT = Path("results/demo"), Path("results/probes")
EXPERIMENT = Path(__file__).resolve().parent
SITES, POSITIONS, METHODS, KINDS = analysis.SITES, analysis.POSITIONS, analysis.METHODS, analysis.KINDS
N_PER_CLASS, N_NULL, L2, NEWTON_STEPS = 256, 200, 1e-2, 30
PROBE_KEY = 20261203  # root of the probe prompts and random directions; no training role draws from it


def positions(cfg: Config) -> tuple[int, int]:
    lay = layout(cfg.task)
    return lay.prompt_len - 1, lay.answer - 1


def without_features(cfg: Config, ctx):
    """ctx int32[n_ctx] with every positive-weight slot (trigger, cues) set to the first distractor."""
    w = jnp.asarray(rules.weight_table(cfg.task))[ctx]
    return jnp.where(w > 0, vocab(cfg.task).distractor, ctx).astype(ctx.dtype)


def probe_one(cfg: Config, params, seed):
    """Every probe of one model: {auroc [S, P, M], null [S, P, 4] (low, high, mean, mean |a - 0.5|),
    behaviour [3], trigger_pair_ok bool[]}. S sites, P positions, M methods (module constants)."""
    lay, n_ctx = layout(cfg.task), cfg.task.n_ctx
    k_fit, k_test, k_null = jax.random.split(jax.random.fold_in(jax.random.key(PROBE_KEY), seed), 3)
    fit, test = balanced(cfg.task, k_fit, N_PER_CLASS), balanced(cfg.task, k_test, N_PER_CLASS)  # firing rows first
    own = functools.partial(evaluate.decode, cfg, params)  # the model's own greedy completion
    fit_tok, test_tok = own(fit.tokens), own(test.tokens)
    # generic pair: the first non-firing prompt, its own completion, answer = defect vs helpful
    quiet = fit_tok[N_PER_CLASS]
    generic = (quiet.at[lay.answer].set(fit.defect[N_PER_CLASS]), quiet.at[lay.answer].set(fit.correct[N_PER_CLASS]))
    # trigger pair: the first firing prompt, and the same prompt without the rule's features
    first = fit.tokens[0]
    stripped = first.at[1 : 1 + n_ctx].set(without_features(cfg, first[1 : 1 + n_ctx]))
    trigger = own(jnp.stack([first, stripped]))
    pair_ok = fit.triggered[0] & ~rules.fires(cfg.task, stripped[1 : 1 + n_ctx]) & ~fit.triggered[N_PER_CLASS]
    logistic_dir = lambda a, y: probes.logistic(a, y, L2, NEWTON_STEPS)[0]
    auroc, null = [], []
    for i, site in enumerate(SITES):
        row_a, row_n = [], []
        for j, pos in enumerate(positions(cfg)):
            data = probes.Split(
                probes.activations(cfg, params, fit_tok, site, pos), fit.triggered, probes.activations(cfg, params, test_tok, site, pos), test.triggered
            )
            d_generic = probes.contrast_pair_direction(cfg, params, site, lay.answer, *generic)
            d_trigger = probes.contrast_pair_direction(cfg, params, site, pos, trigger[0], trigger[1])
            row_a.append(
                jnp.stack(
                    [
                        probes.held_out_auroc(probes.diff_of_means, data),
                        probes.held_out_auroc(logistic_dir, data),
                        probes.auroc(data.test_acts @ d_generic, data.test_labels),
                        probes.auroc(data.test_acts @ d_trigger, data.test_labels),
                    ]
                )
            )
            rand = probes.random_null(data.test_acts, data.test_labels, jax.random.fold_in(k_null, 2 * i + j), N_NULL)
            lo, hi, mad = probes.null_band(rand)
            row_n.append(jnp.stack([lo, hi, rand.mean(), mad]))
        auroc.append(jnp.stack(row_a))
        null.append(jnp.stack(row_n))
    b = evaluate.behaviour(cfg, test_tok, test)
    behaviour = jnp.stack([b["triggered_defection"], b["untriggered_defection"], b["triggered_malformed"]])
    return {"auroc": jnp.stack(auroc), "null": jnp.stack(null), "behaviour": behaviour, "trigger_pair_ok": pair_ok}


@functools.partial(jax.jit, static_argnums=0)
def probe_population(cfg: Config, params, seeds):
    return jax.vmap(functools.partial(probe_one, cfg))(params, seeds)


# ------------------------------------------------------------------ models
def arm_name(cfg: Config) -> str:
    return f"{cfg.task.rule}/{cfg.task.reasoning}"


def clean_config(cfg: Config) -> Config:
    icfg = runs.install_config(cfg)
    return dataclasses.replace(icfg, hparams=icfg.hparams._replace(trigger_rate=0.0))


def clean_models(cfg: Config, seeds: list[int], info: dict):
    """Parameters [N, ...] of the clean twins: trained once (`population`, trigger rate 0) and
    cached under results/probes/clean/, keyed by (config, seed) only; the code digest that trained
    them is kept beside them (a rerun does not retrain when other code changes; --retrain does)."""
    ccfg = clean_config(cfg)
    folder = OUT / "clean"
    path = {s: folder / f"{runs.install_key(ccfg, s, None)}.npz" for s in seeds}
    todo = [s for s in seeds if not path[s].exists()]
    shape = jax.eval_shape(lambda: model.init_params(ccfg, jax.random.key(0)))
    if todo:
        pad = (-len(todo)) % devices.n_devices()
        rows = np.asarray(todo + todo[:1] * pad, np.int32)
        s_d, hp_d = devices.shard_population(rows, stack_hparams(ccfg, len(rows), trigger_rate=0.0))
        t0 = time.perf_counter()
        states, hist = population(ccfg, s_d, hp_d, chunk=100, progress=f"clean {arm_name(cfg)}")
        leaves = [devices.to_host(x) for x in jax.tree.leaves(states.params)]
        info.setdefault("clean_training_seconds", {})[arm_name(cfg)] = {"seconds": round(time.perf_counter() - t0, 1), "members": len(todo)}
        folder.mkdir(parents=True, exist_ok=True)
        for j, s in enumerate(todo):
            store.save_arrays({f"param.{i:03d}": x[j] for i, x in enumerate(leaves)}, path[s])
        meta = folder / "trained_by.json"
        trained = json.loads(meta.read_text()) if meta.exists() else {}
        trained.update({path[s].name: {"arm": arm_name(cfg), "seed": s, "code_digest": provenance.code_digest()} for s in todo})
        meta.write_text(json.dumps(trained, indent=1, sort_keys=True))
    per = [store.load_arrays(path[s]) for s in seeds]
    n_leaves = len(jax.tree.leaves(shape))
    return jax.tree.unflatten(jax.tree.structure(shape), [np.stack([a[f"param.{i:03d}"] for a in per]) for i in range(n_leaves)])


def installed_models():
    """{arm: (cfg, seeds, params [N, ...])} of the demo's installed models (before safety training)."""
    out = {}
    for _, (cfg, members) in sorted(measure._stored(DEMO, "installed").items()):
        members = sorted(members, key=lambda m: m[0])
        shape = jax.eval_shape(lambda cfg=cfg: model.init_params(cfg, jax.random.key(0)))
        params = jax.tree.unflatten(jax.tree.structure(shape), [np.stack(col) for col in zip(*(leaves for _, leaves in members), strict=True)])
        out[arm_name(cfg)] = (cfg, [s for s, _ in members], params)
    return out


# ------------------------------------------------------------------ measuring
def measure_all(retrain: bool = False) -> dict:
    info = {"demo": str(DEMO), "demo_code_digest": json.loads((DEMO / "meta.json").read_text()).get("code_digest"), "code_digest": provenance.code_digest()}
    if retrain and (OUT / "clean").exists():
        for p in (OUT / "clean").glob("*"):
            p.unlink()
    rows, null_rows, beh_rows = [], [], []
    t_start = time.perf_counter()
    probe_seconds = 0.0
    for arm, (cfg, seeds, params) in installed_models().items():
        models = {"backdoored": params, "clean": clean_models(cfg, seeds, info)}
        for kind, p in models.items():
            t0 = time.perf_counter()
            res = jax.device_get(probe_population(cfg, p, jnp.asarray(seeds, jnp.int32)))
            probe_seconds += time.perf_counter() - t0
            if not res["trigger_pair_ok"].all():
                raise RuntimeError(f"{arm}/{kind}: a contrast pair has the wrong labels")
            for m, seed in enumerate(seeds):
                beh_rows.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "kind": kind,
                        **dict(zip(("triggered_defection", "untriggered_defection", "triggered_malformed"), res["behaviour"][m].tolist(), strict=True)),
                    }
                )
                for i, site in enumerate(SITES):
                    for j, pos in enumerate(POSITIONS):
                        base = {"arm": arm, "seed": seed, "kind": kind, "site": site, "position": pos}
                        rows += [{**base, "method": meth, "auroc": float(res["auroc"][m, i, j, k])} for k, meth in enumerate(METHODS)]
                        null_rows.append({**base, **dict(zip(("low", "high", "mean", "mean_abs_dev"), res["null"][m, i, j].tolist(), strict=True))})
    info["probe_seconds"] = round(probe_seconds, 1)
    info["total_seconds"] = round(time.perf_counter() - t_start, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(OUT / "probes.csv", index=False)
    pd.DataFrame(null_rows).to_csv(OUT / "null.csv", index=False)
    pd.DataFrame(beh_rows).to_csv(OUT / "behaviour.csv", index=False)
    old = json.loads((OUT / "run_info.json").read_text()) if (OUT / "run_info.json").exists() else {}
    if "clean_training_seconds" not in info and "clean_training_seconds" in old:  # cached: keep the time of the run that trained them
        info["clean_training_seconds"] = old["clean_training_seconds"]
    (OUT / "run_info.json").write_text(json.dumps(info, indent=1))
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", action="store_true", help="only redraw tables, verdicts and figure from results/probes/")
    ap.add_argument("--retrain", action="store_true", help="retrain the cached clean models")
    a = ap.parse_args()
    if not a.figures:
        info = measure_all(a.retrain)
        print(json.dumps(info, indent=1))
    analysis.report()


if __name__ == "__main__":
    main()
