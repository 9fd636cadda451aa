"""The sweep runner: chunk plans, resuming, device sharding, the run folder.

Every sweep here uses one tiny spec (fixed shapes), so the in-process runs share compiled
programs. Two tests run sweeps in subprocesses: one on 4 forced CPU devices, one killed
with SIGKILL mid-run and resumed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from toymesa import model, runs, spec, store, sweep
from toymesa.tasks import sample_batch
from toymesa.train import population

ROOT = Path(__file__).resolve().parents[1]

SPEC_TEXT = """
name = "tiny_sweep"
seeds = [0, 1, 2]

[base]
model = "tiny"
task.seq_len = "min"
train.batch_size = 8
train.steps = {steps}
train.warmup_steps = 2

[grid]
hparams.lr = [1e-3, 3e-3]

[run]
eval_every = {every}
eval_prompts = 16
chunk_members = {chunk}
"""


def write_spec(path: Path, steps=6, every=3, chunk=2) -> Path:
    path.write_text(SPEC_TEXT.format(steps=steps, every=every, chunk=chunk))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted in-process sweep: (spec, run folder)."""
    tmp = tmp_path_factory.mktemp("sweep")
    s = spec.load(write_spec(tmp / "spec.toml"))
    return s, sweep.run(s, tmp / "out", progress=False, echo=lambda *_: None)


def subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def log_names(out: Path) -> list[str]:
    path = out / "log.jsonl"
    return [json.loads(line)["chunk"] for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------- plans
def test_plan_covers_every_member_once_padded_to_the_devices(finished):
    s, _ = finished
    for n_dev in (1, 4):
        chunks = sweep.plan(s, n_devices=n_dev)
        members = [(cell, seed) for c in chunks for cell, seed in zip(c.cells, c.seeds, strict=True)]
        assert sorted(members) == sorted((c.index, seed) for c in s.cells() for seed in s.seeds)
        assert all(c.n <= s.run["chunk_members"] and c.size % n_dev == 0 and c.size >= c.n for c in chunks)
        assert len({c.name for c in chunks}) == len(chunks)


def test_eval_steps_and_segments():
    cfg = spec.resolve({"train.steps": 10, "train.warmup_steps": 1})
    assert sweep.eval_steps(cfg, {"eval_every": None}) == [10]
    assert sweep.eval_steps(cfg, {"eval_every": 4}) == [0, 4, 8, 10]
    assert sweep._segment(500) == 100 and sweep._segment(300) == 100 and sweep._segment(250) == 50
    assert sweep._segment(97) == 97  # prime: one call rather than 97 calls of one step


# ----------------------------------------------------------------- the run folder
def test_run_folder_tidy_table_and_metadata(finished):
    s, out = finished
    df = runs.load(out)
    at = [0, 3, 6]
    assert len(df) == len(s.cells()) * len(s.seeds) * len(at)
    assert sorted(df["step"].unique()) == at
    assert df.loc[df["step"] == 0, "loss"].isna().all() and df.loc[df["step"] > 0, "loss"].notna().all()
    for m in ("triggered_defection", "untriggered_defection", "helpful_accuracy"):
        assert df[m].between(0, 1).all()
    assert set(df["hparams.lr"].round(6)) == {0.001, 0.003} and (df["model.d_model"] == 32).all()
    meta = store.load_json(out / "meta.json")
    assert meta["digest"] == s.digest and meta["versions"]["jax"] == jax.__version__ and meta["devices"]["n_devices"] >= 1
    assert "git_commit" in meta
    assert (out / "spec.toml").read_text() == s.text
    summary = runs.load(out / "summary.csv")
    assert len(summary) == len(s.cells()) and (summary["n"] == len(s.seeds)).all()
    assert not list(out.rglob("*.tmp"))


def test_last_step_keeps_one_row_per_member_at_its_final_step(finished):
    _, out = finished
    df = runs.load(out)
    last = runs.last_step(df)
    assert len(last) == len(df.groupby(["cell", "seed"])) and (last["step"] == 6).all()


def test_training_metric_is_the_window_mean_of_the_history(finished):
    _, out = finished
    df = runs.load(out)
    members, hist = runs.load_histories(out)
    for i, (cell, seed) in enumerate(zip(members["cell"], members["seed"], strict=True)):
        row = df[(df["cell"] == cell) & (df["seed"] == seed) & (df["step"] == 6)]
        np.testing.assert_allclose(row["loss"].item(), hist["loss"][i, 3:6].mean(), rtol=1e-6)


@pytest.mark.slow  # 14 s: retrains a member from scratch
def test_stored_parameters_are_the_trained_member(finished):
    s, out = finished
    cell = s.cells()[1]
    params, cfg = runs.load_params(out, cell.index, seed=2)
    assert cfg == cell.config
    hp = type(cfg.hparams)(*(np.asarray([v], np.float32) for v in cfg.hparams))
    states, _ = population(cfg, [2], hp)
    # compare the functions, not the leaves: the q/k/v key bias has zero true gradient, so
    # Adam turns float noise into drift there that softmax removes (see test_train)
    tokens = sample_batch(cfg.task, jax.random.key(5), 0.5, 8).tokens
    ours, _ = model.apply(cfg, params, tokens)
    theirs, _ = model.apply(cfg, jax.tree.map(lambda x: x[0], states.params), tokens)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="no finished member"):
        runs.load_params(out, cell.index, seed=99)


def test_rerun_computes_nothing_and_changes_nothing(finished, tmp_path):
    s, out = finished
    before = log_names(out)
    table = runs.load(out)
    messages = []
    sweep.run(s, out, progress=False, echo=messages.append)
    assert log_names(out) == before and any("resuming" in m for m in messages)
    pd.testing.assert_frame_equal(runs.load(out), table)


def test_a_different_spec_refuses_the_folder(finished, tmp_path):
    _, out = finished
    other = spec.load(write_spec(tmp_path / "spec.toml", steps=9))
    with pytest.raises(spec.SpecError, match="different spec"):
        sweep.run(other, out, progress=False)


def test_partial_results_load(finished, tmp_path):
    s, out = finished
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("meta.json", "cells.csv"):
        (partial / name).write_bytes((out / name).read_bytes())
    (partial / "chunks").mkdir()
    first = runs.chunk_files(out)[0]
    (partial / "chunks" / first.name).write_bytes(first.read_bytes())
    df = runs.load(partial)
    assert 0 < len(df) < len(runs.load(out))


# ----------------------------------------------------------------- subprocesses
def compare_runs(a: Path, b: Path, exact: bool):
    da, db = runs.load(a), runs.load(b)
    if exact:
        pd.testing.assert_frame_equal(da, db, check_exact=True)
    else:
        pd.testing.assert_frame_equal(da, db, check_exact=False, rtol=1e-5, atol=1e-6)
    _, ha = runs.load_histories(a)
    _, hb = runs.load_histories(b)
    for k in ha:
        (np.testing.assert_array_equal if exact else lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6))(ha[k], hb[k])


@pytest.mark.slow  # a subprocess on 4 forced CPU devices (13 s); make test-slow
def test_sharded_over_four_cpu_devices_equals_unsharded(finished, tmp_path):
    s, out = finished
    script = (
        "import sys, jax, numpy as np\n"
        "from toymesa import devices, spec, sweep, train\n"
        "assert jax.device_count() == 4\n"
        "s = spec.load(sys.argv[1])\n"
        "sweep.run(s, sys.argv[2], progress=False)\n"
        "cfg = s.cells()[0].config\n"
        "hp = train.HParams(*(devices.shard(np.full(4, v, np.float32)) for v in cfg.hparams))\n"
        "states, _ = train.population(cfg, devices.shard(np.arange(4, dtype=np.int32)), hp, chunk=3)\n"
        "for leaf in jax.tree.leaves(states):  # every leaf split over the 4 devices, one member each\n"
        "    assert len(leaf.sharding.device_set) == 4 and all(x.data.shape[0] == 1 for x in leaf.addressable_shards), leaf.sharding\n"
    )
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(s.text)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(spec_path), str(tmp_path / "out")], env=subprocess_env(XLA_FLAGS=flags), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = store.load_json(tmp_path / "out" / "meta.json")
    assert meta["devices"]["n_devices"] == 4
    # 6 members in chunks of 2, each padded to 4 and split over 4 devices
    assert all(c.size == 4 for c in sweep.plan(s, n_devices=4))
    # members per device differ (1 vs 4 per program), which changes XLA's loop tiling and so
    # float32 rounding: equal to 1e-5, not bitwise (the resumed run below is bitwise)
    compare_runs(tmp_path / "out", out, exact=False)


@pytest.mark.slow  # 40 s of subprocess sweeps; resuming is also checked in-process by the tests around it
def test_killed_sweep_resumes_to_identical_results(tmp_path):
    spec_path = write_spec(tmp_path / "spec.toml", steps=300, every=100, chunk=1)
    s = spec.load(spec_path)
    n_chunks = len(sweep.plan(s))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "toymesa.cli", "--cpu-devices", "1", "sweep", str(spec_path), "--out", str(out)]  # as the clean run below
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not log_names(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = log_names(out)
    assert 1 <= len(done_before) < n_chunks, f"kill landed outside the run ({len(done_before)} of {n_chunks} chunks)"
    assert not (out / "results.csv").exists()

    rerun = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    names = log_names(out)
    assert names[: len(done_before)] == done_before
    assert sorted(names) == sorted(c.name for c in sweep.plan(s)), "a chunk was computed twice or not at all"

    clean = sweep.run(s, tmp_path / "clean", progress=False)
    compare_runs(out, clean, exact=True)


# ----------------------------------------------------------------- preregistration
def test_a_hypothesis_edited_after_results_is_flagged(finished, tmp_path):
    from toymesa import experiment

    hyp = '\n[[hypotheses]]\nid = "H1"\nstatement = "s"\nprediction = "{p}"\n'
    path = write_spec(tmp_path / "spec.toml")
    path.write_text(path.read_text() + hyp.format(p="loss falls"))
    out = sweep.run(spec.load(path), tmp_path / "out", progress=False, echo=lambda *_: None)
    assert experiment.for_results(out).verdicts(out)["registration"].tolist() == ["as registered"]
    path.write_text(path.read_text().replace("loss falls", "loss rises"))  # prose only: same digest, resumes
    sweep.run(spec.load(path), out, progress=False, echo=lambda *_: None)
    v = experiment.for_results(out).verdicts(out)
    assert v["registration"].tolist() == ["EDITED AFTER RESULTS"] and "EDITED AFTER RESULTS" in v["verdict"][0]
    record = json.loads((out / "prereg.json").read_text())
    assert record["hypotheses"][0]["prediction"] == "loss falls"  # the original stays on record
    # --fresh discards the results but not the record, and still sees that results existed
    sweep.run(spec.load(path), out, fresh=True, progress=False, echo=lambda *_: None)
    assert experiment.for_results(out).verdicts(out)["registration"].tolist() == ["EDITED AFTER RESULTS"]


def test_a_member_stays_non_finite_from_its_first_broken_step():
    ok = np.array([[True, True, True], [True, False, True], [True, True, True]])
    a = {"hist.loss": np.zeros((3, 3)), "hist.finite": ok, "member.install_finite": np.array([True, True, False])}
    expected = [[True, True, True, True], [True, True, False, False], [False, False, False, False]]
    np.testing.assert_array_equal(runs.finite_steps(a), expected)
    old = {"hist.loss": np.array([[1.0, np.nan, 1.0]]), "hist.grad_norm": np.ones((1, 3))}  # chunks without the flag
    np.testing.assert_array_equal(runs.finite_steps(old), [[True, True, False, False]])


def test_resuming_with_other_code_is_refused_not_mixed(finished, tmp_path, monkeypatch):
    import shutil

    s, out = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    names = [c.name for c in sweep.plan(s)]
    monkeypatch.setattr(sweep.provenance, "code_digest", lambda: "0123456789ab")
    assert not set(names) & {c.name for c in sweep.plan(s)}  # the code digest is in every chunk key
    with pytest.raises(spec.SpecError, match=r"computed by other code .*0123456789ab.*--fresh"):
        sweep.run(s, copy, progress=False, echo=lambda *_: None)
    assert log_names(copy) == log_names(out)  # nothing was recomputed or mixed in


def test_a_fresh_folder_records_results_seen_elsewhere(finished, tmp_path):
    s, out = finished
    again = sweep.run(s, tmp_path / "again", progress=False, echo=lambda *_: None, roots=(out.parent,))
    record = store.load_json(again / "prereg.json")
    assert record["results_existed"] is True and record["provenance"]["results_elsewhere"] == [str(out)]
    assert record["provenance"]["spec_digest"] == s.digest and "git_commit" in record["provenance"]
    assert store.load_json(again / "meta.json")["code_digest"] == sweep.provenance.code_digest()
    assert sweep.results_of(s.digest, [tmp_path / "nowhere"]) == []


def test_members_that_go_non_finite_are_flagged_and_excluded(tmp_path):
    from typer.testing import CliRunner

    from toymesa import cli

    text = write_spec(tmp_path / "spec.toml").read_text().replace("hparams.lr = [1e-3, 3e-3]", "hparams.lr = [1e-3, 1e30]")
    text += '\n[[hypotheses]]\nid = "H1"\nstatement = "s"\nprediction = "p"\nrule = { confirm = "low > 0", refute = "high < 0" }\n'
    path = tmp_path / "spec.toml"
    path.write_text(text)
    result = CliRunner().invoke(cli.app, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    assert "non-finite" in result.output and "WARNING" in result.output
    df = runs.load(tmp_path / "out")
    blown = df["hparams.lr"] > 1
    assert df.loc[blown & (df["step"] > 0), "nonfinite"].all() and not df.loc[~blown, "nonfinite"].any()
    # a broken model's metrics are missing, never 0% defection
    assert df.loc[blown & (df["step"] > 0), ["triggered_defection", "helpful_accuracy", "loss"]].isna().all().all()
    summary = runs.load(tmp_path / "out" / "summary.csv").set_index("axis:hparams.lr")
    assert summary.loc[1e30, "nonfinite"] == 3 and summary.loc[1e30, "n"] == 0 and np.isnan(summary.loc[1e30, "triggered_defection"])
    assert summary.loc[1e-3, "nonfinite"] == 0 and summary.loc[1e-3, "n"] == 3


# ----------------------------------------------------------------- safety phase
SAFETY = """
[base.safety]
method = "sft_pre"
steps = 4
batch_size = 8

[[arms]]
name = "lr"
hparams.safety_lr = [1e-4, 1e-3]
"""


def test_safety_cells_share_installs_and_start_from_the_installed_model(finished, tmp_path):
    s0, out0 = finished
    text = SPEC_TEXT.format(steps=6, every=2, chunk=8).replace("[grid]\nhparams.lr = [1e-3, 3e-3]\n", "") + SAFETY
    text = text.replace("[base]\n", "[base]\nhparams.lr = 1e-3\n")
    s = spec.parse(__import__("tomllib").loads(text), text=text)
    out = sweep.run(s, tmp_path / "safe", progress=False, echo=lambda *_: None)
    assert len(list((out / "installs").glob("*.npz"))) == len(s.seeds)  # two cells, one install per seed
    df = runs.load(out)
    assert sorted(df["step"].unique()) == [0, 2, 4]  # safety steps
    # safety step 0 is the installed model: the same behaviour as the install-only sweep's end
    start = df[df["step"] == 0].sort_values(["cell", "seed"])
    base = runs.last_step(runs.load(out0))
    base = base[base["hparams.lr"] == 1e-3].sort_values("seed")
    for _, g in start.groupby("cell"):
        np.testing.assert_allclose(g["triggered_defection"].to_numpy(), base["triggered_defection"].to_numpy(), atol=1e-6)
    # the two safety learning rates then diverge
    end = runs.last_step(df).pivot(index="seed", columns="hparams.safety_lr", values="loss")
    assert not np.allclose(end[1e-4], end[1e-3])


# ----------------------------------------------------------------- first contact
def test_result_files_follow_the_umask_not_owner_only(finished):
    _, out = finished
    mask = os.umask(0)
    os.umask(mask)
    for name in ("results.csv", "summary.csv", "meta.json", "prereg.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in runs.chunk_files(out))


def test_a_corrupt_chunk_is_named_and_recomputed(finished, tmp_path):
    import shutil

    s, out = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    bad = runs.chunk_files(copy)[0]
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"chunk {bad} cannot be read"):
        runs.tidy(copy)
    messages = []
    sweep.run(s, copy, progress=False, echo=messages.append)
    assert any(str(bad) in m and "recomputing" in m for m in messages)
    compare_runs(copy, out, exact=True)


def test_out_that_is_a_file_and_a_missing_cell_get_one_line_errors(finished, tmp_path):
    s, out = finished
    (tmp_path / "file").write_text("x")
    with pytest.raises(spec.SpecError, match="is a file, not a folder"):
        sweep.run(s, tmp_path / "file", progress=False)
    with pytest.raises(KeyError, match="has no cell 9; its cells are 0, 1"):
        runs.load_params(out, 9, seed=0)


def test_check_prints_cell_ids_that_look_like_markup(tmp_path):
    from typer.testing import CliRunner

    from toymesa import cli

    path = write_spec(tmp_path / "spec.toml")
    result = CliRunner().invoke(cli.app, ["sweep", str(path), "--check"])
    assert result.exit_code == 0, result.output
    for c in spec.load(path).cells():
        assert f"[{c.id}]" in result.output


def test_latent_samplers_compile_inside_shard_map():
    """The latent samplers (firing, and quiet with a traced feature condition) traced inside a
    shard_map over 2 devices, as the sweep runs populations: a sampler whose loop carry is not
    per-member (a lax.scan from a constant carry) fails to compile there, not in single-device
    tests. Direct, without training: seconds, not a sweep."""
    script = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from toymesa.presets import goal_world
from toymesa.tasks import rules
assert jax.device_count() == 2
task = goal_world(3, 24, 3)
mesh = jax.make_mesh((2,), ("pop",))
def f(keys, feats, want):
    quiet = jax.vmap(lambda k, fe: rules.sample_quiet(task, k, fe))(keys, feats)
    fired = jax.vmap(lambda k, w: rules.sample_context(task, k, w))(keys, want)
    return quiet, fired
g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("pop"),) * 3, out_specs=(P("pop"), P("pop"))))
put = lambda x: jax.device_put(x, NamedSharding(mesh, P("pop")))
quiet, fired = g(put(jax.random.split(jax.random.key(0), 4)), put(jnp.array([0, 1, 0, 1])), put(jnp.array([True, False, True, False])))
labels = jax.vmap(lambda c: rules.fires(task, c))(jnp.asarray(jax.device_get(jnp.concatenate([quiet, fired]))))
assert labels.tolist() == [False] * 4 + [True, False, True, False], labels
"""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(XLA_FLAGS=flags), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
