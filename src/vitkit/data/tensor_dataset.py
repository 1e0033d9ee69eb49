"""A dataset held in memory as one uint8 tensor of images and one int64 tensor of labels."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

RESIZE_CHUNK = 4096
"""Images resized per call by `resized`: bounds the resize's working memory whatever the dataset's size."""


class ImageTensorDataset(Dataset):
    """Images (N, C, H, W) uint8 and labels (N,) int64; item i is (images[i], int(labels[i])).

    `images` and `labels` are public so a trainer can gather whole batches by indexing them.
    `indices` (N,) int64 gives each image's position in the source it came from (the order of the
    original file or array), which records exactly which originals a split holds.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} of shape "
                             f"{tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if indices is None:
            indices = torch.arange(len(images))
        self.images = images
        self.labels = labels
        self.indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, positions) -> ImageTensorDataset:
        """A new dataset with the items at `positions` (a copy, so the parent can be freed)."""
        positions = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        return ImageTensorDataset(self.images[positions], self.labels[positions], self.indices[positions])

    def resized(self, size: tuple[int, int]) -> ImageTensorDataset:
        """A new dataset of the images resized to `size` (H, W): bilinear with antialiasing, the resize the
        training and evaluation pipelines apply to each image as they read it, done once for all (the same
        pixels, exactly)."""
        chunks = [TF.resize(self.images[start:start + RESIZE_CHUNK], list(size), InterpolationMode.BILINEAR,
                            antialias=True) for start in range(0, len(self.images), RESIZE_CHUNK)]
        images = torch.cat(chunks) if chunks else self.images.new_empty((0, self.images.shape[1], *size))
        return ImageTensorDataset(images, self.labels, self.indices)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageTensorDataset({n} images, {c}x{h}x{w})"
