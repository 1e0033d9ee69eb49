"""Accuracy, confusion matrices, and where metrics go: JSONL, TensorBoard and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vitkit.atomic import atomic_write_text


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k highest logits, for each k (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


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


def plot_curves(records: list[dict], out_path: Path) -> None:
    """Training loss and validation accuracy against steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/top1" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="Loss")
    if val:
        ax_acc.plot([r["step"] for r in val], [100 * r["val/top1"] for r in val], marker="o", label="validation")
    if train and "train/top1" in train[0]:
        ax_acc.plot([r["step"] for r in train], [100 * r["train/top1"] for r in train], lw=1, alpha=0.6,
                    label="training (augmented)")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy (%)", title="Accuracy")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: torch.Tensor, class_names: list[str], out_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    rates = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=60, ha="right")
        ax.set_yticks(range(n), class_names)
        for i in range(n):
            for j in range(n):
                count = int(matrix[i, j])
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
