"""What a training run optimises: the objective interface, and supervised classification.

The trainer owns everything an objective should not have to think about: the data order, micro-batches and
processes, precision and compilation, checkpoints and exact resume, logging and plots. An objective says
what the model is asked to do:

- `head_size(data)`: the classes of the model's head it needs (0: no head, the encoder alone);
- `prepare(model, data)`: called once the model is built, before the optimiser: check the model, build what
  depends on it (an objective's own parameters);
- `network(model)`: the module the trainer wraps (DDP, torch.compile, autocast) and hands to `loss` as
  `forward`: the model itself, or a module around it and the objective's parameters when the loss needs more
  of the model than its forward (DDP averages gradients only of what runs through its wrapper);
- `noise_shape(model)`: the per-image uniform noise its random choices draw from, or None. The trainer draws
  it for the whole global batch from (seed, epoch, batch), so every image gets the same draw however the
  batch is split over processes and micro-batches, and again on resume;
- `mix(images, labels, seed)`: batch-level changes of the inputs and targets (mixup), seeded by the trainer;
- `loss(forward, images, targets, labels, noise)`: the loss of one micro-batch and its sums to log.
  `forward` is the model as the trainer runs it (data-parallel, compiled, in its precision). The sums must
  hold "loss" (the loss summed over the images) and "seen" (the image count); the trainer adds them over
  micro-batches and processes;
- `train_metrics(window, steps)`: what to log of a window of steps;
- `evaluate(model, dataset, device)`: an `Evaluation` of a held-out split (the best one is kept);
- `report(run_dir, data, val, test)`: the objective's part of results.json, and its plots.

An objective is a module: parameters it owns (a mask embedding, a prediction head) are trained and
checkpointed with the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.evaluation import EvalResult, evaluate, topk_correct
from vitkit.plots import plot_confusion


class StepLoss(NamedTuple):
    loss: torch.Tensor
    """The scalar to differentiate: the mean loss over the micro-batch."""
    sums: dict[str, float]
    """Sums over the micro-batch's images: "loss" and "seen" at least."""


@dataclass
class Evaluation:
    metrics: dict[str, float]
    """Logged as val/<name> (or test/<name>)."""
    score: float
    """Higher is better: the best validation score's weights are kept as best.safetensors."""
    text: str
    """One line for the console."""
    result: Any = None
    """The objective's own result object (an EvalResult for classification)."""


class Objective(nn.Module):
    """The interface the trainer calls; see the module's docstring."""

    def head_size(self, data) -> int:
        return 0

    def prepare(self, model: nn.Module, data) -> None:
        pass

    def network(self, model: nn.Module) -> nn.Module:
        return model

    def noise_shape(self, model) -> tuple[int, ...] | None:
        return None

    def mix(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return images, labels

    def loss(self, forward: Callable[..., torch.Tensor], images: torch.Tensor, targets: torch.Tensor,
             labels: torch.Tensor, noise: torch.Tensor | None) -> StepLoss:
        raise NotImplementedError

    def train_metrics(self, window: dict[str, float], steps: int) -> dict[str, float]:
        """`window["loss"]` is the sum of the steps' mean losses; the other sums are over images."""
        return {"train/loss": window["loss"] / steps}

    def evaluate(self, model: nn.Module, dataset, device: torch.device) -> Evaluation:
        raise NotImplementedError

    def report(self, run_dir: Path, data, val: Evaluation | None, test: Evaluation | None) -> dict:
        out = {}
        if val is not None:
            out["val"] = val.metrics
        if test is not None:
            out["test"] = test.metrics
        return out


class Classification(Objective):
    """Supervised classification: cross-entropy with label smoothing, optional mixup/CutMix, top-1 accuracy.

    With the model's PatchDropout on, the noise is the per-patch scores that choose the kept patches. The model is a
    ViT or any classifier with `cfg.num_classes` and a `head` (the ResNet baseline).
    """

    def __init__(self, label_smoothing: float = 0.0, mixer: Callable | None = None, loss: str = "softmax"):
        super().__init__()
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown classification loss {loss!r}: choose softmax or sigmoid")
        self.label_smoothing = label_smoothing
        self.mixer = mixer
        self.kind = loss

    def head_size(self, data) -> int:
        if data.num_classes < 2:
            raise ValueError(f"dataset {data.name} has {data.num_classes} class; classification needs at least 2 "
                             "(an image folder needs one sub-folder per class)")
        return data.num_classes

    def prepare(self, model: nn.Module, data) -> None:
        if self.kind == "sigmoid" and isinstance(model.head, nn.Linear) and not model.head.bias.any():
            # A zero bias starts every class at probability 0.5, and the first steps only push all the logits
            # down together; starting at the prior 1/K lets them learn the classes at once.
            with torch.no_grad():
                model.head.bias.fill_(-math.log(model.head.out_features - 1))

    def noise_shape(self, model) -> tuple[int, ...] | None:
        cfg = model.cfg
        # A model without patch tokens (the ResNet baseline) has no PatchDropout and takes no noise.
        return (cfg.grid_size[0] * cfg.grid_size[1],) if getattr(cfg, "patch_dropout", 0.0) > 0 else None

    def mix(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixer is None:
            return images, labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.mixer(images, labels)

    def loss(self, forward, images, targets, labels, noise) -> StepLoss:
        logits = forward(images) if noise is None else forward(images, patch_noise=noise)
        if self.kind == "sigmoid":
            loss = sigmoid_cross_entropy(logits.float(), targets, self.label_smoothing)
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        correct = topk_correct(logits.detach().float(), labels, (1,))[1]
        return StepLoss(loss, {"loss": loss.item() * len(images), "correct": float(correct),
                               "seen": float(len(images))})

    def train_metrics(self, window: dict[str, float], steps: int) -> dict[str, float]:
        return {"train/loss": window["loss"] / steps, "train/top1": window["correct"] / window["seen"]}

    def evaluate(self, model, dataset, device) -> Evaluation:
        result = evaluate(model, dataset, self._num_classes(model), device)
        text = (f"top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%  (loss {result.loss:.3f}, "
                f"{result.count} images)")
        return Evaluation({"loss": result.loss, "top1": result.top1, "top5": result.top5}, result.top1, text, result)

    def report(self, run_dir: Path, data, val: Evaluation | None, test: Evaluation | None) -> dict:
        out = {}
        if val is not None:
            out["val"] = val.result.summary()
        if test is not None:
            result: EvalResult = test.result
            out.update({"test": result.summary(), "test_confusion": result.confusion.tolist(),
                        "class_names": data.class_names})
            plot_confusion(result.confusion, data.class_names, run_dir / "plots" / "confusion_test.png",
                           f"{data.name} test: top-1 {100 * result.top1:.2f}%")
        return out

    @staticmethod
    def _num_classes(model: nn.Module) -> int:
        return model.cfg.num_classes


def sigmoid_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy of every class's logit against its target, summed over the classes and averaged over
    the images. `targets` are class indices (B,) or class probabilities (B, K) (after mixup); label smoothing
    mixes the uniform distribution in, as for softmax."""
    if targets.ndim == 1:
        targets = F.one_hot(targets, logits.shape[1]).to(logits.dtype)  # (B, K)
    targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1).mean()
