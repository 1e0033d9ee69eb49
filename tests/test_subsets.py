"""Training subsets (`--data.train_size`): stratified by class, nested across sizes for one seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitkit.data import ImageTensorDataset
from vitkit.data.splits import training_subset
from vitkit.train.config import DataOptions, RunOptions, TrainConfig
from vitkit.train.trainer import _load_data


def dataset(per_class: int = 100, classes: int = 10) -> ImageTensorDataset:
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.arange(len(labels), dtype=torch.int64).remainder(256).to(torch.uint8).view(-1, 1, 1, 1)
    return ImageTensorDataset(images.expand(-1, 1, 2, 2).contiguous(), labels)


def test_subsets_are_stratified_and_nested_for_one_seed():
    full = dataset()
    kept = {}
    for size in (10, 30, 100, 300):
        part = training_subset(full, size, seed=3)
        assert len(part) == size
        assert torch.bincount(part.labels, minlength=10).tolist() == [size // 10] * 10  # each class its share
        kept[size] = set(part.indices.tolist())
    assert kept[10] <= kept[30] <= kept[100] <= kept[300]
    assert set(training_subset(full, 100, seed=4).indices.tolist()) != kept[100]  # another seed, other images


def test_fractions_and_the_whole_set():
    full = dataset()
    assert len(training_subset(full, 0.1, seed=0)) == 100
    assert training_subset(full, len(full), seed=0) is full


def test_a_size_the_split_cannot_give_is_a_clear_error():
    with pytest.raises(ValueError, match="train_size=5000 asks for 5000 of 1000 images"):
        training_subset(dataset(), 5000, seed=0)


FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST is not installed (make data)")
def test_the_data_scaling_subsets_of_fashion_mnist_are_stratified_and_nested():
    # As benchmarks/data_scaling.py asks for them: no validation split, --data.train_size n, --run.seed s.
    full = None
    for seed in (0, 1):
        kept = []
        for size in (1_000, 3_000, 10_000, 30_000, 60_000):
            cfg = TrainConfig(data=DataOptions(val_size=0, train_size=size), run=RunOptions(seed=seed))
            data, _ = _load_data(cfg)
            counts = torch.bincount(data.train.labels, minlength=10).tolist()
            assert counts == [size // 10] * 10, (seed, size)  # Fashion-MNIST has 6,000 of each class
            kept.append(set(data.train.indices.tolist()))
        assert all(small < large for small, large in zip(kept, kept[1:])), seed
        assert len(kept[-1]) == 60_000  # "60k" is every training image
        if full is None:
            full = kept
        else:
            assert kept[0] != full[0]  # another seed, another 1k
