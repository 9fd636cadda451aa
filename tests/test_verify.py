"""`toymesa verify`: a stored run recomputed from its configs and seeds agrees bit for bit with
itself, and a tampered array, table or config is caught and named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from toymesa import cli, provenance, report, runs, spec, store, sweep, verify


@pytest.fixture(scope="module")
def run_folder(tiny_run):
    return tiny_run


def _copy(run_folder, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(run_folder, dest)
    return dest


def verify_cmd(*args):
    return CliRunner().invoke(cli.app, ["verify", *map(str, args)])


def test_a_stored_run_recomputes_bit_for_bit_and_the_report_says_so(run_folder, tmp_path):
    out = _copy(run_folder, tmp_path)
    r = verify_cmd(out, "--all")
    assert r.exit_code == 0, r.output
    chunk = runs.chunk_files(out)[0].stem
    assert f"{chunk}: identical" in r.output and "bit for bit" in r.output
    assert "results.csv: identical" in r.output and "summary.csv: identical" in r.output
    rec = json.loads((out / verify.RECORD).read_text())[-1]
    assert rec["passed"] and rec["comparison"] == "bitwise" and rec["code_digest"] == provenance.code_digest() and rec["chunks"] == "1 of 1"
    line = verify.status(out)
    assert line.startswith("verified ") and provenance.code_digest() in line and "bit for bit" in line
    assert "verified" in report.meta_html(out, json.loads((out / "meta.json").read_text()))


def test_a_tampered_array_fails_and_is_named(run_folder, tmp_path):
    out = _copy(run_folder, tmp_path)
    path = runs.chunk_files(out)[0]
    a = store.load_arrays(path)
    a["hist.loss"] = a["hist.loss"].copy()
    a["hist.loss"][1, 2] += 1e-3
    store.save_arrays(a, path)
    r = verify_cmd(out, "--all")
    assert r.exit_code == 1, r.output
    assert f"{path.stem}: different  largest |difference| 0.001 (hist.loss)" in r.output
    assert "results.csv: different" in r.output  # re-derived from the tampered chunk: the stored table no longer follows
    assert "FAILED" in r.output
    assert verify.status(out).startswith("verification FAILED")


def test_a_tampered_table_fails_and_names_its_column(run_folder, tmp_path):
    out = _copy(run_folder, tmp_path)
    df = pd.read_csv(out / "summary.csv")
    df.loc[0, "helpful_accuracy"] += 0.25
    store.save_frame(df, out / "summary.csv")
    planned = {p.name for p in runs.chunk_files(out)}
    checks = {c.name: c for c in verify.tables(out, planned, "bitwise")}
    assert checks["results.csv"].status == "identical"
    assert checks["summary.csv"].status == "different" and checks["summary.csv"].where == "column helpful_accuracy"
    assert checks["summary.csv"].largest == pytest.approx(0.25)
    assert checks["verdicts.csv"].status == "identical"
    v = pd.read_csv(out / "verdicts.csv")
    v.loc[0, "verdict"] = "refuted"
    store.save_frame(v, out / "verdicts.csv")
    assert {c.name: c for c in verify.tables(out, planned, "bitwise")}["verdicts.csv"].where == "column verdict"
    r = verify_cmd(out, "--all")  # identical chunks do not pass a run whose tables differ
    assert r.exit_code == 1 and "identical" in r.output and "summary.csv: different" in r.output and "FAILED" in r.output, r.output


def test_other_code_is_refused_unless_asked(run_folder, tmp_path):
    out = _copy(run_folder, tmp_path)
    m = json.loads((out / "meta.json").read_text())
    store.save_json(m | {"code_digest": "0123456789ab"}, out / "meta.json")
    r = verify_cmd(out, "--sample", "1")
    assert r.exit_code == 2
    assert "0123456789ab" in r.output and provenance.code_digest() in r.output and "--any-code" in r.output
    assert not (out / verify.RECORD).exists()


def test_edited_configs_are_refused_before_anything_trains(run_folder, tmp_path):
    out = _copy(run_folder, tmp_path)
    configs = json.loads((out / "configs.json").read_text())
    configs["0"]["hparams"]["lr"] = 0.5
    store.save_json(configs, out / "configs.json")
    with pytest.raises(ValueError, match="configs.json cell 0 rebuilds to config id"):
        verify.verify(out, echo=lambda *_: None, progress=False)


def test_chunk_files_that_the_plan_does_not_explain_are_refused(run_folder, tmp_path):
    out = _copy(run_folder, tmp_path)
    path = runs.chunk_files(out)[0]
    shutil.copy(path, path.with_name("g00-c001-000000000000.npz"))
    with pytest.raises(ValueError, match="1 file\\(s\\) no chunk explains \\(g00-c001-000000000000\\)"):
        verify.verify(out, echo=lambda *_: None, progress=False)
    path.unlink()
    with pytest.raises(ValueError, match="1 chunk\\(s\\) missing"):
        verify.verify(out, echo=lambda *_: None, progress=False)


def test_the_comparison_is_bitwise_only_on_the_runs_machine_type_and_versions():
    here = {"versions": provenance.versions(), "machine": provenance.machine(), "devices": verify._devices()}
    assert verify.mode(here)[0] == "bitwise"
    how, why = verify.mode(here | {"versions": here["versions"] | {"jax": "0.0.1"}})
    assert how == "tolerance" and "jax 0.0.1 then" in why
    how, why = verify.mode({k: v for k, v in here.items() if k != "machine"})
    assert how == "tolerance" and "did not record its machine" in why
    assert verify.mode(here, rtol=1e-3) == ("tolerance", "asked for (--rtol)")


def test_compare_names_the_largest_difference_and_respects_the_tolerance():
    a = {"x": np.array([1.0, 2.0, np.nan], np.float32), "n": np.array([1, 2])}
    assert verify.compare(a, {k: v.copy() for k, v in a.items()}, "bitwise") == ("identical", 0.0, "")
    near = a | {"x": np.array([1.0, 2.0 + 2e-6, np.nan], np.float32)}
    status, largest, where = verify.compare(a, near, "bitwise")
    assert status == "different" and where == "x" and 0 < largest < 1e-5
    assert verify.compare(a, near, "tolerance")[0] == "within tolerance"
    assert verify.compare(a, a | {"x": np.array([1.0, 2.1, np.nan], np.float32)}, "tolerance")[0] == "different"
    nan = verify.compare(a, a | {"x": np.array([1.0, 2.0, 0.0], np.float32)}, "tolerance")
    assert nan[0] == "different" and nan[1] == np.inf  # a NaN where there was a number is never close
    assert "only recomputed: ['y']" in verify.compare(a, a | {"y": np.zeros(1)}, "bitwise")[2]
    assert "stored int64[2], recomputed int32[2]" in verify.compare(a, a | {"n": np.array([1, 2], np.int32)}, "bitwise")[2]


def test_shared_installs_are_recomputed_in_the_population_that_trained_them(tmp_path):
    """Two cells differing only in safety lr share installs; with 4 members per chunk the second
    chunk loads installs trained in the first chunk's population of 3 (4 with padding). A
    member's rounding depends on its population's size, so only recomputing each install in its
    original population agrees bit for bit."""
    raw = {
        "name": "tinyshared",
        "seeds": [3, 5, 7],
        "base": {
            "model": "tiny",
            "task": {"rule": "single", "seq_len": "min"},
            "train": {"steps": 20, "batch_size": 8},
            "safety": {"method": "sft_pre", "steps": 4},
        },
        "grid": {"hparams": {"safety_lr": [1e-3, 3e-3]}},
        "run": {"eval_prompts": 8, "chunk_members": 4},
    }
    out = tmp_path / "run"
    sweep.run(spec.parse(raw), out, progress=False, echo=lambda *_: None)
    chunks = [c for _, c in verify._plan(out, verify.meta(out), verify.stored_spec(out), True)]
    origins = verify.install_origins(chunks)
    assert len(chunks) == 2 and {len(origins[k][0]) for k in verify.install_keys(chunks[1])} == {3}  # trained in chunk 0
    rec = verify.verify(out, sample=None, echo=lambda *_: None, progress=False)
    assert rec["passed"] and {c["status"] for c in rec["checks"]} == {"identical"}, rec["checks"]
