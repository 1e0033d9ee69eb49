"""A user's own images, one folder per class, decoded lazily and safely.

Two layouts of the directory `data_dir`:
- root/<class>/<image>: one folder per class. The test split (`test_size`, default 0.1) is drawn
  stratified with the fixed seed 0, so every run is tested on the same images; the validation
  split (`val_size`, default 0.1 of the rest) is drawn stratified with `seed`; train is the rest.
- root/train/<class>/..., with root/val/ and root/test/ optional: the folders are the splits. A
  missing test folder is replaced by a fixed split of train (seed 0), a missing val folder by a
  seeded split of train, as above. The classes are the folders of train/.
It is the second layout when every folder of root is train, val or test. Images are files with an
image extension (.png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm, any case), found
at any depth of a class folder, in sorted path order; hidden files and folders are ignored.

Size and channels: every image is resized (bilinear, antialiased, ignoring the aspect ratio) to
`image_size` and converted to `in_chans` channels (1: grey "L", 3: "RGB"). With no `image_size`
the images must all have the same size, which is then used; with no `in_chans`, 1 if every image
is stored grey, else 3. Finding these out reads every file's header (not its pixels) once.

Unreadable images: with on_bad_image="error" (the default) the first one raises BadImageError
naming it; with "skip", item i of that image is None and `dataset.skipped` maps its path to the
reason. Use `collate_skip_none` in the DataLoader to drop such items from batches. Images found bad
inside DataLoader worker processes are listed too: a worker's copy of the dataset cannot update the
main process's, so workers append what they skip to a small temporary file that `skipped` reads
back (the file is removed when the main process's dataset is garbage-collected).

Statistics: mean and std are computed on (at most `stats_images`, default 1,000, evenly spaced)
images of the train split, after resizing and channel conversion.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info
from torchvision.transforms.v2 import functional as TF

from vitkit.data.decode import GREY_MODES, load_image, read_header
from vitkit.data.errors import BadImageError, DatasetNotFoundError
from vitkit.data.size import hw
from vitkit.data.splits import FIXED_TEST_SEED, DataSplits, stratified_split
from vitkit.data.stats import ChannelStats

NAME = "image-folder"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
SPLIT_FOLDERS = ("train", "val", "test")
DEFAULT_VAL_SIZE = 0.1
DEFAULT_TEST_SIZE = 0.1
STATS_IMAGES = 1000
ON_BAD_IMAGE = ("error", "skip")


def _remove_if_owner(path: str, owner: int) -> None:
    if os.getpid() == owner:  # a forked loader worker dropping its copy must not remove the main process's file
        try:
            os.unlink(path)
        except OSError:
            pass


class _SkipLog:
    """A file that DataLoader worker processes append the images they skip to, one JSON line each.

    Each line is written with a single O_APPEND write, so lines of concurrent workers do not mix.
    Only the process that created the log removes the file, when its log object is collected;
    copies in workers (forked or unpickled) never do.
    """

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="vitkit-skipped-images-", suffix=".jsonl")
        os.close(fd)
        weakref.finalize(self, _remove_if_owner, self.path, os.getpid())

    def add(self, path: str, reason: str) -> None:
        line = (json.dumps([path, reason]) + "\n").encode("ascii")  # ensure_ascii: any path or reason fits
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError:  # the main process has already dropped the dataset
            return
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self) -> dict[str, str]:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return {}
        found = {}
        for line in lines:
            try:
                path, reason = json.loads(line)
            except (ValueError, TypeError):  # a line cut short by a worker killed mid-write
                continue
            found[str(path)] = str(reason)
        return found


def _new_skip_log() -> _SkipLog | None:
    try:
        return _SkipLog()
    except OSError as error:  # no writable temporary directory: skips in workers go unlisted
        warnings.warn(f"cannot create a temporary file to collect the images that DataLoader workers skip "
                      f"({error}); with num_workers > 0 some skipped images may be missing from the list",
                      stacklevel=3)
        return None


class ImageFolderDataset(Dataset):
    """(path, label) samples decoded on access into (uint8 tensor (C, H, W), label), or None when skipped."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, image_size: tuple[int, int],
                 on_bad_image: str = "error", max_pixels: int | None = None, *, skip_log: _SkipLog | None = None):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.samples = list(samples)
        self.mode = mode
        self.image_size = hw(image_size)
        self.on_bad_image = on_bad_image
        self.max_pixels = max_pixels
        self._skipped: dict[str, str] = {}
        self._paths: frozenset[str] | None = None
        self._log = None
        if on_bad_image == "skip":
            self._log = skip_log if skip_log is not None else _new_skip_log()

    @property
    def skipped(self) -> dict[str, str]:
        """{path: reason} of this dataset's images found unreadable so far, here or in DataLoader workers."""
        if self._log is not None:
            found = self._log.read()
            if found:
                if self._paths is None:
                    self._paths = frozenset(path for path, _ in self.samples)
                for path, reason in found.items():
                    if path in self._paths:
                        self._skipped.setdefault(path, reason)
        return self._skipped

    @skipped.setter
    def skipped(self, value: dict[str, str]) -> None:
        self._skipped = dict(value)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        if path in self._skipped:
            return None
        try:
            image = load_image(path, self.mode, max_pixels=self.max_pixels)
        except BadImageError as error:
            if self.on_bad_image == "error":
                raise
            self._skipped[path] = error.reason
            if self._log is not None and get_worker_info() is not None:
                self._log.add(path, error.reason)
            return None
        if tuple(image.shape[-2:]) != self.image_size:
            image = TF.resize(image, list(self.image_size), antialias=True)
        return image, label

    def subset(self, positions) -> ImageFolderDataset:
        part = ImageFolderDataset([self.samples[int(p)] for p in positions], self.mode, self.image_size,
                                  self.on_bad_image, self.max_pixels, skip_log=self._log)
        paths = {path for path, _ in part.samples}
        part.skipped = {path: reason for path, reason in self.skipped.items() if path in paths}
        return part

    def __repr__(self) -> str:
        return f"ImageFolderDataset({len(self)} images, {self.mode} {self.image_size[0]}x{self.image_size[1]})"


def collate_skip_none(batch: list):
    """DataLoader collation that drops the None items of skipped images; None if nothing is left."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


def _visible_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(directory: Path) -> list[str]:
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).parts
        if any(part.startswith(".") for part in relative):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(str(path))
    return sorted(found)


def _samples(split_dir: Path, class_names: list[str], require_every_class: bool) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        images = _images_under(class_dir) if class_dir.is_dir() else []
        if not images and require_every_class:
            raise ValueError(f"class folder {class_dir} holds no images (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        samples += [(path, label) for path in images]
    return samples


def scan_layout(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class names and the samples of each split folder present ({"all": ...} for the flat layout)."""
    folders = _visible_dirs(root)
    names = [f.name for f in folders]
    if folders and set(names) <= set(SPLIT_FOLDERS):
        if "train" not in names:
            raise ValueError(f"{root} has split folders {names} but no train/ folder")
        class_names = [d.name for d in _visible_dirs(root / "train")]
        if not class_names:
            raise ValueError(f"{root / 'train'} has no class folders")
        splits = {"train": _samples(root / "train", class_names, require_every_class=True)}
        for split in ("val", "test"):
            if split in names:
                unknown = sorted({d.name for d in _visible_dirs(root / split)} - set(class_names))
                if unknown:
                    raise ValueError(f"{root / split} has class folders {unknown} that {root / 'train'} does not")
                splits[split] = _samples(root / split, class_names, require_every_class=False)
        return class_names, splits
    if not folders:
        raise ValueError(f"{root} has no class folders: expected root/<class>/<images> or root/train/<class>/...")
    class_names = names
    return class_names, {"all": _samples(root, class_names, require_every_class=True)}


def _scan_headers(samples: list[tuple[str, int]], on_bad_image: str, max_pixels: int | None):
    """{path: ((H, W), mode)} of the readable files and {path: reason} of the others (raises in "error" mode)."""
    headers, bad = {}, {}
    for path, _ in samples:
        try:
            headers[path] = read_header(path, max_pixels=max_pixels)
        except BadImageError as error:
            if on_bad_image == "error":
                raise
            bad[path] = error.reason
    return headers, bad


def _common_size(headers: dict) -> tuple[int, int]:
    sizes = {}
    for path, (size, _) in headers.items():
        sizes.setdefault(size, path)
    if len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise ValueError(f"the images differ in size ({p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}, "
                         f"{len(sizes)} sizes in all): give image_size (--data.image_size) to resize them to one size")
    return next(iter(sizes))


def _split_positions(labels: list[int], size, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    return stratified_split(np.asarray(labels, dtype=np.int64), size, seed, what)


def load(data_dir: str | os.PathLike | None, *, val_size: int | float | None = None, seed: int = 0,
         image_size=None, in_chans: int | None = None, on_bad_image: str = "error",
         test_size: int | float | None = None, max_pixels: int | None = None,
         stats_images: int = STATS_IMAGES) -> DataSplits:
    """The images under `data_dir` as DataSplits (see the module docstring for layouts and options)."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    if data_dir is None:
        raise ValueError("the image-folder dataset needs data_dir (--data.data_dir): a directory with one "
                         "folder of images per class, or train/ (and val/, test/) folders of those")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(NAME, [str(root)], "data_dir must be a directory with one folder of images per "
                                                      "class, or train/ (and val/, test/) folders of those.")
    class_names, found = scan_layout(root)

    every = [s for samples in found.values() for s in samples]
    headers, bad = ({}, {})
    if image_size is None or in_chans is None:
        headers, bad = _scan_headers(every, on_bad_image, max_pixels)
        if not headers:
            raise ValueError(f"none of the {len(every)} images under {root} can be read; see for example "
                             f"{next(iter(bad))}: {next(iter(bad.values()))}")
    size = hw(image_size) if image_size is not None else _common_size(headers)
    if in_chans is None:
        in_chans = 1 if all(mode in GREY_MODES for _, mode in headers.values()) else 3
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grey) or 3 (RGB) for image folders, got {in_chans}")
    mode = "L" if in_chans == 1 else "RGB"

    def dataset(samples):
        part = ImageFolderDataset(samples, mode, size, on_bad_image, max_pixels)
        part.skipped = {path: bad[path] for path, _ in samples if path in bad}
        return part

    pool = dataset(found.get("train", found.get("all")))
    pool_labels = [label for _, label in pool.samples]
    if "test" in found:
        test = dataset(found["test"])
    else:
        rest, picked = _split_positions(pool_labels, DEFAULT_TEST_SIZE if test_size is None else test_size,
                                        FIXED_TEST_SEED, "test_size")
        test, pool = pool.subset(picked), pool.subset(rest)
        pool_labels = [label for _, label in pool.samples]
    if "val" in found:
        if val_size is not None:
            warnings.warn(f"val_size={val_size} is ignored: {root / 'val'} is the validation split", stacklevel=3)
        val, train = dataset(found["val"]), pool
    else:
        rest, picked = _split_positions(pool_labels, DEFAULT_VAL_SIZE if val_size is None else val_size, seed,
                                        "val_size")
        val, train = pool.subset(picked), pool.subset(rest)

    mean, std = _train_stats(train, stats_images)
    return DataSplits(NAME, train, val, test, num_classes=len(class_names), in_chans=in_chans, image_size=size,
                      mean=mean, std=std, class_names=class_names)


def _train_stats(train: ImageFolderDataset, stats_images: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(train) == 0:
        raise ValueError("the train split has no images")
    count = min(len(train), max(1, int(stats_images)))
    positions = np.unique(np.linspace(0, len(train) - 1, count).round().astype(np.int64))
    stats = ChannelStats()
    for position in positions:
        item = train[int(position)]
        if item is not None:
            stats.add(item[0])
    if not stats.count:
        raise ValueError(f"none of the {len(positions)} train images read for the mean and std could be decoded; "
                         f"see dataset.skipped: {dict(list(train.skipped.items())[:3])}")
    return stats.result()
