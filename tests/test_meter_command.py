"""`toymesa meter` and the [meter] phase: the meters on every stored model of a run folder, a
tidy meter.csv, resuming per chunk, and one clear line for each kind of bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from toymesa import cli, measure, spec, sweep
from toymesa.measure import Measurement
from toymesa.spec import SpecError

FAST = ["--chains", "2", "--draws", "20", "--burn-in", "0", "--no-plateau"]  # the plateau runs: tests/test_meter_llc.py


def _raw(name, **extra):
    raw = {
        "name": name,
        "seeds": [3, 5],
        "base": {"model": "tiny", "task": {"rule": "single", "seq_len": "min"}, "train": {"steps": 6, "batch_size": 8}},
        "grid": {"hparams": {"lr": [1e-3, 3e-3]}},
        "run": {"eval_prompts": 8},
    }
    return raw | extra


@pytest.fixture(scope="module")
def run_folder(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run: these tests write meter results into it."""
    out = tmp_path_factory.mktemp("meter") / "run"
    shutil.copytree(tiny_run, out)
    return out


def meter(*args):
    return CliRunner().invoke(cli.app, ["meter", *map(str, args)])


def test_meter_command_writes_a_tidy_table_and_resumes(run_folder):
    r = meter(run_folder, "--meters", "llc,norm", *FAST)
    assert r.exit_code == 0, r.output
    df = pd.read_csv(run_folder / "meter.csv")
    assert len(df) == 2 * 2 * 2  # cells x seeds x meters
    assert set(df["meter"]) == {"llc", "norm"} and set(df["seed"]) == {3, 5} and set(df["cell"]) == {0, 1}
    llc = df[df["meter"] == "llc"]
    for col in ("value", "llc_sd", "plateau_ok", "divergent", "rhat", "drift", "step", "loss0"):
        assert llc[col].notna().all(), col
    assert "llc of the final models" in r.output and "plateau held" in r.output
    files = sorted((run_folder / "meter").rglob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in files]
    again = meter(run_folder, "--meters", "llc,norm", *FAST)
    assert again.exit_code == 0 and "2 of 2 chunks already measured" in " ".join(again.output.split())  # the console may wrap
    assert [p.stat().st_mtime_ns for p in sorted((run_folder / "meter").rglob("*.npz"))] == stamps  # nothing recomputed
    np.testing.assert_allclose(pd.read_csv(run_folder / "meter.csv")["value"], df["value"], rtol=1e-6)


def test_an_interrupted_measurement_keeps_its_finished_chunks(run_folder):
    calls = []

    def fn(cfg, params, seeds):
        calls.append(len(seeds))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"value": np.asarray(seeds, float)}

    m = Measurement("meter/probe", fn, ())
    with pytest.raises(KeyboardInterrupt):
        measure.run(run_folder, m, progress=False, chunk=1)
    assert len(list((run_folder / "meter" / "probe").glob("*.npz"))) == 1
    calls.clear()
    df = measure.run(run_folder, m._replace(fn=lambda cfg, params, seeds: calls.append(1) or {"value": np.asarray(seeds, float)}), progress=False, chunk=1)
    assert len(calls) == 3 and len(df) == 4  # only the three chunks not yet measured
    np.testing.assert_array_equal(df["value"], df["seed"])


def test_bad_input_gives_one_line_saying_what_to_change(run_folder, tmp_path):
    r = meter(run_folder, "--meters", "llc,nrm")
    assert r.exit_code == 2 and "unknown meter(s) ['nrm']" in r.output and "llc, llc_act, norm" in r.output
    r = meter(tmp_path, "--meters", "norm")
    assert r.exit_code == 2 and "not a run folder" in r.output
    r = meter(run_folder, "--meters", "norm", "--model", "installed")
    assert r.exit_code == 2 and "use --model final" in r.output
    out = tmp_path / "noparams"
    sweep.run(spec.parse(_raw("noparams", run={"eval_prompts": 8, "save_params": False})), out, progress=False, echo=lambda *_: None)
    r = meter(out, "--meters", "norm")
    assert r.exit_code == 2 and "save_params = true" in r.output


def test_a_step_that_diverges_on_every_chain_is_refused_after_saving(run_folder):
    before = pd.read_csv(run_folder / "meter.csv") if (run_folder / "meter.csv").exists() else None
    r = meter(run_folder, "--meters", "llc", "--chains", "1", "--draws", "4", "--burn-in", "0", "--no-plateau", "--step", "1e4")
    assert r.exit_code == 2, r.output
    assert "every LLC chain diverged" in r.output and "smaller --step" in r.output
    df = pd.read_csv(run_folder / "meter.csv")  # saved, with the NaN estimates flagged
    assert (df.loc[df["meter"] == "llc", "divergent"] > 0).any()
    if before is not None:  # other meters measured earlier are kept
        assert set(before["meter"]) <= set(df["meter"])


def test_a_spec_meter_section_measures_after_training(tmp_path):
    raw = _raw("withmeter", meter={"meters": ["norm"]})
    out = sweep.run(spec.parse(raw), tmp_path / "run", progress=False, echo=lambda *_: None)
    df = pd.read_csv(out / "meter.csv")
    assert set(df["meter"]) == {"norm"} and len(df) == 4 and (df["value"] > 0).all()
    with pytest.raises(SpecError, match="meter.meters"):
        spec.parse(_raw("bad", meter={"meters": ["lcc"]}))
    with pytest.raises(SpecError, match="meter.model"):
        spec.parse(_raw("bad", meter={"meters": ["llc"], "model": "best"}))
    assert spec.parse(raw).digest == spec.parse(_raw("withmeter")).digest  # measuring does not change what trains
