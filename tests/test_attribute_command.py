"""`toymesa attribute`: minimal pairs, the tables and figure it writes on a tiny stored run, and
one clear line (exit 2) for each kind of bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from toymesa import cli, model, runs, spec, store, sweep
from toymesa.attribution import command
from toymesa.config import TaskConfig
from toymesa.tasks import layout, rules

COLUMNS = [
    "site",
    "layer",
    "position",
    "role",
    "head",
    "direction",
    "effect",
    "effect_sd",
    "effect_lo",
    "effect_hi",
    "normalized",
    "normalized_lo",
    "normalized_hi",
]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A stored run as `toymesa.sweep` lays it out (cells.csv, configs.json, meta.json, a chunk
    of parameters), of one cell (single trigger, chain of thought, tiny model) and one seed,
    with freshly initialised parameters: the command reads models, it does not need trained ones."""
    out = tmp_path_factory.mktemp("attribute") / "run"
    raw = {"name": "tinyattr", "seeds": [3], "base": {"model": "tiny", "task": {"rule": "single", "reasoning": "cot", "seq_len": "min"}}}
    cells = spec.parse(raw).cells()
    store.save_frame(sweep._cells_frame(cells), out / "cells.csv")
    store.save_json({c.index: dataclasses.asdict(c.config) | {"hparams": c.config.hparams._asdict()} for c in cells}, out / "configs.json")
    store.save_json({"seeds": [3], "code_digest": None}, out / "meta.json")
    leaves = jax.tree.leaves(model.init_params(cells[0].config, jax.random.key(3)))
    store.save_arrays(
        {"cell": np.array([0]), "seed": np.array([3]), **{f"param.{i:03d}": np.asarray(x)[None] for i, x in enumerate(leaves)}}, out / "chunks" / "c0.npz"
    )
    return out


def attribute(*args):
    return CliRunner().invoke(cli.app, ["attribute", *map(str, args)])


def test_attribute_writes_tidy_tables_and_a_figure(run_folder):
    r = attribute(run_folder, "--cell", 0, "--prompts", 4)
    assert r.exit_code == 0, r.output
    folder = run_folder / "attribution" / "cell0-seed3"  # the run's first seed by default
    for name in ("patching.csv", "atp.csv", "eap.csv", "attribution.png", "attribution.pdf"):
        assert (folder / name).stat().st_size > 0, name
    assert "top 10 sites" in " ".join(r.output.split())
    patch, atp = pd.read_csv(folder / "patching.csv"), pd.read_csv(folder / "atp.csv")
    assert list(patch.columns) == COLUMNS and list(atp.columns) == COLUMNS
    assert set(patch["site"]) == {"z", "resid_pre", "attn_out", "mlp_out", "all"} and set(patch["direction"]) == {"denoise", "noise"}
    ans = layout(runs.config_from_dict(json.loads((run_folder / "configs.json").read_text())["0"]).task).answer
    assert patch.loc[patch["site"] != "all", "position"].max() == ans - 1  # up to the answer's input, ANS
    assert {"BOS", "ctx 1", "SEP", "THINK", "evid 1", "decision", "END_THINK", "ANS"} <= set(patch["role"])
    for df in (patch, atp):
        assert (df["normalized_lo"] <= df["normalized"]).all() and (df["normalized"] <= df["normalized_hi"]).all()
    everything = patch[patch["site"] == "all"].set_index("direction")["normalized"]
    np.testing.assert_allclose(everything[["denoise", "noise"]], 1.0, rtol=1e-4)  # patching the whole input moves all of it
    # the bookkeeping keeps the chain rule: a head's EAP edges, summed over receivers, are its AtP
    eap = pd.read_csv(folder / "eap.csv")
    assert {"sender", "receiver", "method", "ig_residual"} <= set(eap.columns) and set(eap["method"]) == {"eap", "eap_ig"}
    e = eap[(eap["method"] == "eap") & (eap["direction"] == "denoise") & (eap["sender"] == "L0.H1")].groupby("position")["effect"].sum()
    a = atp[(atp["site"] == "z") & (atp["direction"] == "denoise") & (atp["head"] == 1)].set_index("position")["effect"]
    np.testing.assert_allclose(e.to_numpy(), a.loc[e.index].to_numpy(), rtol=1e-4, atol=1e-5 * a.abs().max())


def test_bad_input_gives_one_line_saying_what_to_change(run_folder, tmp_path):
    r = attribute(run_folder, "--cell", 9)
    assert r.exit_code == 2 and "has no cell 9" in r.output and "its cells are 0" in r.output and "--cell" in r.output
    r = attribute(run_folder, "--cell", 0, "--seed", 99)
    assert r.exit_code == 2 and "has no seed 99" in r.output and "its seeds are 3" in r.output
    r = attribute(tmp_path, "--cell", 0)
    assert r.exit_code == 2 and "not a run folder" in r.output
    r = attribute(run_folder, "--cell", 0, "--model", "installed")
    assert r.exit_code == 2 and "use --model final" in r.output
    r = attribute(run_folder, "--cell", 0, "--model", "best")
    assert r.exit_code == 2 and "use final or installed" in r.output
    assert all(len(x.splitlines()) <= 2 for x in (r.output,))  # one line (the console may wrap it once)


def _fires(task, ctx: np.ndarray) -> np.ndarray:
    """The rule on contexts int[N, n_ctx], in NumPy (an independent reading of `rules.fires`)."""
    if task.rule == "latent":
        return rules.weight_table(task)[ctx].sum(1) >= task.latent_threshold
    present = (ctx[:, :, None] == rules.active_triggers(task)[None, None, :]).any(1)
    return present.sum(1) >= rules.threshold(task)


def test_minimal_pairs_differ_only_in_what_activates_the_rule():
    tasks = [TaskConfig(rule=rule, reasoning="cot") for rule in ("single", "k_triggers", "conjunction", "latent")]
    pairs = jax.jit(lambda key: [command.minimal_pairs(task, key, 16) for task in tasks])(jax.random.key(0))  # one compile
    for task, (clean, corrupt) in zip(tasks, pairs, strict=True):
        assert bool(clean.triggered.all()) and not bool(corrupt.triggered.any()), task.rule
        p = task.prompt_len
        ctx_c, ctx_r = np.asarray(clean.tokens[:, 1 : 1 + task.n_ctx]), np.asarray(corrupt.tokens[:, 1 : 1 + task.n_ctx])
        np.testing.assert_array_equal(clean.tokens[:, 1 + task.n_ctx : p], corrupt.tokens[:, 1 + task.n_ctx : p])  # same content, SEP
        np.testing.assert_array_equal(clean.correct, corrupt.correct)
        changed = ctx_c != ctx_r
        assert changed.any(axis=1).all()
        weight = rules.weight_table(task)[ctx_c]  # per-slot evidence (no rule here has a fixed trigger slot)
        assert (weight[changed] > 0).all(), task.rule  # only evidence slots were replaced ...
        assert np.isin(ctx_r[changed], rules.background_tokens(task)).all()  # ... by background tokens ...
        last = changed.shape[1] - 1 - np.argmax(changed[:, ::-1], axis=1)
        undo = ctx_r.copy()
        undo[np.arange(len(undo)), last] = ctx_c[np.arange(len(undo)), last]
        assert _fires(task, undo).all() and not _fires(task, ctx_r).any(), task.rule  # ... and no more than it took to stop firing


def test_role_labels_name_every_position_of_each_format():
    for reasoning in ("none", "cot", "neutral_cot", "distilled"):
        task = TaskConfig(reasoning=reasoning)
        roles = command.role_labels(task)
        lay = layout(task)
        assert len(roles) == task.seq_len and roles[0] == "BOS" and roles[lay.answer - 1] == "ANS" and roles[lay.answer] == "answer"
        assert ("decision" in roles) == (reasoning == "cot") and ("THINK" in roles) == task.has_think_block


def test_help_does_not_import_jax():
    code = (
        "import sys; from typer.testing import CliRunner; from toymesa import cli\n"
        "r = CliRunner().invoke(cli.app, ['attribute', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert len(r.output.splitlines()) <= 40, r.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
