"""`--optim.time_budget`: how many steps fit a run into a given wall time on this machine.

A schedule is fixed at the start: the learning rate's warm-up and decay and PatchDropout's phases are fractions of
the run's steps. So a time budget cannot be kept by stopping early, which would cut the schedule short; it is turned
into a number of steps before the first real step, from the run's own steps timed on this machine. A short timing
misses a 2-core machine's speed by up to a few tens of percent when it falls in a fast or slow spell, and the speed
wanders during a run, so the plan is corrected at every epoch's end or checkpoint from the time the steps since the
last correction took (`corrected`, then `steps_within(done=)`). The trainer records the epochs in config.yaml before
each checkpoint is written, so a resumed run keeps the schedule of its checkpoint instead of timing again on a
machine that may run at another speed, and resuming stays exact.

What the budget covers is the whole `train` call, as the benchmarks time it: loading and set-up (already spent when
the steps are timed, including the compilation of each PatchDropout rate's step), the steps, the validations, the
final test evaluation and the int8 calibration. Checkpoints, logging and the report are left to a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

BUDGET_MARGIN = 0.03
"""The share of the budget kept free: for the checkpoints, logging and the report, and for the wander of these 2-core
machines' speed after the plan's last correction. A share of the whole budget, not of what is left, so that a late
correction keeps it."""


@dataclass(frozen=True)
class TimedRun:
    """What was measured of a run before its first step (or, corrected, by an epoch's end or checkpoint)."""

    elapsed: float
    """Seconds of the run spent so far: loading, set-up, compilation, this timing (and the steps already taken)."""
    step_seconds: list[tuple[float, float]]
    """(end, seconds) per phase of the run: the median time of one optimiser step at that phase's PatchDropout rate,
    until `end`, a fraction of the run's steps (one phase ending at 1.0 without phases)."""
    eval_seconds_per_image: float
    """Evaluation's time per image, in the run's precision."""


def seconds_of_steps(step_seconds: list[tuple[float, float]], total: int, first: int, last: int) -> float:
    """The time steps `first` to `last` (0-based, `last` excluded) of a run of `total` steps take at `step_seconds`
    (TimedRun's phases, each a share of `total`)."""
    seconds, start = 0.0, 0.0
    for end, per_step in step_seconds:
        seconds += max(0.0, min(end * total, last) - max(start * total, first)) * per_step
        start = end
    return seconds


def steps_within(budget_minutes: float, timed: TimedRun, steps_per_epoch: int, evaluated_per_epoch: float,
                 evaluated_once: int, margin: float = BUDGET_MARGIN, done: int = 0) -> int:
    """The most steps whose time, with the evaluations they bring, fits what is left of `budget_minutes`, less
    `margin` of it, after `timed.elapsed`. `evaluated_per_epoch` images are evaluated per epoch of steps (the
    validations of --run.eval_every), `evaluated_once` at the end (the last validation, the test split, the int8
    calibration's images). `done`: steps the run has already taken (their time is in `timed.elapsed`); the answer
    counts them and is never fewer."""
    available = budget_minutes * 60 * (1 - margin) - timed.elapsed - evaluated_once * timed.eval_seconds_per_image
    eval_per_step = evaluated_per_epoch * timed.eval_seconds_per_image / steps_per_epoch

    def seconds(total: int) -> float:  # of steps `done` to `total`, rising with `total`
        return seconds_of_steps(timed.step_seconds, total, done, total) + (total - done) * eval_per_step

    fastest = max(min(per_step for _, per_step in timed.step_seconds) + eval_per_step, 1e-9)
    low, high = done, done + max(0, math.ceil(available / fastest)) + 1  # seconds(low) <= available < seconds(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if seconds(middle) <= available else (low, middle)
    if low < 1:
        final = evaluated_once * timed.eval_seconds_per_image
        raise ValueError(
            f"--optim.time_budget {budget_minutes:g} minutes leaves no time for a step: set-up took "
            f"{timed.elapsed:.0f} s and the final evaluations need {final:.0f} s of it, and a step takes "
            f"{seconds(1):.2f} s; raise the budget, or give --optim.epochs without one")
    return low


def corrected(timed: TimedRun, total: int, first: int, last: int, seconds_in_steps: float,
              elapsed: float) -> TimedRun:
    """`timed` after steps `first` to `last` (`last` excluded) of `total` planned steps took `seconds_in_steps`, at
    `elapsed` seconds into the run: every phase's step time scaled by how much slower (or faster) those steps ran
    than `timed` has them. The latest steps stand for all: what moves a 2-core machine's speed moves every step
    alike, and a phase that has begun is measured in its own steps."""
    expected = seconds_of_steps(timed.step_seconds, total, first, last)
    scale = seconds_in_steps / expected
    return replace(timed, elapsed=elapsed, step_seconds=[(end, per_step * scale)
                                                         for end, per_step in timed.step_seconds])
