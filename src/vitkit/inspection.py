"""`vitkit inspect`: what saved weights learned, as the figures of the paper's section 4.5 and their arrays.

The patch-embedding filters and the position embeddings are read from the weights alone; the attention
analyses (mean attention distance, rollout) run the model on a few images, taken evenly spaced through a
dataset split or from image files, normalised with the weights' own preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from vitkit.data import eval_transform, load_dataset, load_image
from vitkit.inference import InferenceOptions, load_for_inference, normalisation
from vitkit.model import ViT
from vitkit.runtime import Precision, resolve_device

# vitkit.inspect.report.ANALYSES, written out here because importing vitkit.inspect imports matplotlib, which
# every `vitkit` command line would then pay for; tests/test_inspection.py checks that the two agree.
ANALYSES = ("filters", "pos_embed", "attention_distance", "rollout")
SPLITS = ("test", "val", "train")

Transform = Callable[[torch.Tensor], torch.Tensor]
"""uint8 (C, H, W) -> normalised float (C, H, W) at the model's image size."""


@dataclass
class InspectOptions(InferenceOptions):
    """Write figures of what weights learned: patch-embedding filters, position embeddings, attention."""

    precision: Precision = "fp32"
    """fp32 only: the analyses read the attention weights of the model itself, which the other modes do not
    expose."""
    data: str = "fashion-mnist"
    """Dataset whose images the attention analyses run on: fashion-mnist, mnist-subset, digits, cifar10, cifar100,
    image-folder, synthetic."""
    data_dir: str | None = None
    """Where the dataset's files are (default: the dataset's usual places)."""
    split: Literal["test", "val", "train"] = "test"
    """The split of the dataset the images are taken from."""
    images: list[str] = field(default_factory=list)
    """Image files to run the attention analyses on instead of the dataset (any size; resized as the model
    needs)."""
    count: int = 16
    """How many images of the split the attention distance is averaged over and the rollout is computed for,
    evenly spaced through the split (the rollout figure shows the first 8)."""
    analyses: list[str] = field(default_factory=lambda: list(ANALYSES))
    """Which figures to write: filters (principal components of the patch-embedding filters), pos_embed
    (similarity of the position embeddings), attention_distance (mean attention distance of each head and
    layer), rollout (attention rollout over the images)."""
    out: str = ""
    """Directory to write <analysis>.png and arrays.npz (the figures' numbers) into; required."""
    seed: int = 0
    """Picks the validation split from the training images, as in training (for --split val)."""


def check_options(opts: InspectOptions) -> tuple[str, ...]:
    """The analyses asked for; ValueError naming the bad value for anything that cannot run."""
    from vitkit.inspect.report import check_analyses

    names = check_analyses(opts.analyses)
    if not opts.out:
        raise ValueError("--out is required: the directory to write the figures and arrays.npz into")
    if opts.precision != "fp32" or opts.compile:
        # The analyses read attention weights from the model itself, which InferenceModel's modes do not expose.
        given = f"--precision {opts.precision}" if opts.precision != "fp32" else "--compile"
        raise ValueError(f"vitkit inspect runs the weights in fp32, uncompiled (it reads their attention weights): "
                         f"{given} does not apply; leave it out")
    if opts.split not in SPLITS:
        raise ValueError(f"unknown split {opts.split!r}: choose one of {list(SPLITS)}")
    if isinstance(opts.count, bool) or not isinstance(opts.count, int) or opts.count < 1:
        raise ValueError(f"--count must be a whole number of at least 1, got {opts.count!r}")
    for path in opts.images:
        if not str(path).strip():
            raise ValueError(f"--images holds an empty file name: {list(opts.images)}")
    return names


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` distinct indices out of range(total), evenly spaced from 0 (all of them if count >= total)."""
    count = min(count, total)
    return [i * total // count for i in range(count)]


def split_images(opts: InspectOptions, model: ViT, transform: Transform) -> torch.Tensor:
    """(count, C, H, W) normalised images, evenly spaced through the chosen split of the dataset."""
    cfg = model.cfg
    data = load_dataset(opts.data, data_dir=opts.data_dir, seed=opts.seed, image_size=cfg.img_size,
                        in_chans=cfg.in_chans)
    split = getattr(data, opts.split)
    if len(split) == 0:
        raise ValueError(f"the {opts.split} split of {opts.data} holds no images: choose another --split")
    return torch.stack([transform(split[i][0]) for i in evenly_spaced(len(split), opts.count)])


def file_images(paths: list[str], model: ViT, transform: Transform) -> torch.Tensor:
    """(len(paths), C, H, W) normalised images decoded from files (BadImageError naming an unreadable one)."""
    mode = "L" if model.cfg.in_chans == 1 else "RGB"
    return torch.stack([transform(load_image(path, mode=mode)) for path in paths])


def inspect_weights(opts: InspectOptions) -> dict[str, Path]:
    """Write the chosen analyses of `opts.weights` into `opts.out`; returns the written paths by analysis name
    and "arrays". Every input is checked, and the images decoded, before anything is written."""
    names = check_options(opts)
    from vitkit.inspect.report import NEEDS_IMAGES, write_inspection

    device = resolve_device(opts.device)
    model, preprocess = load_for_inference(opts.weights, device)
    cfg = model.cfg
    mean, std = normalisation(preprocess, cfg.in_chans)
    transform = eval_transform(mean, std, cfg.img_size)
    images = None
    if opts.images:  # given files are decoded even when no analysis needs them: a bad one is still an error
        images = file_images(opts.images, model, transform)
    elif any(name in NEEDS_IMAGES for name in names):
        images = split_images(opts, model, transform)
    written = write_inspection(model, images, opts.out, names, mean, std)
    for path in written.values():
        print(f"wrote {path}")
    return written
