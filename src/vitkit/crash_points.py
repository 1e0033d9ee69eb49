"""Named places where a test can kill the process, to prove that a crash there loses nothing.

With the environment variable VITKIT_CRASH_AT="<point>:<n>", the n-th arrival (counting from 1) at
`reached("<point>")` kills this process with SIGKILL, as a power cut or the kernel's OOM killer would:
no cleanup, no `finally`, no flushing. Without the variable (always, outside tests) `reached` returns
at once.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = ("atomic.before_replace", "checkpoint.after_weights", "checkpoint.before_pointer", "train.after_step")
_arrivals: Counter[str] = Counter()


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("VITKIT_CRASH_AT")
    if not spec:
        return None
    point, _, count = spec.rpartition(":")
    if point not in POINTS or not count.isdigit():
        raise ValueError(f"VITKIT_CRASH_AT={spec!r}: expected '<point>:<n>' with point one of {POINTS}")
    return point, int(count)


_TARGET = _target()


def reached(point: str) -> None:
    if _TARGET is None or point != _TARGET[0]:
        return
    _arrivals[point] += 1
    if _arrivals[point] == _TARGET[1]:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
