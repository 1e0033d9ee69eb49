"""Training subsets (`--data.train_size`): stratified by class, nested across sizes for one seed."""

from __future__ import annotations

import pytest
import torch

from vitkit.data import ImageTensorDataset
from vitkit.data.splits import training_subset


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
