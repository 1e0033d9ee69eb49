"""Evaluation of a classifier over a dataset: loss, top-1/top-5 and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitkit.data import collate_skip_none


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    count: int
    confusion: torch.Tensor

    def summary(self) -> dict:
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "count": self.count}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k highest logits, for each k (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    device: torch.device,
    batch_size: int = 500,
    num_workers: int = 0,
) -> EvalResult:
    """Mean loss, top-1 and top-5 accuracy (fractions) and confusion matrix of `model` on `dataset`.

    `model` is any callable module from images to logits: a ViT (call this under `vitkit.runtime.autocast`
    for bf16-mixed), or an `InferenceModel` that runs its own precision.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_none, generator=torch.Generator())  # keeps the global RNG still
    loss_sum, correct1, correct5, count = 0.0, 0, 0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for batch in loader:
        if batch is None:
            continue
        images, labels = batch[0].to(device), batch[1].to(device)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        hits = topk_correct(logits, labels, (1, 5))
        correct1 += hits[1]
        correct5 += hits[5]
        count += len(labels)
        confusion += confusion_matrix(logits.argmax(1).cpu(), labels.cpu(), num_classes)
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation set is empty: nothing to evaluate")
    return EvalResult(loss_sum / count, correct1 / count, correct5 / count, count, confusion)
