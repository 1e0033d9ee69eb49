"""A learnable random dataset generated from a seed: for tests, smoke runs and debugging a recipe.

Each class has a prototype, a smooth random pattern: a random 4x4 grid of values in [0, 1] per
channel, upsampled bilinearly to the image size. An image is its class's prototype plus Gaussian
noise of standard deviation `noise`, clipped to [0, 1] and quantised to uint8. Labels take every
class in turn (equal class sizes, to within one) in a shuffled order. The test images are drawn
after the training images from the same generator, so they are new noise on the same prototypes.

The images depend only on `data_seed` and the sizes; `seed`, as for every dataset, only picks the
validation split (default `val_size` 0.1 of the training images).

Defaults: 10 classes, 3 channels, 16x16, 1,000 training (train + validation) and 200 test images,
noise 0.3. The mean and standard deviation are computed on the train split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkit.data.size import hw
from vitkit.data.splits import DataSplits, stratified_split
from vitkit.data.stats import channel_stats
from vitkit.data.tensor_dataset import ImageTensorDataset

NAME = "synthetic"
DEFAULT_VAL_SIZE = 0.1
GRID = 4  # cells per side of a prototype before upsampling: few enough to be smooth


def prototypes(num_classes: int, in_chans: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(K, C, H, W) float patterns in [0, 1], one per class."""
    cells = torch.rand(num_classes, in_chans, GRID, GRID, generator=generator)
    return F.interpolate(cells, size=size, mode="bilinear", align_corners=False)


def sample(patterns: torch.Tensor, count: int, noise: float, generator: torch.Generator) -> ImageTensorDataset:
    num_classes = len(patterns)
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
    values = patterns[labels] + noise * torch.randn((count, *patterns.shape[1:]), generator=generator)
    images = (values.clamp(0, 1) * 255).round().to(torch.uint8)  # (N, C, H, W)
    return ImageTensorDataset(images, labels)


def load(*, val_size: int | float | None = None, seed: int = 0, image_size=None, in_chans: int | None = None,
         num_classes: int = 10, train_size: int = 1000, test_size: int = 200, noise: float = 0.3,
         data_seed: int = 0) -> DataSplits:
    """The synthetic dataset as DataSplits (see the module docstring)."""
    size = hw(16 if image_size is None else image_size)
    in_chans = 3 if in_chans is None else in_chans
    for what, value, least in (("num_classes", num_classes, 1), ("in_chans", in_chans, 1),
                               ("train_size", train_size, 2), ("test_size", test_size, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"synthetic {what} must be an integer of at least {least}, got {value!r}")
    if not noise >= 0:
        raise ValueError(f"synthetic noise must be >= 0, got {noise}")
    generator = torch.Generator().manual_seed(int(data_seed))
    patterns = prototypes(num_classes, in_chans, size, generator)
    pool = sample(patterns, train_size, noise, generator)
    test = sample(patterns, test_size, noise, generator)
    rest, picked = stratified_split(pool.labels.numpy(), DEFAULT_VAL_SIZE if val_size is None else val_size, seed)
    train = pool.subset(rest)
    mean, std = channel_stats(train.images)
    return DataSplits(NAME, train, pool.subset(picked), test, num_classes=num_classes, in_chans=in_chans,
                      image_size=size, mean=mean, std=std, class_names=[f"class {k}" for k in range(num_classes)])
