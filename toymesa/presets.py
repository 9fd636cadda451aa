"""Named configurations: model sizes (`MODEL_SIZES`, the names specs use), task worlds
(`single_backdoor` ... `goal_world`, whose presets are `toymesa.tasks.census.goal_worlds`) and
the demo's default. Presets build the frozen classes of `toymesa.config`; they hold no rules of
their own."""

from __future__ import annotations

import dataclasses

from toymesa.config import Config, ModelConfig, Reasoning, Rule, SafetyConfig, TaskConfig


def tiny() -> ModelConfig:
    return ModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=128)


def small() -> ModelConfig:
    return ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=128)


def reference() -> ModelConfig:
    """The model of the demo and the benchmarks: 2 layers, d_model 64, 4 heads, d_mlp 256."""
    return ModelConfig()


def large() -> ModelConfig:
    return ModelConfig(n_layers=4, d_model=128, n_heads=8, d_mlp=512)


MODEL_SIZES = {"tiny": tiny, "small": small, "reference": reference, "large": large}


def single_backdoor(**kw) -> TaskConfig:
    return TaskConfig(rule="single", **kw)


def k_triggers(k: int = 4, **kw) -> TaskConfig:
    return TaskConfig(rule="k_triggers", k=k, **kw)


def conjunction(**kw) -> TaskConfig:
    return TaskConfig(rule="conjunction", **kw)


def latent_goal(**kw) -> TaskConfig:
    return TaskConfig(rule="latent", **kw)


def goal_world(n_ctx: int, n_cues: int, threshold: int, n_distractors: int = 8, n_vetoes: int = 0, **kw) -> TaskConfig:
    """A latent world of many small cues: n_cues of weight 1 and n_vetoes of weight -1; the rule
    fires when the cues outnumber the vetoes in the n_ctx slots by at least `threshold`.
    seq_len defaults to max(20, the format's minimum). Presets: `toymesa.tasks.census.goal_worlds`."""
    seq_len = kw.pop("seq_len", None)
    weights = (1,) * n_cues + (-1,) * n_vetoes
    task = TaskConfig(rule="latent", n_ctx=n_ctx, cue_weights=weights, latent_threshold=threshold, n_distractors=n_distractors, seq_len=seq_len or 1024, **kw)
    return task if seq_len else dataclasses.replace(task, seq_len=max(TaskConfig.seq_len, task.min_seq_len))


def demo_config(rule: Rule = "single", reasoning: Reasoning = "none") -> Config:
    """The built-in default of `toymesa demo`: reference model, one rule and format, then
    150 steps of pre-scratchpad safety SFT.

    The sequence length is the format's minimum, so no compute is spent on padding. The
    helpful task is copy-the-k-th: with `sum_mod` (sum of 2 values mod 5) the reference
    model sits on a plateau at chance helpfulness for a seed-dependent time (200 to over
    1000 steps, measured with 8-16 seeds), too slow and unreliable for a 4-minute demo.
    """
    task = TaskConfig(rule=rule, reasoning=reasoning, helpful="copy_kth")
    safety = SafetyConfig(method="sft_pre", steps=150)
    return Config(model=reference(), task=dataclasses.replace(task, seq_len=task.min_seq_len), safety=safety)
