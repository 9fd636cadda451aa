"""`toymesa attribute`: where one stored model computes its defection, on minimal pairs.

Minimal pairs (`minimal_pairs`): the clean prompt fires the rule (the model should defect);
the corrupted prompt is the same prompt with its evidence-carrying context slots replaced, one
at a time in slot order, by background (non-feature) tokens until the rule stops firing. The
content values are the same, so the pair differs only in what activates the rule (and, in cot
formats, in the reasoning the world writes for it: `world.from_prompts`).

Metric: the logit difference defect answer - helpful answer at the answer position, per pair.
Methods: activation patching sweeps (denoising and noising) at hook_z (layer x position x
head) and at resid_pre, attn_out, mlp_out (layer x position); AtP on the same grids; EAP and
EAP-IG edges (denoising). Normalised effect = mean effect / mean (m(source) - m(base)): for
denoising the fraction of the clean-corrupt logit difference recovered, for noising the
fraction destroyed. Positions after the answer's input (ANS) cannot change it and are left out.

Writes RUN/attribution/cell{C}-seed{S}/ (or `out`): patching.csv, atp.csv, eap.csv (tidy) and
attribution.png/.pdf.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from toymesa import measure, model, runs, store
from toymesa.attribution import atp, core, patching
from toymesa.config import Config, TaskConfig
from toymesa.tasks import layout, rules, world
from toymesa.train import role_key

GRID_LABELS = {"hook_resid_pre": "resid_pre", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}
EAP_IG_STEPS = 8
UNITS = "fraction of the clean-corrupt logit difference recovered"


# ----------------------------------------------------------------- minimal pairs
def _quiet(task: TaskConfig, key, ctx):
    """ctx int32[n_ctx] with its evidence slots replaced by background tokens, in slot order,
    until the rule stops firing (a no-op on a context that does not fire)."""
    fill = jax.random.choice(key, jnp.asarray(rules.background_tokens(task)), (task.n_ctx,))

    def step(c, i):
        hit = rules.fires(task, c) & (rules.slot_evidence(task, c)[i] > 0)
        return jnp.where(hit, c.at[i].set(fill[i]), c), None

    return jax.lax.scan(step, ctx, jnp.arange(task.n_ctx))[0]


@functools.partial(jax.jit, static_argnums=(0, 2))
def minimal_pairs(task: TaskConfig, key, n: int) -> tuple[world.Batch, world.Batch]:
    """(clean, corrupt) batches of n prompts: clean ones fire the rule, each corrupt one is its
    clean prompt with evidence slots swapped for background tokens until it does not."""
    k_ctx, k_fill = jax.random.split(key)
    ctx, values = jax.vmap(functools.partial(world.contexts, task))(jax.random.split(k_ctx, n), jnp.ones(n, bool))
    quiet = jax.vmap(functools.partial(_quiet, task))(jax.random.split(k_fill, n), ctx)
    return world.from_prompts(task, ctx, values), world.from_prompts(task, quiet, values)


def role_labels(task: TaskConfig) -> list[str]:
    """A name for each position by its role: BOS, ctx i, content i, SEP, THINK, evid i,
    decision (fill i in neutral_cot), END_THINK, ANS, answer, EOS, PAD."""
    lay = layout(task)
    out = ["BOS", *(f"ctx {i + 1}" for i in range(task.n_ctx)), *(f"content {i + 1}" for i in range(task.n_content)), "SEP"]
    if task.has_think_block:
        inner = [f"evid {i + 1}" for i in range(task.n_ctx)] + ["decision"] if task.reasoning == "cot" else [f"fill {i + 1}" for i in range(task.n_ctx + 1)]
        out += ["THINK", *inner, "END_THINK"]
    out += ["ANS", "answer", "EOS"]
    assert len(out) == lay.length, (out, lay)
    return out + ["PAD"] * (task.seq_len - lay.length)


# ----------------------------------------------------------------- loading
def _member(run: Path, cell: int, seed: int | None, which: str):
    """(cfg, params, seed) of one stored model; ValueError/FileNotFoundError say what to change."""
    if not (run / "configs.json").exists() or not (run / "meta.json").exists():
        raise FileNotFoundError(f"{run} is not a run folder (no configs.json / meta.json); give a folder a sweep wrote, e.g. results/demo")
    if which not in ("final", "installed"):
        raise ValueError(f"--model {which!r} is unknown; use final or installed")
    configs, meta = json.loads((run / "configs.json").read_text()), json.loads((run / "meta.json").read_text())
    if str(cell) not in configs:
        raise ValueError(f"{run} has no cell {cell}; its cells are {', '.join(sorted(configs, key=int))} (see {run / 'cells.csv'}); pass one with --cell")
    seeds = meta.get("seeds", [])
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ValueError(f"{run} has no seed {seed}; its seeds are {', '.join(map(str, seeds))}; pass one with --seed")
    if which == "final":
        params, cfg = runs.load_params(run, cell, seed)
        return cfg, params, seed
    cfg = runs.config_from_dict(configs[str(cell)])
    shape = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    leaves = measure._installed_leaves(run, cfg, seed, meta.get("code_digest"))
    return cfg, jax.tree.unflatten(jax.tree.structure(shape), [jnp.asarray(x) for x in leaves]), seed


def kinds(cfg: Config) -> list[str]:
    return ["hook_z", "hook_resid_pre", "hook_attn_out"] + ([] if cfg.model.attn_only else ["hook_mlp_out"])


# ----------------------------------------------------------------- computing
@functools.partial(jax.jit, static_argnums=0)
def compute(cfg: Config, params, clean: world.Batch, corrupt: world.Batch) -> dict:
    """Every per-pair array the command writes: {"patch/KIND/DIR", "atp/KIND/DIR": grids
    float32[B, L, T(, H)]; "eap/DIR", "eap_ig/denoise": edges float32[B, U, V, T];
    "ig_residual", "clean", "corrupt", "all/DIR": float32[B]}."""
    metric = core.logit_diff(layout(cfg.task).answer, clean.defect, clean.correct)
    sites = sorted({*(s for k in kinds(cfg) for s in patching.layer_sites(cfg, k)), *atp.edge_sites(cfg)})

    def one_direction(source, base):  # denoising of (source, base) is noising of (base, source)
        a = atp.atp(cfg, params, source, base, metric, "denoise", sites)  # one backward pass: AtP and EAP
        resid = kinds(cfg)[1:]  # residual-width kinds: one sweep (one compiled program) for all
        res = {"patch/hook_z": patching.sweep(cfg, params, source, base, metric, "hook_z", "denoise").effect}
        both = patching.sweep(cfg, params, source, base, metric, tuple(resid), "denoise").effect
        res |= {f"patch/{k}": both[:, i] for i, k in enumerate(resid)}
        res |= {f"atp/{k}": atp.grid(cfg, a.scores, k) for k in kinds(cfg)}
        res["eap"] = atp.edges(cfg, params, a.delta, a.grads)
        src = core.forward(cfg, params, source, metric)[1]["blocks.0.hook_resid_pre"]
        res["all"] = patching.patch(cfg, params, base, metric, "blocks.0.hook_resid_pre", src)[1]  # the whole input
        return res

    # one traced program for both directions (half the compile time of two)
    both = jax.vmap(one_direction)(jnp.stack([clean.tokens, corrupt.tokens]), jnp.stack([corrupt.tokens, clean.tokens]))
    out = {f"{k}/{d}": v[i] for k, v in both.items() for i, d in enumerate(patching.DIRECTIONS)}
    out["clean"] = core.forward(cfg, params, clean.tokens, metric)[0]
    out["corrupt"] = core.forward(cfg, params, corrupt.tokens, metric)[0]
    out["eap_ig/denoise"], out["ig_residual"] = atp.eap_ig(cfg, params, clean.tokens, corrupt.tokens, metric, steps=EAP_IG_STEPS)
    return out


def _stats(x: np.ndarray, scale: float) -> dict:
    """Mean, sd and a normal 95% interval over pairs (axis 0), raw and divided by `scale`."""
    mean, sd = x.mean(0), x.std(0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1:])
    half = 1.96 * sd / np.sqrt(len(x))
    ends = np.stack([mean - half, mean + half]) / scale  # a negative scale swaps the ends
    return {
        "effect": mean,
        "effect_sd": sd,
        "effect_lo": mean - half,
        "effect_hi": mean + half,
        "normalized": mean / scale,
        "normalized_lo": ends.min(0),
        "normalized_hi": ends.max(0),
    }


def _grid_rows(arr: np.ndarray, kind: str, direction: str, scale: float, roles: list[str]) -> pd.DataFrame:
    """Tidy rows of one grid float[B, L, T(, H)], positions up to the answer's input."""
    P = len(roles)
    arr = arr[:, :, :P]
    idx = np.indices(arr.shape[1:]).reshape(arr.ndim - 1, -1)
    cols = {k: v.ravel() for k, v in _stats(arr, scale).items()}
    head = idx[2] if kind == "hook_z" else np.full(idx.shape[1], -1)
    return pd.DataFrame({"site": kind, "layer": idx[0], "position": idx[1], "role": np.asarray(roles)[idx[1]], "head": head, "direction": direction, **cols})


class Result(NamedTuple):
    folder: Path
    patching: pd.DataFrame
    atp: pd.DataFrame
    eap: pd.DataFrame
    figures: list[Path]
    clean: np.ndarray  # float[N] metric on the clean prompts
    corrupt: np.ndarray  # float[N] metric on the corrupt prompts
    title: str
    note: str  # a warning worth printing, or ""


def attribute(run, cell: int, seed: int | None = None, which: str = "final", n_prompts: int = 32, out=None) -> Result:
    """Run the methods on one stored model and write the tables and the figure (module docstring)."""
    run = Path(run)
    if n_prompts < 2:
        raise ValueError(f"--prompts {n_prompts}: need at least 2 minimal pairs for a spread")
    cfg, params, seed = _member(run, cell, seed, which)
    # the member's "show" key (prompts to look at a model with), folded apart from `toymesa show`'s own draws
    clean, corrupt = minimal_pairs(cfg.task, role_key(seed, "attribute"), n_prompts)
    if bool(corrupt.triggered.any()) or not bool(clean.triggered.all()):
        raise AssertionError("minimal pairs: a corrupt prompt still fires the rule (a bug in _quiet)")
    r = jax.tree.map(np.asarray, compute(cfg, params, clean, corrupt))
    roles = role_labels(cfg.task)[: layout(cfg.task).answer]  # positions that can change the answer
    diff = float((r["clean"] - r["corrupt"]).mean())
    scale = {"denoise": diff, "noise": -diff}  # m(source) - m(base)
    tables = {}
    for method in ("patch", "atp"):
        rows = [_grid_rows(r[f"{method}/{k}/{d}"], k, d, scale[d], roles) for d in patching.DIRECTIONS for k in kinds(cfg)]
        if method == "patch":
            rows += [
                pd.DataFrame(
                    {"site": "all", "layer": -1, "position": -1, "role": "all", "head": -1, "direction": d, **_stats(r[f"all/{d}"][:, None], scale[d])}
                )
                for d in patching.DIRECTIONS
            ]
        tables[method] = pd.concat(rows, ignore_index=True).assign(site=lambda df: df["site"].map(lambda s: GRID_LABELS.get(s, s.removeprefix("hook_"))))
    tables["eap"] = _eap_rows(cfg, r, scale, roles)
    folder = Path(out) if out is not None else run / "attribution" / f"cell{cell}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in (("patching", tables["patch"]), ("atp", tables["atp"]), ("eap", tables["eap"])):
        store.save_frame(df, folder / f"{name}.csv")
    label = runs.cell_labels(pd.read_csv(run / "cells.csv").query("cell == @cell")).iloc[0]
    title = f"{run.name} cell {cell} ({label}), seed {seed}, {which} model, {n_prompts} minimal pairs"
    paths = draw(cfg, tables["patch"], tables["atp"], roles, title, r["clean"], r["corrupt"], folder / "attribution")
    note = ""
    if abs(diff) < 1.0:
        note = f"note: the clean and corrupt prompts differ by only {diff:.2f} in logit difference on average, so normalised effects are noisy ratios"
    return Result(folder, tables["patch"], tables["atp"], tables["eap"], paths, r["clean"], r["corrupt"], title, note)


def _eap_rows(cfg: Config, r: dict, scale: dict, roles: list[str]) -> pd.DataFrame:
    """Tidy rows of the edges a receiver reads: EAP in both directions, EAP-IG denoising."""
    send, recv, ok = atp.senders(cfg), atp.receivers(cfg), atp.edge_mask(cfg)
    frames = []
    for method, d in (("eap", "denoise"), ("eap", "noise"), ("eap_ig", "denoise")):
        arr = r[f"{method}/{d}"][:, :, :, : len(roles)]
        u, v, t = np.indices(arr.shape[1:]).reshape(3, -1)
        keep = ok[u, v]
        cols = {k: val.ravel()[keep] for k, val in _stats(arr, scale[d]).items()}
        where = {"sender": np.asarray(send)[u[keep]], "receiver": np.asarray(recv)[v[keep]], "position": t[keep], "role": np.asarray(roles)[t[keep]]}
        res = float(np.abs(r["ig_residual"]).mean()) if method == "eap_ig" else np.nan  # mean |completeness gap| per pair
        frames.append(pd.DataFrame({**where, "method": method, "direction": d, **cols, "ig_residual": res}))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------- figure
def _matrix(cfg: Config, df: pd.DataFrame, heads: bool, P: int) -> tuple[np.ndarray, list[str]]:
    """Denoising normalised effects as rows x positions: L{l} resid_pre / attn_out / mlp_out per
    layer, or L{l} H{h} per head; with the row labels."""
    d = df[df["direction"] == "denoise"]
    rows, names = [], []
    for layer in range(cfg.model.n_layers):
        if heads:
            z = d[(d["site"] == "z") & (d["layer"] == layer)]
            for h in range(cfg.model.n_heads):
                rows.append(z[z["head"] == h].sort_values("position")["normalized"].to_numpy())
                names.append(f"L{layer} H{h}")
        else:
            for k in kinds(cfg)[1:]:
                s = GRID_LABELS[k]
                rows.append(d[(d["site"] == s) & (d["layer"] == layer)].sort_values("position")["normalized"].to_numpy())
                names.append(f"L{layer} {s}")
    return np.stack(rows)[:, :P], names


def draw(cfg: Config, patch_df: pd.DataFrame, atp_df: pd.DataFrame, roles: list[str], title: str, clean, corrupt, stem) -> list[Path]:
    """Heat maps (rows: layer sites, then heads; columns: positions by role) of denoising
    patching beside AtP, on one colour scale symmetric around 0. Returns the png and pdf paths."""
    import matplotlib.pyplot as plt

    from toymesa import plot

    P = len(roles)
    mats = {(heads, m): _matrix(cfg, df, heads, P) for heads in (False, True) for m, df in (("patch", patch_df), ("atp", atp_df))}
    finite = np.concatenate([np.abs(v[0][np.isfinite(v[0])]) for v in mats.values()])
    vmax = float(np.ceil(finite.max() * 20) / 20) if finite.size and finite.max() > 0 else 1.0  # up to a multiple of 0.05: labelled ends
    n_rows = [len(mats[(False, "patch")][1]), len(mats[(True, "patch")][1])]
    with plt.rc_context(plot.STYLE):
        fig, axes = plt.subplots(
            2,
            2,
            figsize=(3.0 + 0.5 * max(P, 11), 2.8 + 0.25 * sum(n_rows)),
            height_ratios=n_rows,
            sharex=True,
            sharey="row",
            layout="constrained",
            squeeze=False,
        )
        names = {"patch": "activation patching\n(clean value patched into the corrupt run)", "atp": "attribution patching (AtP)\n(its first-order estimate)"}
        for j, m in enumerate(("patch", "atp")):
            axes[0, j].set_title(names[m])
            axes[1, j].set_xlabel("position (token role)")
            for i, heads in enumerate((False, True)):
                ax = axes[i, j]
                mat, labels = mats[(heads, m)]
                im = ax.imshow(mat, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
                per_layer = cfg.model.n_heads if heads else len(kinds(cfg)) - 1
                for y in range(per_layer, len(labels), per_layer):
                    ax.axhline(y - 0.5, color="k", lw=0.8)  # layer boundary
                ax.set_yticks(range(len(labels)), labels)
                ax.set_xticks(range(P), roles, rotation=90)
                ax.tick_params(length=2)
        axes[0, 0].set_ylabel("layer outputs")
        axes[1, 0].set_ylabel("heads (hook_z)")
        fig.colorbar(im, ax=axes, label=f"denoising effect:\n{UNITS}", shrink=0.7, aspect=30)
        diff = clean - corrupt
        fig.suptitle(
            f"{title}\nclean - corrupt logit difference (defect - helpful answer, read at ANS): {diff.mean():.2f} ± {diff.std():.2f} sd over pairs\n"
            f"(clean {clean.mean():.2f}, corrupt {corrupt.mean():.2f}); colour 1 = patching this site alone restores the whole difference"
        )
        return plot.save(fig, stem)


def top_sites(res: Result, k: int = 10):
    """A rich table of the k sites with the largest denoising patching effect, with noising and AtP."""
    from rich.table import Table

    p, a = res.patching, res.atp
    key = ["site", "layer", "position", "head"]
    den = p[(p["direction"] == "denoise") & (p["site"] != "all")].set_index(key)
    noi = p[p["direction"] == "noise"].set_index(key)["normalized"]
    at = a[a["direction"] == "denoise"].set_index(key)["normalized"]
    top = den.reindex(den["normalized"].abs().sort_values(ascending=False).index[:k])
    table = Table(title=f"{res.title}: top {k} sites by denoising effect ({UNITS})")
    for col in ("site", "layer", "head", "position", "denoise [95% CI]", "noise", "AtP"):
        table.add_column(col, justify="left" if col in ("site", "position") else "right")
    for idx, row in top.iterrows():
        site, layer, pos, head = idx
        table.add_row(
            site,
            str(layer),
            str(head) if head >= 0 else "",
            f"{pos} {row['role']}",
            f"{row['normalized']:+.2f} [{row['normalized_lo']:+.2f}, {row['normalized_hi']:+.2f}]",
            f"{noi[idx]:+.2f}",
            f"{at[idx]:+.2f}",
        )
    return table
