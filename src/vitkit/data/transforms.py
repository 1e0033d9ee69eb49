"""Training and evaluation transforms (torchvision.transforms.v2) from uint8 tensors to normalised floats.

Both pipelines take one uint8 image (C, H, W) and return float32 (C, H', W') equal to
(x / 255 - mean) / std per channel, at `image_size`. The random choices of the training pipeline
come from torch's global generator, so `torch.manual_seed(s)` before a call fixes its output.
`batch_mixer` mixes whole batches (mixup, CutMix) after collation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from vitkit.data.batch_augment import BatchAugment
from vitkit.data.size import hw
from vitkit.data.tensor_dataset import ImageTensorDataset

CROPS = ("pad", "inception", "none")
DEFAULT_RANDAUGMENT_MAGNITUDE = 9  # the magnitude `randaugment=True` means (RandAugment's usual default)


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 as x / 255 (a true division: exactly the documented formula)."""
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got {image.dtype}: the datasets give uint8 pixels")
    return image.to(torch.float32) / 255


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean {mean} and std {std} must have one value per channel")
    if any(not s > 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return [v2.Lambda(to_unit_float, torch.Tensor), v2.Normalize(mean, std)]


def _resize(size: tuple[int, int]) -> v2.Resize:
    # No-op for images already at `size`; bilinear with antialiasing otherwise.
    return v2.Resize(list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def eval_transform(mean: Sequence[float], std: Sequence[float], image_size) -> v2.Compose:
    """Resize to `image_size` (int or (H, W)) if the image is not already that size, then normalise."""
    return v2.Compose([_resize(hw(image_size)), *_normalise(mean, std)])


def train_transform(mean: Sequence[float], std: Sequence[float], image_size, *, crop: str = "pad", pad: int = 4,
                    flip: bool = True, randaugment: bool | int = False, random_erasing: float = 0.0,
                    scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    """The training pipeline, in this order:

    1. crop: "pad" resizes to `image_size`, pads `pad` pixels of zeros on every side and crops a
       random `image_size` window (translations of up to `pad` pixels); "inception" takes a random
       crop of `scale` of the area and aspect ratio 3/4..4/3, resized to `image_size` (the paper's
       "inception crop"); "none" only resizes.
    2. flip: a horizontal flip with probability 0.5.
    3. randaugment: RandAugment with 2 operations at this magnitude (0..30; True means 9; False or 0 off).
    4. x / 255, then (x - mean) / std.
    5. random_erasing: with this probability, erase a random rectangle to 0 (the mean colour).
    """
    size = hw(image_size)
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a whole number of pixels >= 0, got {pad!r}")
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
    if randaugment is True:
        magnitude = DEFAULT_RANDAUGMENT_MAGNITUDE
    elif randaugment is False or randaugment is None:
        magnitude = 0
    elif isinstance(randaugment, int) and 0 <= randaugment <= 30:
        magnitude = randaugment
    else:
        raise ValueError(f"randaugment must be True/False or a magnitude 0..30, got {randaugment!r}")

    steps: list = []
    if crop == "inception":
        steps.append(v2.RandomResizedCrop(list(size), scale=tuple(scale), antialias=True))
    else:
        steps.append(_resize(size))
        if crop == "pad" and pad > 0:
            steps.append(v2.RandomCrop(list(size), padding=pad, fill=0))
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if magnitude:
        steps.append(v2.RandAugment(num_ops=2, magnitude=magnitude))
    steps += _normalise(mean, std)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps)


def batch_mixer(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
    """A callable (images (B, C, H, W) float, labels (B,) int64) -> (mixed images, soft targets (B, K)).

    Mixup blends each image with its neighbour in the batch by a weight drawn from Beta(alpha,
    alpha); CutMix pastes a box of the neighbour, and the targets are mixed in the same proportion.
    With both alphas positive one of the two is chosen at random per batch. None when both are 0.
    """
    for what, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not alpha >= 0:
            raise ValueError(f"{what} must be >= 0, got {alpha}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2 to mix targets, got {num_classes!r}")
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class Transformed(Dataset):
    """Wraps a dataset of (uint8 image, label) with a deterministic (evaluation) transform."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        sample = self.base[index]
        if sample is None:  # an unreadable image the dataset skipped
            return None
        image, label = sample
        return self.transform(image), label


class Normalised(Dataset):
    """An in-memory dataset's images normalised once, as one tensor: for the evaluation that training repeats.

    Item i equals `Transformed(base, eval_transform(mean, std, size))[i]` to the bit when the images are already at
    the evaluation size (the same x / 255, then (x - mean) / std, over the whole tensor at once). Done per image at
    every evaluation, the transforms were a tenth of its time for the default Fashion-MNIST model.
    """

    def __init__(self, base: ImageTensorDataset, mean: Sequence[float], std: Sequence[float]):
        _normalise(mean, std)  # the same checks of the statistics
        # The batch augmentation without padding or flips is exactly that normalisation, over the whole tensor.
        normalise = BatchAugment(tuple(float(m) for m in mean), tuple(float(s) for s in std))
        self.images = normalise(base.images, generator=None)  # (N, C, H, W) float32
        self.labels = base.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def evaluation_set(base: Dataset, mean: Sequence[float], std: Sequence[float], image_size) -> Dataset:
    """`base` as the model sees it at evaluation: normalised once where it is held in memory at `image_size`
    (`Normalised`), else transformed image by image as it is read (`Transformed`)."""
    if isinstance(base, ImageTensorDataset) and tuple(base.images.shape[-2:]) == hw(image_size):
        return Normalised(base, mean, std)
    return Transformed(base, eval_transform(mean, std, image_size))
