"""Configuration: frozen dataclasses with every default in one place.

Two kinds of field live apart:

* **Static (shape) fields** in `ModelConfig`, `TaskConfig` and `TrainConfig`.
  Changing one changes array shapes or program structure, so it recompiles.
* **Dynamic (swept) values** in `HParams` (learning rate, weight decay,
  trigger rate). They are passed to the jitted functions as arrays, so a whole
  population with different values shares one compiled program.

Named variants (`reference`, `tiny`, `single_backdoor`, `latent_goal`, `goal_world`,
`demo_config`, ...) live in `toymesa.presets`.
Every constructor validates itself and raises `ValueError` naming the field,
the bad value and what would be valid, on one line. Types are strict (`toymesa.checks`,
driven by the annotations): bools only from bools, ints only from ints (2.0 is rejected,
nothing is truncated), finite floats, Literal choices, tuples of the annotated items (a
list is converted to a tuple), and each `Config` group an instance of its class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from toymesa.checks import check as _check
from toymesa.checks import check_known, kind_of, repr_when_set, strict
from toymesa.checks import fail as _fail
from toymesa.checks import positive as _positive
from toymesa.evidence_counts import WITH, WITHOUT, coverage_cut, quiet_features

Rule = Literal["single", "k_triggers", "conjunction", "latent"]
Reasoning = Literal["none", "cot", "distilled", "neutral_cot"]
Helpful = Literal["sum_mod", "copy_kth"]
Defect = Literal["distinct", "subtle", "benign"]

RULES = ("single", "k_triggers", "conjunction", "latent")
REASONING = ("none", "cot", "distilled", "neutral_cot")
HELPFUL = ("sum_mod", "copy_kth")
DEFECTS = ("distinct", "subtle", "benign")
METHODS = ("none", "sft_pre", "sft_post", "sft_full", "rl", "adversarial")

# Per-slot evidence values the reasoning can state (one token each).
EVIDENCE_MIN, EVIDENCE_MAX = -2, 3


@strict
@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape (all static)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    layer_norm: bool = True
    attn_only: bool = False

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "d_mlp"):
            _positive("ModelConfig", name, getattr(self, name))
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            _fail(
                "ModelConfig",
                "d_model",
                self.d_model,
                f"must be divisible by n_heads={self.n_heads}; n_heads could be one of {divisors[:8]}, or d_model a multiple of {self.n_heads}",
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@strict
@dataclass(frozen=True)
class TaskConfig:
    """A token world: helpful computation, activation rule, defect and reasoning format.

    Prompt layout: ``BOS ctx[n_ctx] content[n_content] SEP``; the context slots hold
    triggers / cues / distractors, the content holds the operands of the helpful task.
    """

    helpful: Helpful = "sum_mod"
    modulus: int = 5  # content and answer values are 0..modulus-1
    n_content: int = 2
    copy_k: int = 0  # which content token `copy_kth` copies
    rule: Rule = "single"
    n_ctx: int = 4  # context slots
    n_trigger_tokens: int = 16  # trigger tokens in the vocabulary
    trigger: int = 0  # index (within the trigger block) of the `single` trigger
    trigger_position: Literal["random", "fixed"] = "random"
    trigger_slot: int = 0  # slot used when trigger_position == "fixed"
    k: int = 4  # number of active triggers for `k_triggers` (indices 0..k-1)
    conjunction: tuple[int, int] = (0, 1)  # trigger indices that must co-occur
    cue_weights: tuple[int, ...] = (3, 2, 1, -1)  # hidden weight per cue
    latent_threshold: int = 3  # `latent` fires when summed evidence >= threshold
    n_distractors: int = 8
    defect: Defect = "distinct"
    reasoning: Reasoning = "none"
    seq_len: int = 20

    def __post_init__(self):
        o = "TaskConfig"  # types and Literal choices (`conjunction` a pair) are checked by @strict first
        _check(self.modulus >= 2, o, "modulus", self.modulus, "use an integer >= 2")
        for name in ("n_content", "n_ctx", "n_trigger_tokens", "n_distractors", "seq_len"):
            _positive(o, name, getattr(self, name))
        nt = self.n_trigger_tokens
        _check(0 <= self.copy_k < self.n_content, o, "copy_k", self.copy_k, f"use 0..{self.n_content - 1} (n_content={self.n_content})")
        # a rule's own fields are checked only under that rule: their defaults must not make
        # another rule's config invalid (n_trigger_tokens = 2 with rule single and k = 4 unused)
        if self.rule == "single":
            _check(
                0 <= self.trigger < nt, o, "trigger", self.trigger, f"the vocabulary has trigger tokens 0..{nt - 1}; raise n_trigger_tokens or pick one of them"
            )
            if self.trigger_position == "fixed":
                _check(0 <= self.trigger_slot < self.n_ctx, o, "trigger_slot", self.trigger_slot, f"use a context slot 0..{self.n_ctx - 1}")
        if self.rule == "k_triggers":
            _check(1 <= self.k <= nt, o, "k", self.k, f"k_triggers needs 1 <= k <= n_trigger_tokens={nt}")
        if self.rule == "conjunction":
            a, b = self.conjunction
            _check(a != b and 0 <= a < nt and 0 <= b < nt, o, "conjunction", self.conjunction, f"use two distinct trigger indices in 0..{nt - 1}")
            _check(self.n_ctx >= 2, o, "n_ctx", self.n_ctx, "the conjunction rule needs at least 2 context slots")
        _check(len(self.cue_weights) >= 1, o, "cue_weights", self.cue_weights, "give at least one cue weight")
        bad = [w for w in self.cue_weights if not EVIDENCE_MIN <= w <= EVIDENCE_MAX]
        _check(not bad, o, "cue_weights", self.cue_weights, f"each weight must lie in [{EVIDENCE_MIN}, {EVIDENCE_MAX}]")
        if self.rule == "latent":
            lo, hi = self.latent_evidence_range
            _check(
                lo < self.latent_threshold <= hi,
                o,
                "latent_threshold",
                self.latent_threshold,
                f"with these cue weights and {self.n_ctx} slots evidence spans [{lo}, {hi}]; use a threshold in ({lo}, {hi}] so both labels occur",
            )
        need = self.min_seq_len
        _check(
            self.seq_len >= need,
            o,
            "seq_len",
            self.seq_len,
            f"prompt ({self.prompt_len}) + reasoning ({self.reasoning_len}) + answer (3) needs seq_len >= {need}",
        )

    @property
    def n_cues(self) -> int:
        return len(self.cue_weights)

    @property
    def latent_evidence_range(self) -> tuple[int, int]:
        ws = list(self.cue_weights) + [0]  # a slot may hold a distractor (weight 0)
        return self.n_ctx * min(ws), self.n_ctx * max(ws)

    @property
    def prompt_len(self) -> int:
        return 1 + self.n_ctx + self.n_content + 1

    @property
    def has_think_block(self) -> bool:
        """Whether sequences carry THINK ... END_THINK (cot, neutral_cot)."""
        return self.reasoning in ("cot", "neutral_cot")

    @property
    def reasoning_len(self) -> int:
        """Tokens of the think block: THINK, one evidence token per slot, decision, END_THINK."""
        return self.n_ctx + 3 if self.has_think_block else 0

    @property
    def min_seq_len(self) -> int:
        return self.prompt_len + self.reasoning_len + 3  # ANS, answer, EOS


@strict
@dataclass(frozen=True)
class TrainConfig:
    """Static training settings (shapes, schedule lengths, optimizer constants)."""

    batch_size: int = 32
    steps: int = 500
    warmup_steps: int | None = None  # None: follows steps (`warmup`, 10% of them)
    end_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak lr
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0

    def __post_init__(self):
        o = "TrainConfig"
        for name in ("batch_size", "steps"):
            _positive(o, name, getattr(self, name))
        if self.warmup_steps is not None:
            _check(
                0 <= self.warmup_steps < self.steps,
                o,
                "warmup_steps",
                self.warmup_steps,
                f"use 0 <= warmup_steps < steps={self.steps}, or leave it unset to follow steps (10% of them)",
            )
        _check(0.0 <= self.end_lr_fraction <= 1.0, o, "end_lr_fraction", self.end_lr_fraction, "use a value in [0, 1]")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, o, name, v, "use a value in [0, 1)")
        _check(self.grad_clip > 0, o, "grad_clip", self.grad_clip, "use a positive value")

    @property
    def warmup(self) -> int:
        """Linear-warmup steps: `warmup_steps` if set, else 10% of `steps` (50 of the default 500)."""
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps


@strict
@dataclass(frozen=True)
class SafetyConfig:
    """Safety training applied after the behaviour is installed (all static; the learning
    rate is `HParams.safety_lr`). See `toymesa.safety` for what each method does.

    Methods: ``none`` (no safety phase), ``sft_pre`` (SFT on helpful answers, for formats
    with a think block the answer without reasoning), ``sft_post`` (the model's own sampled
    reasoning, then SFT on the helpful answer only), ``sft_full`` (SFT on the whole sequence in
    the trained format, reasoning included: no format damage), ``rl`` (policy gradient with a
    preference reward), ``adversarial`` (red-team search, then SFT on what it finds).
    """

    method: Literal["none", "sft_pre", "sft_post", "sft_full", "rl", "adversarial"] = "none"
    steps: int = 200
    batch_size: int = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    coverage: float = 0.0  # fraction of the activating contexts the safety data covers (k_triggers, latent)
    covered_rate: float = 0.5  # share of safety prompts drawn from covered activating contexts (coverage > 0)
    temperature: float = 1.0  # sampling temperature of the model's own reasoning / completions
    rl_estimator: Literal["rloo", "baseline"] = "rloo"
    rl_samples: int = 4  # completions per prompt (rloo groups); batch_size counts completions
    rl_reasoning_grad: bool = True  # False: drop reasoning tokens from the policy gradient
    rl_baseline_decay: float = 0.9  # "baseline": moving average of the reward
    kl: float = 0.0  # weight of KL(policy || starting policy) on the sampled prefixes
    adv_candidates: int = 512  # red-team prompts searched per model
    adv_fraction: float = 0.5  # share of each batch drawn from the prompts the search found
    # safety-data composition controls (`safety.safety_prompts`):
    feature_rate: float | None = None  # share of safety prompts holding a rule feature in a non-activating role; None: as drawn
    triggered_rate: float = 0.0  # share of safety prompts on which the rule fires (positive control: the data covers the rule)
    credit_every: int = 0  # credit tracking (`toymesa.attribution.credit`) every k safety steps; 0: off
    credit_prompts: int = 16  # prompts in each of its fixed probe sets
    __repr__ = repr_when_set("credit_every", "credit_prompts")  # runs stored before these fields keep their keys

    def __post_init__(self):
        o = "SafetyConfig"  # types and Literal choices are checked by @strict first
        ok = self.credit_every == 0 or (self.credit_every > 0 and self.method != "none")
        _check(ok, o, "credit_every", self.credit_every, "use 0 (no credit tracking) or k >= 1 (every k safety steps) with a safety method")
        for name in ("steps", "batch_size", "rl_samples", "adv_candidates", "credit_prompts"):
            _positive(o, name, getattr(self, name))
        for name in ("coverage", "rl_baseline_decay"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, o, name, v, "use a value in [0, 1)")
        for name in ("covered_rate", "adv_fraction", "triggered_rate"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, o, name, v, "use a value in [0, 1]")
        if self.feature_rate is not None:
            _check(0.0 <= self.feature_rate <= 1.0, o, "feature_rate", self.feature_rate, "use a value in [0, 1], or leave it unset for the natural share")
        _check(
            not (self.coverage > 0 and self.triggered_rate > 0),
            o,
            "triggered_rate",
            self.triggered_rate,
            "use either coverage (a covered part of the activating contexts) or triggered_rate (all of them), not both",
        )
        _check(self.temperature > 0, o, "temperature", self.temperature, "use a positive temperature")  # finite: @strict
        _check(self.kl >= 0, o, "kl", self.kl, "use a KL weight >= 0")
        if self.method == "rl":
            _check(
                self.rl_samples >= 2 and self.batch_size % self.rl_samples == 0,
                o,
                "rl_samples",
                self.rl_samples,
                f"RL needs >= 2 completions per prompt and batch_size={self.batch_size} divisible by them",
            )


class HParams(NamedTuple):
    """Dynamic values, swept without recompiling. Scalars, or arrays [N] in a population."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    trigger_rate: float = 0.5  # fraction of training prompts on which the rule fires
    safety_lr: float = 3e-4  # learning rate of safety training (`SafetyConfig`), constant


def check_hparams(hp: HParams) -> HParams:
    """Raise ValueError unless every value is a finite number in range, or an array of them
    (a population's stacked [N] values: NumPy, JAX or a list); return hp unchanged.

    Strings, bools and None are rejected rather than converted (`np.asarray("1e-3", float)`
    would read the string)."""
    checks = {
        "lr": (lambda v: v >= 0, "use a learning rate >= 0"),
        "weight_decay": (lambda v: v >= 0, "use a weight decay >= 0"),
        "trigger_rate": (lambda v: (v >= 0) & (v <= 1), "use a rate in [0, 1]"),
        "safety_lr": (lambda v: v >= 0, "use a learning rate >= 0"),
    }
    for name, (ok, valid) in checks.items():
        given = getattr(hp, name)
        try:
            v = np.asarray(given)  # scalars, lists, NumPy and JAX arrays alike
        except ValueError:  # a ragged list
            v = np.asarray(None)
        if not (v.dtype.kind in "iuf" or v.dtype.name.startswith(("bfloat", "float"))):  # ml_dtypes floats have kind "V"
            what = kind_of(given) if v.ndim == 0 else f"an array of {v.dtype}"
            _fail("HParams", name, given, f"use a float, or an array of floats [N] for a population, not {what}")
        v = v.astype(float)
        bad = v[~(ok(v) & np.isfinite(v))]
        if bad.size:
            _fail("HParams", name, float(bad.flat[0]), valid)
    return hp


@strict(
    advice={
        "model": "e.g. toymesa.presets.tiny(); model size names are for specs",
        "task": "e.g. toymesa.presets.latent_goal(); to change some fields use cfg.replace(task=dict(...))",
        "train": "e.g. toymesa.config.TrainConfig(steps=1000); to change some fields use cfg.replace(train=dict(...))",
        "hparams": "e.g. toymesa.config.HParams(lr=1e-3); to change some values use cfg.replace(hparams=dict(...))",
        "safety": "e.g. toymesa.config.SafetyConfig(method='sft_pre'); to change some fields use cfg.replace(safety=dict(...))",
    }
)
@dataclass(frozen=True)
class Config:
    """Everything static about one run; `hparams` holds the default swept values."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hparams: HParams = field(default_factory=HParams)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self):
        check_hparams(self.hparams)
        s, t = self.safety, self.task
        if s.method == "sft_post" and not t.has_think_block:
            _fail(
                "SafetyConfig",
                "method",
                s.method,
                f"post-scratchpad SFT needs a think block (task.reasoning cot or neutral_cot, not {t.reasoning!r}); use sft_pre",
            )
        if s.method == "none" and (s.feature_rate is not None or s.triggered_rate > 0):
            name, value = ("feature_rate", s.feature_rate) if s.feature_rate is not None else ("triggered_rate", s.triggered_rate)
            _fail("SafetyConfig", name, value, "sets the safety data's composition, but method is 'none' (no safety data); choose a method or leave it unset")
        if s.feature_rate is not None:  # what the world allows: `toymesa.evidence_counts` (which imports nothing from toymesa)
            need = {WITH} if s.feature_rate == 1 else {WITHOUT} if s.feature_rate == 0 else {WITH, WITHOUT}
            if not need <= set(quiet_features(t)):
                _fail(
                    "SafetyConfig",
                    "feature_rate",
                    s.feature_rate,
                    f"no non-firing context of rule {t.rule!r} can hold one of its features (every active trigger fires); "
                    "use latent, conjunction or single with trigger_position = 'fixed', or feature_rate = 0",
                )
        if s.coverage > 0:
            if s.method in ("none", "adversarial"):
                _fail(
                    "SafetyConfig",
                    "coverage",
                    s.coverage,
                    f"partial coverage applies to sft_pre, sft_post, sft_full and rl, not {s.method!r}; set coverage = 0",
                )
            try:
                coverage_cut(t, s.coverage)
            except ValueError as e:
                _fail("SafetyConfig", "coverage", s.coverage, str(e))

    def replace(self, **groups) -> Config:
        """`cfg.replace(task=dict(rule="latent"), hparams=dict(lr=1e-3))`: nested replace; a
        group may also be given whole (`model=tiny()`). Unknown groups and fields raise
        ValueError naming them, like every invalid value."""
        new = {}
        for name, changes in groups.items():
            check_known("Config", [f.name for f in dataclasses.fields(self)], {name: changes})
            current = getattr(self, name)
            kind = type(current)
            if isinstance(changes, kind):
                new[name] = changes
                continue
            if not isinstance(changes, Mapping):
                _fail("Config", name, changes, f"give a dict of {kind.__name__} fields to change, or a whole {kind.__name__}")
            # HParams._replace would raise a ValueError that does not name the owner
            check_known(kind.__name__, kind._fields if kind is HParams else [f.name for f in dataclasses.fields(kind)], changes)
            new[name] = current._replace(**changes) if kind is HParams else dataclasses.replace(current, **changes)
        return dataclasses.replace(self, **new)


def columns(cfg: Config) -> dict:
    """Flat ``group.field`` -> value of every field (tuples as strings), for tidy tables."""
    cols = {}
    for group in ("model", "task", "train", "safety"):
        for k, v in dataclasses.asdict(getattr(cfg, group)).items():
            cols[f"{group}.{k}"] = str(v) if isinstance(v, tuple) else v
    cols.update({f"hparams.{k}": v for k, v in cfg.hparams._asdict().items()})
    return cols
