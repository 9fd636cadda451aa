"""Study phases after training: what a spec asks to measure on the models a sweep stored.

Each phase is a function ``(spec, out, progress, echo)`` over the run folder's stored
population, chunked and resumable through `toymesa.measure`; the runner calls `after_training`
once, so a new phase is a new entry in `PHASES`, not a branch in the runner.
"""

from __future__ import annotations

from toymesa.meter import stored

PHASES = (stored.spec_phase,)  # [meter]


def after_training(spec, out, progress: bool = True, echo=print) -> None:
    for phase in PHASES:
        phase(spec, out, progress, echo)
