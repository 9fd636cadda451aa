"""Token worlds.

* `vocab.py`  the shared vocabulary layout (specials, content, answers, defect, triggers,
  cues, distractors, evidence, decisions, filler).
* `rules.py`  activation rules (single, k_triggers, conjunction, latent) and context samplers.
* `world.py`  sequences in each reasoning format, with ground truth (`Batch`).
"""

from toymesa.tasks.vocab import ANS, BOS, END_THINK, EOS, PAD, SEP, THINK, Vocab, vocab
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
    "Batch",
    "Layout",
    "balanced",
    "layout",
    "sample",
    "sample_batch",
]
