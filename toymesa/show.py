"""What a stored model writes: its greedy (or sampled) completions of chosen prompts, or of a
sample of prompts per class (the rule fires / does not), with token names and outcomes.

`completions` is the pure part (model, prompts -> rows); `prompts_from_text` reads prompts
written as token names (`toymesa.tasks.describe` prints them); the `toymesa show` command
loads a member of a run folder and prints the rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from toymesa import evaluate
from toymesa.config import Config
from toymesa.tasks import BOS, SEP, Batch, balanced, describe, layout, parse_tokens, vocab, world
from toymesa.train import role_key


def prompts_from_text(cfg: Config, texts: list[str]) -> Batch:
    """Prompts written as token names -> a batch with the rule's ground truth.

    Each text is a whole prompt, ``BOS <n_ctx context tokens> <n_content content tokens> SEP``
    (BOS and SEP may be left out), e.g. ``BOS T0 d1 d5 d2 c3 c1 SEP``."""
    task, v = cfg.task, vocab(cfg.task)
    ctxs, values = [], []
    for text in texts:
        ids = parse_tokens(task, text)
        ids = ids[1:] if ids[:1] == [BOS] else ids
        ids = ids[:-1] if ids[-1:] == [SEP] else ids
        if len(ids) != task.n_ctx + task.n_content:
            raise ValueError(
                f"prompt {text!r} has {len(ids)} tokens between BOS and SEP; this task needs "
                f"{task.n_ctx} context + {task.n_content} content tokens, e.g. {_example(cfg)!r}"
            )
        ctx, content = ids[: task.n_ctx], ids[task.n_ctx :]
        bad = [describe(task, [t]) for t in content if not v.content <= t < v.content + task.modulus]
        if bad:
            raise ValueError(
                f"prompt {text!r}: the last {task.n_content} tokens must be content values c0-c{task.modulus - 1}, not {bad[0]}; e.g. {_example(cfg)!r}"
            )
        ctxs.append(ctx)
        values.append([t - v.content for t in content])
    return world.from_prompts(task, jnp.asarray(ctxs, jnp.int32), jnp.asarray(values, jnp.int32))


def _example(cfg: Config) -> str:
    """A prompt of this task on which the rule fires, as token names."""
    return describe(cfg.task, np.asarray(balanced(cfg.task, jax.random.key(0), 1).tokens[0, : layout(cfg.task).prompt_len]))


def sample_prompts(cfg: Config, seed: int, n_per_class: int) -> Batch:
    """n_per_class prompts on which the rule fires, then n_per_class on which it does not,
    drawn from the world with the member's ``show`` key (not its eval or training draws)."""
    return balanced(cfg.task, role_key(seed, "show"), n_per_class)


def sampling_key(seed: int):
    """The PRNG key `toymesa show --temperature` samples completions with (one per seed)."""
    return jax.random.key(seed)


_decode = jax.jit(evaluate.decode, static_argnums=(0, 4))  # one compile per config and temperature


def completions(cfg: Config, params, batch: Batch, key=None, temperature: float = 0.0) -> list[dict]:
    """One row per prompt: class, prompt and completion as token names, the helpful and
    defect answers, the model's answer and its outcome (`evaluate.OUTCOMES`)."""
    decoded = _decode(cfg, params, batch.tokens, key, temperature)
    code = np.asarray(evaluate.outcome(cfg, decoded, batch))
    decoded, lay = np.asarray(decoded), layout(cfg.task)
    rows = []
    for i in range(decoded.shape[0]):
        rows.append(
            {
                "class": "fires" if bool(batch.triggered[i]) else "does not fire",
                "prompt": describe(cfg.task, decoded[i, : lay.prompt_len]),
                "completion": describe(cfg.task, decoded[i, lay.prompt_len : lay.length]),
                "helpful": describe(cfg.task, [int(batch.correct[i])]),
                "defect": describe(cfg.task, [int(batch.defect[i])]),
                "answer": describe(cfg.task, [int(decoded[i, lay.answer])]),
                "outcome": evaluate.OUTCOMES[int(code[i])],
            }
        )
    return rows
