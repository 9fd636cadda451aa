"""End-to-end smoke tests of the demo (a sweep of four arms) and of the `toymesa` CLI.

The fast tests shrink the demo's model to `tiny` and its batch to 8 through `demo.spec`'s
`base` overrides, and run two of its four arms (the latent goal without and with CoT: each arm
compiles its own programs); everything else is the real demo. All four arms of the real config
run under `make test-slow`.
"""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from toymesa import cli, demo, runs
from toymesa.experiment import result_dirs

N_SEEDS, STEPS, SAFETY_STEPS = 2, 2, 2
SMALL = {"model": "tiny", "train.batch_size": 8}
RULES = ("latent",)
ARMS = [(r, f) for r in RULES for f in demo.FORMATS]
ARM_LABELS = sorted(f"{r}/{f}" for r, f in ARMS)
COMMANDS = ["demo", "run", "sweep", "figures", "report", "list", "bench"]


def run(out, **kw):
    messages = []
    demo.main(out=out, n_seeds=N_SEEDS, steps=STEPS, echo=messages.append, base=SMALL, progress=False, safety_steps=SAFETY_STEPS, rules=RULES, **kw)
    return messages


def log(out):
    return (out / "log.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert run(out) == []
    return out


def test_demo_end_to_end(demo_out):
    results = runs.load(demo_out)
    assert len(results) == len(ARMS) * N_SEEDS * 2  # logged safety steps: 0 (installed) and the last
    assert sorted(results["step"].unique()) == [0, SAFETY_STEPS] and (results["train.steps"] == STEPS).all()
    assert (results["safety.method"] == "sft_pre").all() and (results["safety.steps"] == SAFETY_STEPS).all()
    assert len(list((demo_out / "installs").glob("*.npz"))) == len(ARMS) * N_SEEDS
    for _, g in results.groupby(["cell", "step"]):
        assert sorted(g["seed"]) == list(range(N_SEEDS))
    for m in demo.METRICS:
        assert results[m].between(0, 1).all(), m
    cot = results["task.reasoning"] == "cot"
    assert results.loc[cot, "decision_accuracy"].between(0, 1).all()
    assert results.loc[~cot, "decision_accuracy"].isna().all()
    assert np.isfinite(results.loc[results["step"] > 0, "loss"]).all()

    summary = demo.table(demo_out)
    assert sorted(summary["arm"]) == ARM_LABELS and (summary["n"] == N_SEEDS).all()
    for name in ("demo.png", "demo.pdf"):
        assert (demo_out / "figures" / name).stat().st_size > 0
    assert len(log(demo_out)) == len(ARMS)  # one chunk per arm
    assert not list(demo_out.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_demo_resumes_and_recomputes_only_what_is_missing(demo_out, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    for p in demo_out.rglob("*"):
        if p.is_file():
            (out / p.relative_to(demo_out)).parent.mkdir(parents=True, exist_ok=True)
            (out / p.relative_to(demo_out)).write_bytes(p.read_bytes())
    results = runs.load(out)
    messages = run(out)
    assert any("resuming" in m for m in messages) and len(log(out)) == len(ARMS)  # nothing recomputed

    lost = sorted((out / "chunks").glob("g01-*"))  # the latent/cot arm
    assert len(lost) == 1
    lost[0].unlink()
    (out / "results.csv").unlink()
    run(out)
    assert len(log(out)) == len(ARMS) + 1 and json.loads(log(out)[-1])["chunk"].startswith("g01")
    # the recomputed arm is the same deterministic function of (config, seeds)
    again = runs.load(out)
    pd.testing.assert_frame_equal(again, results, check_exact=True)


def test_cli_help_fits_one_screen():
    for command in COMMANDS:
        result = CliRunner().invoke(cli.app, [command, "--help"], terminal_width=100)
        assert result.exit_code == 0, result.output
        assert len(result.output.splitlines()) <= 40, f"`toymesa {command} --help` is longer than one screen"
    result = CliRunner().invoke(cli.app, ["demo", "--help"])
    for option in ("--out", "--seeds", "--steps", "--fresh"):
        assert option in result.output


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("sedes = 3\n", "sedes"),
        ("[grid]\ntask.rule = []\n", "grid.task.rule"),
        ('[base]\ntrain.steps = "many"\n', "base.train.steps"),
    ],
)
def test_cli_bad_spec_is_one_line_and_exit_2(tmp_path, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = CliRunner().invoke(cli.app, ["sweep", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and lines[0].startswith("error:")


def test_cli_figures_and_report_read_stored_results(demo_out, tmp_path):
    png = demo_out / "figures" / "demo.png"
    png.unlink()
    result = CliRunner().invoke(cli.app, ["figures", str(demo_out)])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0
    dest = tmp_path / "report.html"
    result = CliRunner().invoke(cli.app, ["report", str(demo_out), "--out", str(dest)])
    assert result.exit_code == 0, result.output
    page = dest.read_text()
    assert "data:image/png;base64," in page and "latent/cot" in page and "git" in page
    assert result_dirs(demo_out) == [demo_out]


def test_cli_list_and_unknown_experiment():
    result = CliRunner().invoke(cli.app, ["list"])
    assert result.exit_code == 0 and "demo" in result.output and "quickstart" in result.output
    result = CliRunner().invoke(cli.app, ["run", "no_such_experiment"])
    assert result.exit_code == 2 and "no experiment named" in result.output


@pytest.mark.slow
def test_demo_with_the_real_config(tmp_path):
    steps = 2  # the warmup follows the steps (10%), so even 2 steps are a valid config
    demo.main(out=tmp_path, n_seeds=2, steps=steps, echo=lambda *_: None, progress=False, safety_steps=2)
    results = runs.load(tmp_path)
    assert len(results) == 16 and all(results[m].between(0, 1).all() for m in demo.METRICS)
    assert np.isfinite(results.loc[results["step"] > 0, "loss"]).all()
    assert sorted(demo.table(tmp_path)["arm"]) == sorted(f"{r}/{f}" for r, f in demo.ARMS)  # all four arms
