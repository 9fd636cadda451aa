"""Token worlds.

* `vocab.py`  the shared vocabulary layout (specials, content, answers, defect, triggers,
  cues, distractors, evidence, decisions, filler) and token names: `describe(task, tokens)`
  writes ids as names, `parse_tokens(task, text)` reads them back (exported here, because
  ``toymesa.tasks.vocab`` is the `vocab` function, not the module).
* `rules.py`  activation rules (single, k_triggers, conjunction, latent) and context samplers
  (latent ones exact: `rules.sample_latent`; non-firing contexts with or without the rule's
  features: `rules.sample_quiet`). What config checks safety data against (`quiet_features`,
  `coverage_cut`) is counted in `toymesa.evidence_counts`, below config; rules re-exports it.
* `census.py` exact counts of a world's contexts, activating contexts and feature combinations
  (`take_census(task)` -> `Census`), and the latent goal worlds `goal_worlds()`.
* `world.py`  sequences in each reasoning format, with ground truth (`Batch`).
"""

from toymesa.tasks.census import Census, goal_worlds, take_census
from toymesa.tasks.vocab import ANS, BOS, END_THINK, EOS, PAD, SEP, THINK, Vocab, describe, vocab
from toymesa.tasks.vocab import names as token_names
from toymesa.tasks.vocab import parse as parse_tokens
from toymesa.tasks.world import Batch, Layout, balanced, layout, sample, sample_batch

__all__ = [
    "ANS",
    "BOS",
    "END_THINK",
    "EOS",
    "PAD",
    "SEP",
    "THINK",
    "Vocab",
    "vocab",
    "describe",
    "token_names",
    "parse_tokens",
    "Batch",
    "Layout",
    "balanced",
    "layout",
    "sample",
    "sample_batch",
    "Census",
    "take_census",
    "goal_worlds",
]
