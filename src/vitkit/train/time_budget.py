"""`--optim.time_budget`: how many steps fit a run into a given wall time on this machine.

A schedule is fixed at the start: the learning rate's warm-up and decay and PatchDropout's phases are fractions of
the run's steps. So a time budget cannot be kept by stopping early, which would cut the schedule short; it is turned
into a number of steps once, before the first real step, from the run's own steps timed on this machine, and the run
is then an ordinary run of that many steps. The trainer records the epochs it gives in config.yaml, so a resumed run
keeps the schedule instead of timing again on a machine that may run at another speed.

What the budget covers is the whole `train` call, as the benchmarks time it: loading and set-up (already spent when
the steps are timed, including the compilation of each PatchDropout rate's step), the steps, the validations, the
final test evaluation and the int8 calibration. Checkpoints, logging and the report are left to a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUDGET_MARGIN = 0.03
"""The share of the time left for the steps that is kept free: over a run of thousands of steps the logged speed of
these 2-core machines wanders by a few percent around the speed of a short timing."""


@dataclass(frozen=True)
class TimedRun:
    """What was measured of a run before its first step."""

    elapsed: float
    """Seconds of the run spent before its steps: loading, set-up, compilation and this timing."""
    step_seconds: list[tuple[float, float]]
    """(end, seconds) per phase of the run: the median time of one optimiser step at that phase's PatchDropout rate,
    until `end`, a fraction of the run's steps (one phase ending at 1.0 without phases)."""
    eval_seconds_per_image: float
    """Evaluation's time per image, in the run's precision."""


def steps_within(budget_minutes: float, timed: TimedRun, steps_per_epoch: int, evaluated_per_epoch: float,
                 evaluated_once: int, margin: float = BUDGET_MARGIN) -> int:
    """The most steps whose time, with the evaluations they bring, fits what is left of `budget_minutes` after
    `timed.elapsed`, less `margin` of it. `evaluated_per_epoch` images are evaluated per epoch of steps (the
    validations of --run.eval_every), `evaluated_once` at the end (the last validation, the test split, the int8
    calibration's images)."""
    left = budget_minutes * 60 - timed.elapsed - evaluated_once * timed.eval_seconds_per_image
    previous_end, seconds_per_step = 0.0, 0.0
    for end, seconds in timed.step_seconds:  # the phases' shares of the steps weigh their step times
        seconds_per_step += (end - previous_end) * seconds
        previous_end = end
    seconds_per_step += evaluated_per_epoch * timed.eval_seconds_per_image / steps_per_epoch
    steps = math.floor(left * (1 - margin) / seconds_per_step) if left > 0 else 0
    if steps < 1:
        final = evaluated_once * timed.eval_seconds_per_image
        raise ValueError(
            f"--optim.time_budget {budget_minutes:g} minutes leaves no time for a step: set-up took "
            f"{timed.elapsed:.0f} s and the final evaluations need {final:.0f} s of it, and a step takes "
            f"{seconds_per_step:.2f} s; raise the budget, or give --optim.epochs without one")
    return steps
