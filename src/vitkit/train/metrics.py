"""Where a run's metrics go: one JSON line per record in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

from vitkit.atomic import atomic_write_text


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        """`resume_step`: a resumed run continues from this step; records logged after it by the interrupted
        run (steps it is about to redo, or a line cut short by a kill) are dropped, so no step appears twice."""
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if (record := _record(line)) is not None and record["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step hides the interrupted run's events from the resumed step on.
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict, step: int) -> None:
        record = {"step": step, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _record(line: str) -> dict | None:
    """One metrics.jsonl line as a record with an integer step, or None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [record for line in path.read_text().splitlines() if (record := _record(line)) is not None]
