"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) from its four IDX files.

60,000 training and 10,000 test images, 28x28 grey, 10 classes of clothing.

Splits: test is the official 10,000-image test set. Validation is `val_size` images (default
5,000, that is 500 per class) drawn stratified from the 60,000 training images with `seed`;
train is the other 55,000. `indices` of each split are positions in the official file it came from.

Normalisation constants: mean 0.2860, std 0.3530, over all 60,000 official training images
(0.28604, 0.35302 unrounded).

The files are train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, each gzip-compressed (.gz) or not. They are looked for, in order, in
`data_dir` (only there, if it is given), $VITKIT_DATA_DIR, /usr/share/datasets/fashion-mnist
(Debian's dataset-fashion-mnist package) and ~/.cache/vitkit; each base directory also in its
subdirectories fashion-mnist/ and FashionMNIST/raw/ (torchvision's layout). Downloading with
torchvision happens only when asked (`download=True`) and the files are nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vitkit.data.errors import DataFileError, DatasetNotFoundError
from vitkit.data.idx import read_idx
from vitkit.data.locate import download_root, search_dirs
from vitkit.data.splits import DataSplits, stratified_split
from vitkit.data.tensor_dataset import ImageTensorDataset

NAME = "fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
SUBDIRS = ("fashion-mnist", "FashionMNIST/raw")
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = (0.2860,), (0.3530,)
DEFAULT_VAL_SIZE = 5000
HINT = ("Install it with `sudo apt-get install dataset-fashion-mnist`, or point --data-dir (or "
        "VITKIT_DATA_DIR) at a directory holding " + ", ".join(FILES.values()) + " (each .gz or not), "
        "or pass --download (download=True) to fetch it with torchvision.")


def find_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The four files in `directory` (uncompressed preferred: faster to read) and the names missing."""
    found, missing = {}, []
    for key, name in FILES.items():
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def locate(data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The paths of the four files, from the first directory that holds all of them."""
    places = []
    for directory in search_dirs(data_dir, SUBDIRS, SYSTEM_DIRS):
        found, missing = find_files(directory)
        if not missing:
            return found
        places.append(f"{directory} (incomplete: no {', '.join(missing)})" if found else str(directory))
    raise DatasetNotFoundError(NAME, places, HINT)


def _download(data_dir: str | os.PathLike | None) -> None:
    from torchvision.datasets import FashionMNIST

    root = download_root(data_dir)
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as error:  # no network, a proxy, a checksum mismatch
        raise RuntimeError(f"downloading Fashion-MNIST into {root} with torchvision failed: {error}") from error


def _read_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype.name != "uint8" or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataFileError(images_path, f"expected uint8 images of shape (N, 28, 28), found {images.dtype.name} "
                                         f"of shape {images.shape}")
    if labels.dtype.name != "uint8" or labels.ndim != 1:
        raise DataFileError(labels_path, f"expected uint8 labels of shape (N,), found {labels.dtype.name} "
                                         f"of shape {labels.shape}")
    if len(labels) != len(images):
        raise DataFileError(labels_path, f"{len(labels)} labels for the {len(images)} images of {images_path}")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise DataFileError(labels_path, f"label {labels.max()} is not one of the 10 classes 0..9")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype("int64"))  # (N, 1, 28, 28)


def load(data_dir: str | os.PathLike | None = None, *, download: bool = False,
         val_size: int | float | None = None, seed: int = 0) -> DataSplits:
    """Fashion-MNIST as DataSplits (see the module docstring for the places searched and the splits)."""
    try:
        files = locate(data_dir)
    except DatasetNotFoundError:
        if not download:
            raise
        _download(data_dir)
        files = locate(data_dir)
    train_pool = ImageTensorDataset(*_read_pair(files["train_images"], files["train_labels"]))
    test = ImageTensorDataset(*_read_pair(files["test_images"], files["test_labels"]))
    rest, picked = stratified_split(train_pool.labels.numpy(),
                                    DEFAULT_VAL_SIZE if val_size is None else val_size, seed)
    return DataSplits(NAME, train_pool.subset(rest), train_pool.subset(picked), test, num_classes=10,
                      in_chans=1, image_size=(28, 28), mean=MEAN, std=STD, class_names=list(CLASS_NAMES))
