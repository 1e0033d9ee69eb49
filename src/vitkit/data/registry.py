"""`load_dataset`: every dataset vitkit knows, by name, as DataSplits."""

from __future__ import annotations

import difflib
import os
from dataclasses import replace

from vitkit.data import cifar, digits, fashion_mnist, image_folder, mnist_subset, synthetic
from vitkit.data.channels import convert_channels
from vitkit.data.splits import DataSplits
from vitkit.data.stats import channel_stats
from vitkit.data.tensor_dataset import ImageTensorDataset

DATASETS = ("fashion-mnist", "mnist-subset", "digits", "image-folder", "cifar10", "cifar100", "synthetic")
_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
            "imagefolder": "image-folder", "folder": "image-folder"}


def canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        close = difflib.get_close_matches(key, DATASETS, n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{suggestion}: choose one of {', '.join(DATASETS)}")
    return key


def with_channels(splits: DataSplits, in_chans: int) -> DataSplits:
    """In-memory splits converted to `in_chans` channels (1 <-> 3); mean and std follow."""
    if in_chans == splits.in_chans:
        return splits
    parts = {}
    for split in ("train", "val", "test"):
        part = getattr(splits, split)
        parts[split] = ImageTensorDataset(convert_channels(part.images, in_chans), part.labels, part.indices)
    if in_chans == 3:  # grey copied to three channels: the same statistics in each
        mean, std = splits.mean * 3, splits.std * 3
    else:
        mean, std = channel_stats(parts["train"].images)
    return replace(splits, **parts, in_chans=in_chans, mean=mean, std=std)


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, val_size: int | float | None = None,
                 seed: int = 0, download: bool = False, image_size=None, in_chans: int | None = None,
                 on_bad_image: str = "error", **options) -> DataSplits:
    """The dataset `name` (one of DATASETS) as train / val / test splits with its statistics.

    name: fashion-mnist, mnist-subset, digits, image-folder, cifar10, cifar100 or synthetic;
        each one's module docstring documents its files, splits and constants.
    data_dir: where the files are (fashion-mnist, cifar10/100: searched only there when given;
        image-folder: required). mnist-subset and digits come with Python packages and ignore it.
    val_size: the validation split taken from the training images, a count (int) or a fraction
        (float < 1); None: the dataset's default (fashion-mnist and cifar 5000, mnist-subset 500,
        digits 180, image-folder and synthetic 0.1).
    seed: picks the validation split (test splits are official or fixed, never seeded by it).
    download: let torchvision download fashion-mnist or cifar when they are not found locally.
    image_size: int or (H, W). image-folder: resize every image to it; synthetic: generate at it;
        the fixed-size datasets ignore it (`image_size` of the result is their native size; the
        transforms resize).
    in_chans: 1 or 3. Images are converted (grey copied to RGB; RGB to ITU-R 601-2 luma grey).
        None: the dataset's own (image-folder: 1 if every image is grey, else 3).
    on_bad_image: "error" or "skip", for image-folder (see vitkit.data.image_folder).
    options: dataset-specific keywords: image-folder test_size, max_pixels, stats_images;
        synthetic num_classes, train_size, test_size, noise, data_seed.
    """
    key = canonical_name(name)
    if on_bad_image not in image_folder.ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {image_folder.ON_BAD_IMAGE}, got {on_bad_image!r}")
    if key == "image-folder":
        if download:
            raise ValueError("image-folder reads your own files: there is nothing to download")
        return image_folder.load(data_dir, val_size=val_size, seed=seed, image_size=image_size, in_chans=in_chans,
                                 on_bad_image=on_bad_image, **options)
    if key == "synthetic":
        return synthetic.load(val_size=val_size, seed=seed, image_size=image_size, in_chans=in_chans, **options)
    if options:
        raise TypeError(f"dataset {key!r} takes no options {sorted(options)}")
    if key == "fashion-mnist":
        splits = fashion_mnist.load(data_dir, download=download, val_size=val_size, seed=seed)
    elif key == "mnist-subset":
        splits = mnist_subset.load(val_size=val_size, seed=seed)
    elif key == "digits":
        splits = digits.load(val_size=val_size, seed=seed)
    else:
        splits = cifar.load(key, data_dir, download=download, val_size=val_size, seed=seed)
    return splits if in_chans is None else with_channels(splits, in_chans)
