"""Per-channel mean and standard deviation of uint8 images, in [0, 1] pixel units."""

from __future__ import annotations

from collections.abc import Iterable

import torch

_CHUNK = 4096  # images per float64 pass: bounds the memory of a large in-memory set


class ChannelStats:
    """Accumulates per-channel sums over images of one channel count, in float64."""

    def __init__(self):
        self.total = self.squares = None
        self.count = 0

    def add(self, images: torch.Tensor) -> None:
        """Add a uint8 batch (N, C, H, W) or a single image (C, H, W)."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        values = images.to(torch.float64) / 255
        total, squares = values.sum(dim=(0, 2, 3)), values.square().sum(dim=(0, 2, 3))
        if self.total is None:
            self.total, self.squares = total, squares
        elif len(total) != len(self.total):
            raise ValueError(f"images with {len(total)} channels among images with {len(self.total)}")
        else:
            self.total, self.squares = self.total + total, self.squares + squares
        self.count += values.shape[0] * values.shape[2] * values.shape[3]

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel, rounded to 6 decimals. A constant channel gets std 1, not 0,
        so normalising by it stays finite."""
        if not self.count:
            raise ValueError("no images to compute the mean and standard deviation from")
        mean = self.total / self.count
        std = (self.squares / self.count - mean.square()).clamp(min=0).sqrt()
        std = torch.where(std * 255 < 1e-3, torch.ones_like(std), std)
        return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def channel_stats(images: torch.Tensor | Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of a uint8 tensor (N, C, H, W), or of an iterable of (C, H, W) images."""
    stats = ChannelStats()
    if isinstance(images, torch.Tensor):
        for start in range(0, len(images), _CHUNK):
            stats.add(images[start:start + _CHUNK])
    else:
        for image in images:
            stats.add(image)
    return stats.result()
