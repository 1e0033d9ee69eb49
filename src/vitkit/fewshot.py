"""`vitkit fewshot`: the paper's few-shot linear evaluation, a fast probe of representation quality.

K images per class are drawn from the training split, their frozen representations (the head's
input) are mapped to {-1, 1}^classes targets by closed-form regularised least squares, and the fit is
scored on the test split. The ridge penalty is chosen per draw on the validation split, never on the
test split, and the accuracy is averaged over several seeded draws.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch
from torch.utils.data import DataLoader, Subset

from vitkit.atomic import atomic_write_text
from vitkit.data import Transformed, collate_skip_none, eval_transform, load_dataset
from vitkit.data.splits import DataSplits, dataset_labels
from vitkit.inference import InferenceOptions, normalisation
from vitkit.inference_modes import InferenceModel
from vitkit.model import ViT, adapt_for_finetune, check_image_size
from vitkit.runtime import Precision, resolve_device
from vitkit.weights import load_pretrained


@dataclass
class FewShotOptions(InferenceOptions):
    """Probe the frozen representation of weights (any file vitkit reads) with K images per class."""

    precision: Precision = "fp32"
    """fp32 (the default: the accuracy bound the other modes are held to is on classifications, not on the
    features a probe fits); bf16; bf16-mixed; int8 (CPU only); auto (the fastest of them on this machine)."""
    data: str = "fashion-mnist"
    """Dataset name: fashion-mnist, mnist-subset, digits, cifar10, cifar100, image-folder, synthetic."""
    data_dir: str | None = None
    """Where the dataset's files are (default: the dataset's usual places)."""
    shots: int | list[int] = 10
    """Training images per class, e.g. 10 or [1,5,10,25] (one result per value)."""
    draws: int = 5
    """Seeded random draws of the K images per class; the accuracy is their mean."""
    seed: int = 0
    l2: float | list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])
    """Ridge penalty, or penalties to try: each draw uses the one with the best validation accuracy."""
    resolution: int | None = None
    """Feed images at this size (the position embedding is resampled); default: the weights' image size."""
    random_init: bool = False
    """Probe a randomly initialised model of the same architecture instead (the baseline to beat)."""
    batch_size: int = 256
    on_bad_image: Literal["error", "skip"] = "error"
    out: str | None = None
    """Write the results (JSON) into this directory."""


@torch.no_grad()
def extract_features(model: ViT, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, C, H, W) normalised images -> (N, num_features) frozen representations (the head's input)."""
    was_training = model.training
    model.eval()
    out = [model.forward_head(model.forward_features(images[i:i + batch_size]), pre_logits=True).float()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     l2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression from features to {-1, 1}^K targets (the paper's few-shot probe).

    Minimises ||[X 1] W - Y||^2 + l2 ||W_x||^2 (the bias is not regularised) and returns
    (weight (D, K), bias (K,)). Predict with argmax(X W + b).
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x = features.double()
    n, d = x.shape
    targets = -torch.ones(n, num_classes, dtype=torch.float64)
    targets[torch.arange(n), labels.long()] = 1.0
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)  # (N, D + 1)
    reg = l2 * torch.eye(d + 1, dtype=torch.float64)
    reg[d, d] = 0.0
    w = torch.linalg.solve(xb.T @ xb + reg, xb.T @ targets)  # (D + 1, K)
    return w[:d], w[d]


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """`shots` random indices of each class, drawn with `seed`."""
    counts = torch.bincount(labels.long())
    if int((counts > 0).sum()) < 2:
        raise ValueError("few-shot evaluation needs a dataset with at least 2 classes")
    smallest = int(counts[counts > 0].min())
    if shots < 1 or shots > smallest:
        raise ValueError(f"--shots {shots} must be between 1 and the size of the smallest class ({smallest} "
                         "training images)")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for k in range(len(counts)):
        members = torch.nonzero(labels == k).flatten()
        if len(members):
            picked.append(members[torch.randperm(len(members), generator=g)[:shots]])
    return torch.cat(picked)


@dataclass
class FewShotResult:
    shots: int
    accuracies: list[float]
    """Test accuracy of each draw."""
    l2: list[float]
    """The ridge penalty each draw chose on the validation split."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def few_shot_eval(opts: FewShotOptions) -> list[FewShotResult]:
    """Run the few-shot evaluation `opts` describes; prints a table and returns one result per K."""
    opts = replace(opts, shots=_as_list(opts.shots), l2=_as_list(opts.l2))
    _check(opts)
    device = resolve_device(opts.device)
    if not opts.weights:
        raise ValueError("--weights is required: the weights whose representation to probe")
    pretrained, preprocess = load_pretrained(opts.weights)
    cfg = pretrained.cfg
    size = (opts.resolution, opts.resolution) if opts.resolution else cfg.img_size
    data = load_dataset(opts.data, data_dir=opts.data_dir, image_size=size, in_chans=cfg.in_chans,
                        on_bad_image=opts.on_bad_image, seed=opts.seed)
    check_image_size(size, cfg.patch_size, what="--resolution", stem_stride=cfg.stem_stride)
    draws = draw_shots(data, opts.shots, opts.draws, opts.seed)  # before anything heavy, so a bad K fails at once

    model = adapt_for_finetune(pretrained, data.num_classes, img_size=size, keep_pre_logits=True)
    if opts.random_init:
        torch.manual_seed(opts.seed)
        model = ViT(model.cfg)
    model.reset_classifier(0)  # the model now returns its representation (the head's input)
    model = InferenceModel(model.to(device), opts.precision, opts.compile, keep_freed_memory=opts.keep_freed_memory)
    mean, std = normalisation(preprocess, cfg.in_chans)
    results = probe(model, data, eval_transform(mean, std, size), draws, opts.l2, opts.batch_size, device)
    what = "random init" if opts.random_init else Path(opts.weights).name
    for r in results:
        print(f"{r.shots:>3}-shot {data.name} ({what}): test top-1 {100 * r.mean:.2f}% "
              f"+- {100 * r.std:.2f} over {len(r.accuracies)} draws")
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"weights": opts.weights, "dataset": data.name, "random_init": opts.random_init,
                   "image_size": list(size), "results": [
                       {"shots": r.shots, "mean_top1": r.mean, "std_top1": r.std, "draws": r.accuracies,
                        "l2": r.l2} for r in results]}
        atomic_write_text(out / "fewshot.json", json.dumps(summary, indent=2) + "\n")
    return results


def draw_shots(data: DataSplits, shots: list[int], draws: int, seed: int) -> dict[int, list[torch.Tensor]]:
    """For each K of `shots`, `draws` seeded draws of K training images per class (indices into `data.train`)."""
    if data.num_classes < 2:
        raise ValueError(f"{data.name} has {data.num_classes} class: few-shot classification needs at least 2")
    labels = _labels(data.train)
    return {k: [few_shot_indices(labels, k, seed * 1_000_003 + d) for d in range(draws)] for k in shots}


def probe(represent: Callable[[torch.Tensor], torch.Tensor], data: DataSplits, transform,
          draws: dict[int, list[torch.Tensor]], l2: list[float], batch_size: int = 256,
          device: torch.device | str = "cpu") -> list[FewShotResult]:
    """The ridge probe of a frozen representation: one result per K of `draws` (see `draw_shots`).

    `represent` maps a batch of images, as `transform` prepares them, to their (B, F) features: a model without
    its head, or any classifier through `lambda x: model.forward_head(model.forward_features(x), pre_logits=True)`
    (in eval mode, under no_grad). Each draw's ridge penalty is the one of `l2` with the best validation accuracy.
    """
    needed = torch.unique(torch.cat([i for per_k in draws.values() for i in per_k]))
    train_labels = _labels(data.train)
    features = _features(represent, data.train, needed.tolist(), transform, batch_size, device)
    train_features = dict(zip(needed.tolist(), features))
    val_features, test_features = (
        _features(represent, split, list(range(len(split))), transform, batch_size, device, width=features.shape[1])
        for split in (data.val, data.test))
    val_labels, test_labels = _labels(data.val), _labels(data.test)
    if len(val_labels) == 0 and len(l2) > 1:
        raise ValueError(f"{data.name} has no validation split to choose the ridge penalty on: give one --l2 value")

    results = []
    for k, per_k in draws.items():
        accuracies, chosen = [], []
        for picked in per_k:
            x = torch.stack([train_features[i] for i in picked.tolist()])
            fits = [(value, fit_linear_probe(x, train_labels[picked], data.num_classes, value)) for value in l2]
            best, (w, b) = max(fits, key=lambda f: _accuracy(val_features, val_labels, *f[1]) if len(val_labels)
                               else 0)
            accuracies.append(_accuracy(test_features, test_labels, w, b))
            chosen.append(best)
        results.append(FewShotResult(k, accuracies, chosen))
    return results


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check(opts: FewShotOptions) -> None:
    if not opts.shots or any(k < 1 for k in opts.shots):
        raise ValueError(f"--shots must be positive numbers of images per class, got {opts.shots}")
    if opts.draws < 1:
        raise ValueError(f"--draws must be at least 1, got {opts.draws}")
    if not opts.l2 or any(not (v >= 0 and math.isfinite(v)) for v in opts.l2):
        raise ValueError(f"--l2 must be finite penalties >= 0, got {opts.l2}")
    if opts.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {opts.batch_size}")


def _labels(dataset) -> torch.Tensor:
    return torch.as_tensor(dataset_labels(dataset), dtype=torch.int64)


@torch.no_grad()
def _features(represent: Callable[[torch.Tensor], torch.Tensor], dataset, indices: list[int], transform,
              batch_size: int, device: torch.device | str, width: int = 0) -> torch.Tensor:
    """(len(indices), num_features) representations of the dataset's images at `indices` ((0, width) for none)."""
    loader = DataLoader(Subset(Transformed(dataset, transform), indices), batch_size=batch_size,
                        collate_fn=collate_skip_none)
    out = [represent(batch[0].to(device)).float().cpu() for batch in loader if batch is not None]
    if sum(len(o) for o in out) != len(indices):
        raise ValueError("some images could not be read (see above); few-shot evaluation needs every image of "
                         "the draws and of the validation and test splits")
    return torch.cat(out) if out else torch.zeros(0, width)


def _accuracy(features: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    predictions = (features.double() @ w + b).argmax(1)
    return float((predictions == labels).double().mean())
