"""The PNG plots of a run and of an evaluation: training curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import torch


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
    if ax_acc.get_legend_handles_labels()[0]:
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
