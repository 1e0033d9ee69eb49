"""Augmentation of a whole batch at once, for datasets held in memory as one uint8 tensor.

Small images (28x28) make per-sample transforms a real share of a CPU training step; the same
pad-and-crop, flip and normalisation done on the batch as tensor operations cost almost nothing.
Each sample still gets its own random crop offset and flip, drawn from a generator seeded by the
caller (the trainer derives the seed from run seed, epoch and batch, so a resumed run repeats it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BatchAugment:
    """uint8 (B, C, H, W) -> normalised float (B, C, H, W): random pad-crop, random flip, normalise.

    Equivalent in distribution to v2.RandomCrop(size, padding=pad) + v2.RandomHorizontalFlip() +
    v2.ToDtype(float32, scale=True) + v2.Normalize(mean, std), per sample.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], pad: int = 0, flip: bool = False):
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad = pad
        self.flip = flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The batch augmented with `generator`'s draws (None: torch's global generator; without padding and
        flips nothing is drawn)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 (B, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        b, c, h, w = images.shape
        x = images.float().div_(255.0)
        if self.pad:
            p = self.pad
            x = F.pad(x, (p, p, p, p))  # (B, C, H + 2p, W + 2p), zero (black) border as v2's default fill
            top = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            left = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            rows = (top[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w + 2 * p)
            x = x.gather(2, rows)  # (B, C, H, W + 2p)
            cols = (left[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
            x = x.gather(3, cols)  # (B, C, H, W)
        if self.flip:
            flipped = torch.rand(b, generator=generator) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        return (x - self.mean) / self.std
