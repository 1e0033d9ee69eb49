"""Deterministic data order and per-sample augmentation seeds.

Every random choice of the input pipeline is a function of (run seed, epoch, position), never of
a running random state. So a run resumed in the middle of an epoch sees exactly the batches and
augmentations the uninterrupted run saw, whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from vitkit.data import Transformed

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads nearby seeds apart


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so that (seed, epoch, i) and (seed, epoch, i + 1) are unrelated."""
    h = 0
    for part in parts:
        h = (h ^ (int(part) + _MIX + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0xDA7A))
    return torch.randperm(num_samples, generator=generator)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (sample index, augmentation seed) for one epoch, starting at batch `start`.

    The last incomplete batch is dropped, so every step sees `batch_size` images.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, start: int = 0):
        self.order = epoch_order(num_samples, seed, epoch)
        self.batch_size = batch_size
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return len(self.order) // self.batch_size - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        bs = self.batch_size
        for b in range(self.start, len(self.order) // bs):
            positions = range(b * bs, (b + 1) * bs)
            yield [(int(self.order[p]), derive_seed(self.seed, self.epoch, p)) for p in positions]


class SeededAugment(Transformed):
    """Like Transformed, but item (index, seed) is augmented under that seed, leaving the global RNG as it was."""

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return super().__getitem__(index)
