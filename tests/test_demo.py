"""End-to-end smoke test of the demo (tables, figure, resuming finished arms) and of the CLI.

The fast test shrinks the demo's model to `tiny` and its warmup to 1 step (monkeypatching
`demo.demo_config`), so the 4 arms compile small programs; everything else is the real demo.
"""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from toymesa import cli, demo, store
from toymesa.config import tiny

ARM_LABELS = [f"{rule}/{reasoning}" for rule, reasoning in demo.ARMS]
N_SEEDS, STEPS = 2, 2


@pytest.fixture
def small_demo(monkeypatch):
    real = demo.demo_config

    def small(rule="single", reasoning="none"):
        cfg = real(rule, reasoning)
        return dataclasses.replace(cfg, model=tiny(), train=dataclasses.replace(cfg.train, batch_size=8, warmup_steps=1))

    monkeypatch.setattr(demo, "demo_config", small)


def run(out, **kw):
    messages = []
    demo.main(out=out, n_seeds=N_SEEDS, steps=STEPS, echo=messages.append, **kw)
    return messages


def without_timing(df):
    return df.drop(columns="seconds").reset_index(drop=True)


def test_demo_end_to_end_and_resume(tmp_path, small_demo):
    messages = run(tmp_path)
    assert len(messages) == 4 and not any("reusing" in m for m in messages)

    results = store.load(tmp_path)
    assert len(results) == len(demo.ARMS) * N_SEEDS
    assert sorted(results["arm"].unique()) == sorted(ARM_LABELS)
    for _, g in results.groupby("arm"):
        assert sorted(g["seed"]) == list(range(N_SEEDS))
    for m in demo.METRICS:
        assert results[m].between(0, 1).all(), m
    cot = results["reasoning"] == "cot"
    assert results.loc[cot, "decision_accuracy"].between(0, 1).all()
    assert results.loc[~cot, "decision_accuracy"].isna().all()
    assert (results["train.steps"] == STEPS).all()

    summary = store.load(tmp_path / "summary.csv")
    assert sorted(summary["arm"]) == sorted(ARM_LABELS) and (summary["n"] == N_SEEDS).all()
    history = store.load(tmp_path / "history.csv")
    assert len(history) == len(demo.ARMS) * N_SEEDS * STEPS
    assert sorted(history["step"].unique()) == list(range(1, STEPS + 1))
    for name in ("demo.png", "demo.pdf"):
        assert (tmp_path / name).stat().st_size > 0
    arms = tmp_path / "arms"
    assert len(list(arms.glob("*.history.csv"))) == 4 and len(list(arms.glob("*.csv"))) == 8
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries

    # a second run reuses every finished arm and writes the same tables
    messages = run(tmp_path)
    assert len(messages) == 4 and all("reusing" in m for m in messages)
    pd.testing.assert_frame_equal(store.load(tmp_path), results)

    # an interrupted run: one arm's files are missing, so only that arm is recomputed
    lost = sorted(arms.glob("latent-cot-*"))
    assert len(lost) == 2
    for f in lost:
        f.unlink()
    messages = run(tmp_path)
    recomputed = [m for m in messages if "reusing" not in m]
    assert len(messages) == 4 and len(recomputed) == 1 and recomputed[0].startswith("latent/cot")
    again = store.load(tmp_path)
    # the recomputed arm is the same deterministic function of (config, seeds)
    pd.testing.assert_frame_equal(without_timing(again), without_timing(results))

    # --fresh retrains everything
    assert not any("reusing" in m for m in run(tmp_path, fresh=True))


@pytest.mark.parametrize(("rule", "reasoning"), demo.ARMS)
def test_demo_arm_config_accepts_few_steps(rule, reasoning):
    cfg = demo.arm_config(rule, reasoning, STEPS)
    assert cfg.train.steps == STEPS
    assert 0 <= cfg.train.warmup_steps < STEPS


@pytest.mark.slow
def test_demo_with_the_real_config(tmp_path):
    steps = demo.demo_config().train.warmup_steps + 1  # the fewest steps the real config accepts
    messages = []
    demo.main(out=tmp_path, n_seeds=2, steps=steps, echo=messages.append)
    results = store.load(tmp_path)
    assert len(results) == 8 and all(results[m].between(0, 1).all() for m in demo.METRICS)
    assert np.isfinite(results["final_loss"]).all()


def test_cli_demo_help():
    result = CliRunner().invoke(cli.app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--out", "--seeds", "--steps", "--fresh"):
        assert option in result.output
