"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from their "python version" batch files.

The batches are pickles of dicts: 'data' a uint8 array (N, 3072) holding each 32x32 image as its
red, green and blue planes in row-major order, and 'labels' (CIFAR-10) or 'fine_labels'
(CIFAR-100, whose 100 fine classes are the ones used here) a list of ints. They are read with a
restricted unpickler (safe_pickle.py) that refuses anything but plain data, never `pickle.load`.

Files: CIFAR-10 is data_batch_1 .. data_batch_5, test_batch and batches.meta (class names) in
cifar-10-batches-py/; CIFAR-100 is train, test and meta in cifar-100-python/. They are looked for,
in order, in `data_dir` (only there, if given; also its subdirectory of the usual name),
$VITKIT_DATA_DIR and ~/.cache/vitkit (each also with the subdirectory). torchvision downloads them
only when asked (`download=True`).

Splits: test is the official 10,000-image test batch; validation is `val_size` images (default
5,000) drawn stratified from the 50,000 training images with `seed`; train is the rest.

Normalisation constants, over the 50,000 training images (the widely published values):
CIFAR-10 mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616);
CIFAR-100 mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitkit.data.errors import DataFileError, DatasetNotFoundError
from vitkit.data.locate import download_root, search_dirs
from vitkit.data.safe_pickle import load_data_pickle
from vitkit.data.splits import DataSplits, stratified_split
from vitkit.data.tensor_dataset import ImageTensorDataset

DEFAULT_VAL_SIZE = 5000


@dataclass(frozen=True)
class CifarLayout:
    name: str
    subdir: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str


LAYOUTS = {
    "cifar10": CifarLayout("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           "test_batch", "batches.meta", "labels", "label_names", 10,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10"),
    "cifar100": CifarLayout("cifar100", "cifar-100-python", ("train",), "test", "meta", "fine_labels",
                            "fine_label_names", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100"),
}
CIFAR10_CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def locate(layout: CifarLayout, data_dir: str | os.PathLike | None = None) -> Path:
    """The first directory holding every batch file of `layout`."""
    needed = (*layout.train_files, layout.test_file)
    places = []
    for directory in search_dirs(data_dir, (layout.subdir,)):
        missing = [name for name in needed if not (directory / name).is_file()]
        if not missing:
            return directory
        present = len(missing) < len(needed)
        places.append(f"{directory} (incomplete: no {', '.join(missing)})" if present else str(directory))
    hint = (f"Put the extracted {layout.subdir}/ directory (the CIFAR 'python version' from "
            "https://www.cs.toronto.edu/~kriz/cifar.html) under --data-dir or VITKIT_DATA_DIR, "
            "or pass --download (download=True) to fetch it with torchvision.")
    raise DatasetNotFoundError(layout.name, places, hint)


def read_batch(path: Path, layout: CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one batch file, checked."""
    batch = load_data_pickle(path)
    if not isinstance(batch, dict):
        raise DataFileError(path, f"expected a dict, found {type(batch).__name__}")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = batch.get("data"), batch.get(layout.label_key)
    if data is None or labels is None:
        raise DataFileError(path, f"expected keys 'data' and '{layout.label_key}', found {sorted(map(str, batch))}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFileError(path, f"'data' must be a uint8 array (N, 3072), found {found}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise DataFileError(path, f"'{layout.label_key}' is not a list of integers ({error})") from None
    if len(labels) != len(data):
        raise DataFileError(path, f"{len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataFileError(path, f"labels must lie in 0..{layout.num_classes - 1}, "
                                  f"found {labels.min()}..{labels.max()}")
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, 32, 32)  # planes R, G, B, rows of 32
    return images, torch.from_numpy(labels)


def read_class_names(directory: Path, layout: CifarLayout) -> list[str]:
    path = directory / layout.meta_file
    if not path.is_file():
        return list(CIFAR10_CLASS_NAMES) if layout.num_classes == 10 else [str(i) for i in range(layout.num_classes)]
    meta = load_data_pickle(path)
    names = meta.get(layout.names_key, meta.get(layout.names_key.encode())) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataFileError(path, f"expected '{layout.names_key}': a list of {layout.num_classes} class names")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _download(layout: CifarLayout, data_dir: str | os.PathLike | None) -> None:
    import torchvision.datasets

    root = download_root(data_dir)
    try:
        getattr(torchvision.datasets, layout.torchvision_class)(str(root), train=True, download=True)
    except Exception as error:
        raise RuntimeError(f"downloading {layout.name} into {root} with torchvision failed: {error}") from error


def load(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
         val_size: int | float | None = None, seed: int = 0) -> DataSplits:
    """CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100") as DataSplits (see the module docstring)."""
    layout = LAYOUTS[name]
    try:
        directory = locate(layout, data_dir)
    except DatasetNotFoundError:
        if not download:
            raise
        _download(layout, data_dir)
        directory = locate(layout, data_dir)
    parts = [read_batch(directory / file, layout) for file in layout.train_files]
    train_pool = ImageTensorDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = ImageTensorDataset(*read_batch(directory / layout.test_file, layout))
    rest, picked = stratified_split(train_pool.labels.numpy(), DEFAULT_VAL_SIZE if val_size is None else val_size, seed)
    return DataSplits(layout.name, train_pool.subset(rest), train_pool.subset(picked), test,
                      num_classes=layout.num_classes, in_chans=3, image_size=(32, 32), mean=layout.mean,
                      std=layout.std, class_names=read_class_names(directory, layout))
