"""Train / validation / test splits: the DataSplits record and the seeded stratified split behind it.

Every split vitkit makes is stratified (each class keeps its share, to within one image) and a
pure function of (labels, size, seed): the same seed gives the same split on any machine and in
any process, and the parts are disjoint and together cover the input. Sizes are a count of images
(int) or a fraction of the images being split (float in [0, 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class DataSplits:
    """A dataset ready for training: three disjoint splits and what a model needs to know about them.

    Items of every split are (uint8 tensor (C, H, W), int label). `image_size` is the native
    (H, W) of the images (for image folders: the size they are resized to). `mean` and `std` are
    per channel, in [0, 1] pixel units, of the training images (fixed published constants for the
    known datasets).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]


def resolve_count(size: int | float, total: int, what: str = "val_size") -> int:
    """A split size as a count of images out of `total`: an int is a count, a float < 1 a fraction."""
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a count (int) or a fraction (float in [0, 1)), got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not np.isfinite(size) or size < 0:
            raise ValueError(f"{what} must be a count or a fraction in [0, 1), got {size}")
        if size < 1:
            count = int(np.floor(size * total + 0.5))
        elif float(size).is_integer():
            count = int(size)
        else:
            raise ValueError(f"{what}={size} is neither a fraction below 1 nor a whole number of images")
    else:
        count = int(size)
    if count < 0 or count >= total:
        raise ValueError(f"{what}={size} asks for {count} of {total} images: it must leave at least one image "
                         f"to split from, so give a count from 0 to {total - 1} or a smaller fraction")
    return count


def class_quotas(labels: np.ndarray, count: int) -> dict[int, int]:
    """How many of `count` picked images each class gets: its share, with the rounding remainders given to
    the classes with the largest fractional shares (ties to the smaller label), so the quotas sum to `count`."""
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / len(labels)
    quotas = np.floor(exact).astype(np.int64)
    leftover = count - int(quotas.sum())
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:leftover]] += 1
    return {int(c): int(q) for c, q in zip(classes, quotas)}


def stratified_split(labels, size: int | float, seed: int, what: str = "val_size") -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..N-1 into (rest, picked), `picked` holding `size` images stratified by label.

    Within each class the picked images are the first of a random permutation drawn from a torch
    generator seeded with `seed`, class by class in label order. Both arrays are sorted int64.
    """
    labels = np.asarray(labels).reshape(-1)
    count = resolve_count(size, len(labels), what)
    generator = torch.Generator().manual_seed(int(seed))
    picked = []
    for label, quota in class_quotas(labels, count).items():
        members = np.flatnonzero(labels == label)
        order = torch.randperm(len(members), generator=generator).numpy()
        picked.append(members[order[:quota]])
    picked = np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), picked, assume_unique=True)
    return rest.astype(np.int64), picked.astype(np.int64)


def dataset_labels(dataset) -> np.ndarray:
    """The labels of a dataset's items, read without decoding images where the dataset allows."""
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels).reshape(-1)
    if hasattr(dataset, "samples"):  # an image folder
        return np.asarray([label for _, label in dataset.samples])
    return np.asarray([dataset[i][1] for i in range(len(dataset))])


def training_subset(dataset, size: int | float, seed: int):
    """`size` images of `dataset` (a count, or a fraction below 1), stratified by label and drawn with `seed`.

    Within each class the images kept are the first of one fixed random order (see `stratified_split`), so for
    one seed a smaller subset is contained in a larger one whenever the classes' quotas grow with the size (always
    for balanced classes). The whole dataset is returned for a size equal to its length.
    """
    labels = dataset_labels(dataset)
    if not isinstance(size, bool) and isinstance(size, (int, float)) and size == len(labels):
        return dataset
    _, picked = stratified_split(labels, size, seed, "train_size")
    return dataset.subset(picked)


FIXED_TEST_SEED = 0


def three_way_split(labels, test_size: int | float, val_size: int | float, seed: int,
                    test_seed: int = FIXED_TEST_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) positions for a dataset that comes without an official test split.

    The test split is stratified with the fixed `test_seed`, whatever `seed` is, so that results of
    runs with different seeds are measured on the same images; the validation split is then drawn
    stratified from the rest with `seed`.
    """
    labels = np.asarray(labels).reshape(-1)
    pool, test = stratified_split(labels, test_size, test_seed, "test_size")
    rest, val = stratified_split(labels[pool], val_size, seed)
    return pool[rest], pool[val], test
