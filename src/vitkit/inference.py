"""`vitkit eval` and `vitkit predict`: saved weights applied to a dataset or to image files."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from vitkit.atomic import atomic_write_text
from vitkit.data import Transformed, eval_transform, load_dataset, load_image
from vitkit.evaluation import EvalResult, evaluate
from vitkit.flip_averaging import FlipAveraged
from vitkit.inference_modes import InferenceModel
from vitkit.int8_calibration import Int8Calibration, calibrate_int8, first_images
from vitkit.model import ViT
from vitkit.plots import plot_confusion
from vitkit.runtime import Precision, resolve_device
from vitkit.weights import load_pretrained


@dataclass
class InferenceOptions:
    """The options every command that runs saved weights shares."""

    weights: str = ""
    """Weights to run: a vitkit .safetensors file (as written by `vitkit train`), or timm, HF or official weights."""
    precision: Precision = "auto"
    """auto (the default): the fastest mode within the accuracy bound on this machine, by the CPU's features or,
    where they do not decide, timed once on the model and remembered (vitkit.fastest_mode); fp32; bf16 (weights
    cast once); bf16-mixed (bf16 matmuls on fp32 weights); int8 (dynamically quantised linear layers, CPU only)."""
    compile: bool = False
    """torch.compile the model first (a slow first batch, faster ones after)."""
    int8_calibration: str | None = None
    """A file written by `vitkit calibrate` for these weights: int8 (and auto's int8) then quantises each layer's
    input over the range measured there instead of measuring it at every call (faster; values outside it are
    clipped). Default: <weights stem>.int8_calibration.json beside the weights if it is there and fits them (where
    `vitkit calibrate` writes it); 'none': quantise at every call."""
    keep_freed_memory: bool = True
    """On a CPU, let this process keep the memory it frees so that batches reuse it instead of faulting in fresh
    pages (glibc on Linux; vitkit.allocator). The process's memory then stays near its peak."""
    device: str = "auto"
    """'auto' (CUDA if present, else CPU), 'cpu' or 'cuda[:N]'."""


@dataclass
class EvalOptions(InferenceOptions):
    """Evaluate weights on a dataset split."""

    data: str = "fashion-mnist"
    """Dataset name: fashion-mnist, mnist-subset, digits, cifar10, cifar100, image-folder, synthetic."""
    data_dir: str | None = None
    """Where the dataset's files are (default: the dataset's usual places)."""
    split: Literal["test", "val", "train"] = "test"
    batch_size: int = 500
    on_bad_image: Literal["error", "skip"] = "error"
    tta: Literal["none", "flip"] = "none"
    """Test-time augmentation. flip: average each image's class probabilities with its left-right mirror image's,
    twice the time of one pass; for models trained with --data.flip (0.25-0.43 points more on the fast preset's
    Fashion-MNIST models), wrong where mirroring changes the class (digits, letters)."""
    out: str | None = None
    """Write the results (JSON) and a confusion-matrix plot into this directory."""


@dataclass
class PredictOptions(InferenceOptions):
    """Classify image files."""

    topk: int = 5
    """How many classes to list per image."""
    images: list[str] = field(default_factory=list)
    """Image files (any size; resized as the model needs)."""
    explain: bool = False
    """Also write, for each image, the image with its attention-rollout overlay next to its top-k classes as a bar
    chart, into --out."""
    out: str | None = None
    """Directory for the --explain figures, <image name>_explained.png."""


@dataclass
class CalibrateOptions:
    """Measure the activation ranges of int8 inference on dataset images, for `--int8_calibration`."""

    weights: str = ""
    """Weights to calibrate: a vitkit .safetensors file (or timm, HF or official weights)."""
    data: str = "fashion-mnist"
    """Dataset whose images to measure on: fashion-mnist, mnist-subset, digits, cifar10, cifar100, image-folder,
    synthetic. Images like the ones the model will see: values outside the measured ranges are clipped."""
    data_dir: str | None = None
    """Where the dataset's files are (default: the dataset's usual places)."""
    split: Literal["train", "val", "test"] = "train"
    """The split to take images from (not the one you report accuracy on)."""
    images: int = 1000
    """How many images, the split's first ones."""
    batch_size: int = 250
    out: str | None = None
    """The calibration file to write (default: beside the weights, <weights stem>.int8_calibration.json, where eval,
    predict and serve find it)."""
    device: str = "auto"
    """'auto' (CUDA if present, else CPU), 'cpu' or 'cuda[:N]'."""


def calibrate_weights(opts: CalibrateOptions) -> Path:
    """Write the int8 calibration of `opts.weights` measured on `opts.images` images of `opts.data`; its path."""
    if opts.images < 1 or opts.batch_size < 1:
        raise ValueError(f"--images and --batch_size must be at least 1, got {opts.images} and {opts.batch_size}")
    device = resolve_device(opts.device)
    model, preprocess = load_for_inference(opts.weights, device)
    cfg = model.cfg
    data = load_dataset(opts.data, data_dir=opts.data_dir, image_size=cfg.img_size, in_chans=cfg.in_chans)
    split = getattr(data, opts.split)
    images = Transformed(split, eval_transform(*normalisation(preprocess, cfg.in_chans), cfg.img_size))
    count = min(opts.images, len(split))
    calibration = calibrate_int8(model, first_images(images, count, opts.batch_size))
    out = Path(opts.out) if opts.out else default_calibration_path(opts.weights)
    calibration.save(out)
    print(f"int8 calibration of {opts.weights} on {count} {opts.data} {opts.split} images: {out}")
    return out


def load_for_inference(weights: str, device: torch.device) -> tuple[ViT, dict]:
    """The model in a weights file of any format vitkit reads, on `device` in eval mode, and its preprocessing."""
    if not weights:
        raise ValueError("--weights is required: a .safetensors file written by `vitkit train` (or timm, HF or "
                         "official weights)")
    model, preprocess = load_pretrained(weights)
    return model.to(device).eval(), preprocess


def normalisation(preprocess: dict, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the weights were trained with."""
    # Weights imported from elsewhere carry no statistics: the [-1, 1] scaling of the official models.
    mean = tuple(preprocess.get("mean", [0.5] * in_chans))
    std = tuple(preprocess.get("std", [0.5] * in_chans))
    return mean, std


def evaluate_weights(opts: EvalOptions) -> EvalResult:
    if opts.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {opts.batch_size}")
    classifier = ImageClassifier(opts.weights, opts.precision, opts.compile, opts.device, opts.keep_freed_memory,
                                 batch_size=opts.batch_size, int8_calibration=opts.int8_calibration)
    cfg = classifier.model.cfg
    data = load_dataset(opts.data, data_dir=opts.data_dir, image_size=cfg.img_size, in_chans=cfg.in_chans,
                        on_bad_image=opts.on_bad_image)
    if cfg.num_classes != data.num_classes:
        raise ValueError(f"the weights classify {cfg.num_classes} classes but {opts.data} has {data.num_classes}; "
                         "fine-tune them on this dataset first")
    split = Transformed(getattr(data, opts.split), classifier.prepare)
    runner = classifier.runner
    result = evaluate(FlipAveraged(runner) if opts.tta == "flip" else runner, split, data.num_classes,
                      classifier.device, opts.batch_size)
    averaged = ", flip-averaged" if opts.tta == "flip" else ""
    print(f"{opts.data} {opts.split}: top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%  "
          f"loss {result.loss:.4f}  ({result.count} images{averaged})")
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"weights": opts.weights, "data": opts.data, "split": opts.split, "precision": runner.precision,
                  "precision_asked": opts.precision, "compile": opts.compile,
                  "int8_calibrated": runner.int8_calibrated, "tta": opts.tta,
                  **result.summary(), "confusion": result.confusion.tolist(), "class_names": data.class_names}
        atomic_write_text(out / f"eval_{opts.split}.json", json.dumps(report, indent=2) + "\n")
        plot_confusion(result.confusion, data.class_names, out / f"confusion_{opts.split}.png",
                       f"{opts.data} {opts.split}{averaged}: top-1 {100 * result.top1:.2f}%")
    return result


class ImageClassifier:
    """Saved weights ready to classify decoded images: their preprocessing, class names and an inference mode.

    `vitkit predict` and `vitkit serve` both classify through it. The fp32 model stays beside the inference mode's
    copy: attention rollout reads its attention weights.
    """

    def __init__(self, weights: str, precision: Precision = "auto", compile: bool = False, device: str = "auto",
                 keep_freed_memory: bool = False, batch_size: int = 16, int8_calibration: str | None = None):
        self.device = resolve_device(device)
        self.model, preprocess = load_for_inference(weights, self.device)
        cfg = self.model.cfg
        if cfg.num_classes == 0:
            raise ValueError(f"{weights} has no classification head (num_classes=0): nothing to predict")
        self.mean, self.std = normalisation(preprocess, cfg.in_chans)
        self.class_names = list(preprocess.get("class_names") or [str(i) for i in range(cfg.num_classes)])
        self.image_mode = "L" if cfg.in_chans == 1 else "RGB"
        """The mode images are decoded in ("L" grey or "RGB")."""
        self._transform = eval_transform(self.mean, self.std, cfg.img_size)
        found = find_int8_calibration(weights, int8_calibration, self.model) if precision in ("int8", "auto") else None
        calibration, calibration_file = found or (None, None)
        self.runner = InferenceModel(self.model, precision, compile, keep_freed_memory, batch_size,
                                     int8_calibration=calibration)
        """The model in its inference mode; `batch_size` is the batch it mostly runs, at which "auto" is timed."""
        if self.runner.choice is not None:
            # On stderr: stdout holds the results, which scripts read.
            print(f"precision auto: {self.runner.precision} ({self.runner.choice.reason})", file=sys.stderr, flush=True)

        if self.runner.int8_calibrated:
            print(f"int8 calibrated by {calibration_file}", file=sys.stderr, flush=True)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 image (C, H, W) of any size -> the model's normalised input (C, h, w)."""
        return self._transform(image)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) prepared images -> (B, classes) class probabilities."""
        return self.runner(images.to(self.device)).softmax(-1)

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run a batch of each size once, so that a compiled model compiles now rather than at the first request:
        torch compiles batch 1 apart and one graph for every larger size, so (1, 2) covers them all."""
        cfg = self.model.cfg
        for size in batch_sizes:
            self.probabilities(torch.zeros(size, cfg.in_chans, *cfg.img_size))

    def ranked(self, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The `k` most probable (class name, probability) of one image's `probs` (classes,), most probable first."""
        top = probs.topk(min(k, len(self.class_names)))
        return [(self.class_names[i], float(p)) for p, i in zip(top.values, top.indices.tolist())]


def find_int8_calibration(weights: str, asked: str | None, model: ViT) -> tuple[Int8Calibration, Path] | None:
    """The int8 calibration, and its file, to run `model` (loaded from `weights`) with: the one `asked` for (which
    InferenceModel refuses if it does not fit), none for "none", else the one `vitkit calibrate` writes beside the
    weights if it is there and fits them (one that does not, say from before the weights were trained again, is
    ignored with a warning)."""
    if asked == "none":
        return None
    if asked:  # InferenceModel checks that it fits
        return Int8Calibration.load(asked), Path(asked)
    beside = default_calibration_path(weights)
    if not beside.is_file():
        return None
    try:
        calibration = Int8Calibration.load(beside)
        calibration.check(model)
    except ValueError as err:
        warnings.warn(f"ignoring {beside} ({err}); int8 quantises at every call", stacklevel=2)
        return None
    return calibration, beside


def default_calibration_path(weights: str) -> Path:
    """Where `vitkit calibrate` writes the calibration of `weights` unless told otherwise, and where eval, predict and
    serve look for it: beside them, <weights stem>.int8_calibration.json."""
    return Path(weights).with_suffix(".int8_calibration.json")


@torch.no_grad()
def predict_images(opts: PredictOptions) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each image, printed and returned."""
    if opts.topk < 1:
        raise ValueError(f"--topk must be at least 1, got {opts.topk}")
    if not opts.images:
        raise ValueError("give at least one image file to classify")
    if opts.explain and not opts.out:
        raise ValueError("--explain writes a figure per image: give --out DIR, the directory to write them into")
    if opts.explain and Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise ValueError(f"--out {opts.out} exists and is not a directory")
    # One image per call: "auto" is timed at batch 1.
    classifier = ImageClassifier(opts.weights, opts.precision, opts.compile, opts.device, opts.keep_freed_memory,
                                 batch_size=1, int8_calibration=opts.int8_calibration)
    results = []
    taken: set[str] = set()
    for path in opts.images:
        image = classifier.prepare(load_image(path, mode=classifier.image_mode)).unsqueeze(0)  # (1, C, H, W)
        probs = classifier.probabilities(image)[0]
        ranked = classifier.ranked(probs, opts.topk)
        results.append(ranked)
        print(path)
        for name, p in ranked:
            print(f"  {100 * p:6.2f}%  {name}")
        if opts.explain:
            target = Path(opts.out) / explained_name(path, taken)
            explain_prediction(classifier.model, image.to(classifier.device), probs, classifier.class_names, target,
                               Path(path).name, opts.topk, classifier.mean, classifier.std)
            print(f"  wrote {target}")
    return results


def explained_name(path: str, taken: set[str]) -> str:
    """`<stem>_explained.png` for the image file `path`, or `<stem>_2_explained.png`, `_3`, ... when an earlier image
    took that name (kept in `taken`, which this adds to)."""
    stem = Path(path).stem
    name, n = f"{stem}_explained.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}_explained.png"
    taken.add(name)
    return name


def explain_prediction(model: ViT, image: torch.Tensor, probs: torch.Tensor, class_names: list[str], target: Path,
                       label: str, topk: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Write the figure of one prediction to `target`: the image (1, C, H, W) called `label`, its attention rollout
    over it, and the bars of its `topk` classes (`probs` (classes,))."""
    # Imported here: vitkit.inspect draws with matplotlib, which plain predictions need not load.
    from vitkit.inspect.analysis import attention_rollout
    from vitkit.inspect.figures import plot_prediction_explained

    # The fp32 model, not the InferenceModel: rollout needs the attention weights of forward_intermediates.
    rollout = attention_rollout(model, image)
    target.parent.mkdir(parents=True, exist_ok=True)
    best = int(probs.argmax())
    plot_prediction_explained(image[0].cpu(), rollout.maps[0], class_names, probs.float().cpu(), target,
                              title=f"{label}: {class_names[best]} ({float(probs[best]):.1%})", top_k=topk,
                              mean=mean, std=std, source=rollout.source)
