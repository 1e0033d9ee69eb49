"""Transforms: exact normalisation, what each augmentation may produce, seeded determinism, batch mixing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit.data import (
    ImageTensorDataset,
    Normalised,
    Transformed,
    batch_mixer,
    eval_transform,
    evaluation_set,
    train_transform,
)

MEAN3, STD3 = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def image(channels: int = 3, size=(8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (channels, *size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    """The documented formula, computed directly."""
    return (x.float() / 255 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


@pytest.mark.parametrize("channels, mean, std", [(3, MEAN3, STD3), (1, (0.2860,), (0.3530,))])
def test_eval_transform_is_exactly_the_formula(channels, mean, std):
    x = image(channels)
    out = eval_transform(mean, std, 8)(x)
    assert out.dtype == torch.float32 and torch.equal(out, normalised(x, mean, std))
    assert torch.equal(eval_transform(mean, std, (8, 8))(x), out)


def test_eval_transform_resizes_to_the_requested_size():
    constant = torch.full((1, 7, 5), 51, dtype=torch.uint8)
    out = eval_transform((0.1,), (0.5,), (14, 10))(constant)
    assert out.shape == (1, 14, 10)
    torch.testing.assert_close(out, torch.full((1, 14, 10), (51 / 255 - 0.1) / 0.5))


@pytest.mark.parametrize("channels, mean, std", [(3, MEAN3, STD3), (1, (0.2860,), (0.3530,))])
def test_an_in_memory_split_is_normalised_once_to_the_bit_of_the_per_image_transform(channels, mean, std):
    images = torch.randint(0, 256, (37, channels, 9, 7), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    split = ImageTensorDataset(images, torch.arange(37) % 5)
    prepared = evaluation_set(split, mean, std, (9, 7))
    per_image = Transformed(split, eval_transform(mean, std, (9, 7)))
    assert isinstance(prepared, Normalised) and len(prepared) == len(per_image) == 37
    for i in range(37):
        (a, label_a), (b, label_b) = prepared[i], per_image[i]
        assert torch.equal(a, b) and label_a == label_b and isinstance(label_a, int)
    # another size, or a split read from files, is transformed as it is read
    assert isinstance(evaluation_set(split, mean, std, (12, 12)), Transformed)


@pytest.mark.parametrize("size", [(12, 10), (5, 4)])
def test_a_split_resized_once_holds_the_pixels_the_per_image_resize_gives(size, monkeypatch):
    """Up and down, over several chunks: each image is what the evaluation pipeline's resize makes of it, and the
    labels and source positions stay with their images."""
    monkeypatch.setattr("vitkit.data.tensor_dataset.RESIZE_CHUNK", 4)
    images = torch.randint(0, 256, (11, 3, 9, 7), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    split = ImageTensorDataset(images, torch.arange(11) % 5, indices=torch.arange(100, 111))
    resized = split.resized(size)
    per_image = Transformed(split, eval_transform(MEAN3, STD3, size))
    assert resized.images.shape == (11, 3, *size) and resized.images.dtype == torch.uint8
    assert torch.equal(resized.labels, split.labels) and torch.equal(resized.indices, split.indices)
    for i in range(11):
        assert torch.equal(evaluation_set(resized, MEAN3, STD3, size)[i][0], per_image[i][0]), i
    assert split.subset([]).resized(size).images.shape == (0, 3, *size)


def test_eval_transform_refuses_float_input():
    with pytest.raises(TypeError, match="uint8"):
        eval_transform((0.5,), (0.5,), 4)(torch.rand(1, 4, 4))


@pytest.mark.parametrize("crop", ["pad", "inception", "none"])
@pytest.mark.parametrize("channels", [1, 3])
def test_train_transform_shape_dtype_and_seeded_determinism(crop, channels):
    mean, std = (0.5,) * channels, (0.25,) * channels
    transform = train_transform(mean, std, 12, crop=crop, pad=3, flip=True, randaugment=9, random_erasing=0.5)
    x = image(channels, (10, 10))
    outputs = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        outputs.append(transform(x))
    assert all(o.shape == (channels, 12, 12) and o.dtype == torch.float32 for o in outputs)
    assert torch.equal(outputs[0], outputs[1])
    assert any(not torch.equal(outputs[0], o) for o in outputs[2:])


def test_train_transform_without_randomness_is_the_eval_transform():
    x = image(3)
    expected = eval_transform(MEAN3, STD3, 8)(x)
    for kwargs in ({"crop": "none"}, {"crop": "pad", "pad": 0}):
        assert torch.equal(train_transform(MEAN3, STD3, 8, flip=False, **kwargs)(x), expected)


def test_pad_crop_is_a_window_of_the_zero_padded_image():
    x, pad = image(1, (6, 6)), 2
    padded = normalised(F.pad(x, (pad,) * 4), (0.3,), (0.2,))  # zero pixels, then normalised
    windows = {(i, j): padded[:, i:i + 6, j:j + 6] for i in range(2 * pad + 1) for j in range(2 * pad + 1)}
    transform = train_transform((0.3,), (0.2,), 6, crop="pad", pad=pad, flip=False)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = transform(x)
        matches = [offset for offset, window in windows.items() if torch.equal(out, window)]
        assert matches, "the output is not a window of the padded image"
        seen.update(matches)
    assert len(seen) > 5  # translations really vary


def test_flip_gives_the_image_or_its_mirror_and_both_occur():
    x = image(3)
    plain = eval_transform(MEAN3, STD3, 8)(x)
    transform = train_transform(MEAN3, STD3, 8, crop="none", flip=True)
    results = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(x)
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
        results.append(torch.equal(out, plain))
    assert any(results) and not all(results)


def test_random_erasing_zeroes_a_rectangle_and_keeps_the_rest():
    x = image(1, (16, 16))
    plain = eval_transform((0.5,), (0.5,), 16)(x)
    torch.manual_seed(0)
    out = train_transform((0.5,), (0.5,), 16, crop="none", flip=False, random_erasing=1.0)(x)
    erased = out != plain
    assert erased.any() and torch.all(out[erased] == 0)
    rows, cols = erased[0].any(1).nonzero(), erased[0].any(0).nonzero()
    box = erased[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.float().mean() > 0.9  # a rectangle (pixels of the image that happened to be the mean stay 0 too)


@pytest.mark.parametrize("kwargs, match", [
    ({"crop": "center"}, "crop"), ({"pad": -1}, "pad"), ({"random_erasing": 1.5}, "random_erasing"),
    ({"randaugment": 31}, "randaugment"), ({"randaugment": 2.5}, "randaugment"),
])
def test_train_transform_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_transform((0.5,), (0.5,), 8, **kwargs)


def test_zero_std_is_refused():
    with pytest.raises(ValueError, match="std"):
        eval_transform((0.5,), (0.0,), 8)


# --- batch mixing ---------------------------------------------------------------------------------

def batch(n: int = 6, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    return images, torch.arange(n) % 4


def test_no_mixing_without_alphas():
    assert batch_mixer(10, 0.0, 0.0) is None


def test_mixup_blends_each_image_with_its_neighbour_by_the_target_weight():
    images, labels = batch()
    torch.manual_seed(0)
    mixed, targets = batch_mixer(4, mixup_alpha=0.8)(images, labels)
    assert targets.shape == (6, 4) and torch.allclose(targets.sum(1), torch.ones(6))
    lam = targets[0, labels[0]].item()
    neighbour = images.roll(1, 0)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * neighbour)
    expected = lam * F.one_hot(labels, 4) + (1 - lam) * F.one_hot(labels.roll(1, 0), 4)
    torch.testing.assert_close(targets, expected.float())


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    images, labels = batch(channels=3)
    torch.manual_seed(3)
    mixed, targets = batch_mixer(4, cutmix_alpha=1.0)(images, labels)
    neighbour = images.roll(1, 0)
    from_self = (mixed == images).all(1)  # (B, H, W): pixel kept from the image itself
    from_neighbour = (mixed == neighbour).all(1)
    assert torch.all(from_self | from_neighbour)
    kept = from_self[0].float().mean().item()
    assert abs(targets[0, labels[0]].item() - kept) < 1e-6


def test_both_alphas_choose_one_method_per_batch_deterministically():
    images, labels = batch()
    mixer = batch_mixer(4, 0.5, 1.0)
    torch.manual_seed(5)
    first = mixer(images, labels)
    torch.manual_seed(5)
    second = mixer(images, labels)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_mixer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mixup_alpha"):
        batch_mixer(10, -1.0, 0.0)
    with pytest.raises(ValueError, match="num_classes"):
        batch_mixer(1, 0.2, 0.0)
