"""scikit-learn's handwritten digits (`sklearn.datasets.load_digits()`): 1,797 images, 8x8 grey, 10 classes.

The original values 0..16 are rescaled to uint8 0..255 as round(v * 255 / 16), so 16 -> 255.

Splits: a fixed test split of 360 images (stratified with seed 0 whatever the `seed` argument), and
from the other 1,437 a validation split of `val_size` images (default 180) drawn stratified with
`seed`; train is the rest (1,257 by default). `indices` are positions in load_digits() order.

Normalisation constants: mean 0.3060, std 0.3763, over the 1,437 train + validation images
(0.305969, 0.376300 unrounded).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from vitkit.data.splits import DataSplits, three_way_split
from vitkit.data.tensor_dataset import ImageTensorDataset

NAME = "digits"
TEST_SIZE = 360
DEFAULT_VAL_SIZE = 180
MEAN, STD = (0.3060,), (0.3763,)
CLASS_NAMES = [str(d) for d in range(10)]


def rescale(values: np.ndarray) -> np.ndarray:
    """0..16 -> uint8 0..255, rounding half up."""
    return np.floor(np.clip(values, 0, 16) * 255 / 16 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=1)  # parsing the package's text file takes seconds; the result is small
def _read() -> ImageTensorDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits dataset comes with scikit-learn: pip install scikit-learn "
                          "(or pip install 'vitkit[data]')") from error
    bunch = load_digits()
    images = torch.from_numpy(rescale(bunch.images)).unsqueeze(1)  # (1797, 1, 8, 8)
    return ImageTensorDataset(images, torch.from_numpy(bunch.target.astype(np.int64)))


def load(*, val_size: int | float | None = None, seed: int = 0) -> DataSplits:
    """digits as DataSplits (see the module docstring for the splits)."""
    pool = _read()
    train, val, test = three_way_split(pool.labels.numpy(), TEST_SIZE,
                                       DEFAULT_VAL_SIZE if val_size is None else val_size, seed)
    return DataSplits(NAME, pool.subset(train), pool.subset(val), pool.subset(test), num_classes=10, in_chans=1,
                      image_size=(8, 8), mean=MEAN, std=STD, class_names=list(CLASS_NAMES))
