"""Masked patch prediction: corruption statistics and contents, colour classes, the loss, gradients, learning, errors.

Known answers are computed here independently (loops, hand arithmetic), not with the module's own formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitkit
from vitkit.pretrain import (
    KEPT,
    MASKED,
    REPLACED,
    UNTOUCHED,
    MaskedPatchPrediction,
    colour_targets,
    corrupt_patches,
    downsized_targets,
    masked_loss,
    pixel_targets,
)

TINY = dict(img_size=28, in_chans=1, num_classes=0, width=64, depth=2, heads=2, mlp_dim=128, patch_dropout=0.0)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return vitkit.create_model("Ti/4", **{**TINY, **overrides})


def flat_patches(colours, patch_size):
    """(C, gh, gw) colours -> (1, C, gh * P, gw * P) image whose every patch is flat at its colour."""
    colours = torch.as_tensor(colours, dtype=torch.float32)
    return colours.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[None]


# ---- corruption ----


@pytest.mark.parametrize("rate,split", [(0.5, (0.8, 0.1, 0.1)), (0.25, (0.5, 0.25, 0.25))])
def test_corruption_statistics(rate, split):
    b, n, d = 512, 64, 4
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(b, n, d, generator=gen)
    noise = torch.rand(b, n, 3, generator=gen)
    out = corrupt_patches(patches, noise, torch.zeros(d), rate=rate, split=split)
    assert out.patches.shape == (b, n, d) and out.corrupted.dtype == torch.bool and out.kind.dtype == torch.int8
    # Exactly round(rate * N) per image, so the fraction is exact, not just within 1%.
    assert (out.corrupted.sum(dim=1) == round(rate * n)).all()
    assert abs(out.corrupted.float().mean().item() - rate) <= 0.01
    assert ((out.kind != UNTOUCHED) == out.corrupted).all()
    kinds = out.kind[out.corrupted]
    for value, share in zip((MASKED, REPLACED, KEPT), split):
        assert abs((kinds == value).float().mean().item() - share) <= 0.02, (value, share)


def test_corrupted_are_the_lowest_noise():
    noise = torch.rand(3, 10, 3, generator=torch.Generator().manual_seed(2))
    out = corrupt_patches(torch.randn(3, 10, 2), noise, torch.zeros(2), rate=0.3)
    for b in range(3):
        lowest = sorted(range(10), key=lambda i: noise[b, i, 0].item())[:3]
        assert set(torch.nonzero(out.corrupted[b]).flatten().tolist()) == set(lowest)


def test_corruption_contents():
    b, n, d = 6, 9, 5
    gen = torch.Generator().manual_seed(3)
    patches = torch.randn(b, n, d, generator=gen)
    noise = torch.rand(b, n, 3, generator=gen)
    mask = torch.randn(d, generator=gen)
    out = corrupt_patches(patches, noise, mask, rate=0.5, split=(0.4, 0.4, 0.2))
    seen = {MASKED: 0, REPLACED: 0, KEPT: 0, UNTOUCHED: 0}
    for i in range(b):
        for j in range(n):
            kind = int(out.kind[i, j])
            seen[kind] += 1
            got = out.patches[i, j]
            if kind == MASKED:
                assert torch.equal(got, mask)
            elif kind == REPLACED:
                others = [k for k in range(n) if k != j]
                source = others[int(noise[i, j, 2].item() * (n - 1))]
                assert source != j
                assert torch.equal(got, patches[i, source])  # the source's original embedding
                assert not torch.equal(got, patches[i, j])
            else:
                assert torch.equal(got, patches[i, j])
    assert all(count > 0 for count in seen.values()), seen


def test_replacement_uses_originals_and_edges_of_noise():
    # Two patches, both corrupted and both replaced: each must take the other's ORIGINAL embedding.
    patches = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    noise = torch.tensor([[[0.1, 0.85, 0.0], [0.2, 0.85, 0.9999]]])
    out = corrupt_patches(patches, noise, torch.zeros(2), rate=0.99, split=(0.8, 0.1, 0.1))
    assert out.kind.tolist() == [[REPLACED, REPLACED]]
    assert out.patches.tolist() == [[[2.0, 2.0], [1.0, 1.0]]]
    # A single patch: at least one corrupted even at a small rate, and a replacement is itself.
    one = corrupt_patches(torch.tensor([[[3.0]]]), torch.tensor([[[0.5, 0.85, 0.7]]]), torch.zeros(1), rate=0.1)
    assert one.corrupted.tolist() == [[True]] and one.kind.tolist() == [[REPLACED]]
    assert one.patches.tolist() == [[[3.0]]]


def test_corruption_gradients():
    patches = torch.randn(2, 8, 3, requires_grad=True)
    mask = torch.randn(3, requires_grad=True)
    noise = torch.rand(2, 8, 3, generator=torch.Generator().manual_seed(4))
    out = corrupt_patches(patches, noise, mask)
    (out.patches * torch.randn_like(out.patches)).sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    masked = out.kind == MASKED
    assert masked.any()
    # Untouched patches pass their gradient; a masked patch gets none unless it is some replacement's source.
    untouched = out.kind == UNTOUCHED
    assert (patches.grad[untouched].abs().sum(dim=-1) > 0).all()


# ---- targets ----


@pytest.mark.parametrize(
    "value,bits,expected",
    [
        (0.0, 3, 0), (0.124, 3, 0), (0.125, 3, 1), (0.5, 3, 4), (0.874, 3, 6), (0.875, 3, 7), (1.0, 3, 7),
        (0.0, 1, 0), (0.49, 1, 0), (0.5, 1, 1), (1.0, 1, 1),
        (0.0, 8, 0), (1 / 256, 8, 1), (0.5, 8, 128), (255 / 256, 8, 255), (1.0, 8, 255),
    ],
)
def test_grey_colour_classes(value, bits, expected):
    image = torch.full((1, 1, 8, 8), value)
    assert colour_targets(image, 4, bits).tolist() == [[expected] * 4]


@pytest.mark.parametrize(
    "rgb,bits,expected",
    [
        ((1.0, 0.0, 0.5), 3, 7 * 64 + 0 * 8 + 4),  # 452
        ((0.0, 0.0, 0.0), 3, 0),
        ((1.0, 1.0, 1.0), 3, 511),
        ((0.25, 0.125, 0.99), 3, 2 * 64 + 1 * 8 + 7),
        ((0.5, 0.25, 0.75), 2, 2 * 16 + 1 * 4 + 3),
        ((0.0, 1.0, 0.0), 2, 3 * 4),
    ],
)
def test_rgb_colour_classes(rgb, bits, expected):
    image = torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert colour_targets(image, 4, bits).tolist() == [[expected]]


def test_colour_of_the_mean_and_row_major_order():
    # A 2 x 3 grid of grey patches, each half black and half at a level: the class is of the MEAN.
    p = 4
    image = torch.zeros(1, 1, 2 * p, 3 * p)
    levels = [[1.0, 0.5, 0.25], [0.75, 0.0, 0.875]]
    for r in range(2):
        for c in range(3):
            image[0, 0, r * p:(r + 1) * p, c * p:c * p + p // 2] = levels[r][c]
    expected = [min(math.floor(v / 2 * 8), 7) for row in levels for v in row]  # mean = v / 2
    assert colour_targets(image, p, 3).tolist() == [expected]


def test_downsized_and_pixel_targets():
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 8, 12, generator=gen)
    p, s = 4, 2
    down = downsized_targets(images, p, size=s)
    pixels = pixel_targets(images, p)
    assert down.shape == (2, 6, 3 * s * s) and pixels.shape == (2, 6, 3 * p * p)
    for b in range(2):
        for n in range(6):
            r, c = divmod(n, 3)
            patch = images[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # (C, P, P)
            assert torch.equal(pixels[b, n], patch.reshape(-1))
            blocks = torch.stack([
                torch.stack([patch[:, y * 2:y * 2 + 2, x * 2:x * 2 + 2].mean(dim=(1, 2)) for x in range(s)], dim=-1)
                for y in range(s)
            ], dim=-2)  # (C, s, s)
            torch.testing.assert_close(down[b, n], blocks.reshape(-1))


# ---- the loss ----


def test_masked_loss_covers_corrupted_patches_only():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 8, generator=gen)
    targets = torch.randint(0, 8, (2, 5), generator=gen)
    corrupted = torch.tensor([[True, False, True, False, False], [False, True, False, False, True]])
    loss = masked_loss(logits, targets, corrupted)
    picked = [(0, 0), (0, 2), (1, 1), (1, 4)]
    expected = sum(-torch.log_softmax(logits[b, n], -1)[targets[b, n]] for b, n in picked) / len(picked)
    torch.testing.assert_close(loss, expected)
    other = targets.clone()
    other[0, 1] = (other[0, 1] + 3) % 8  # an uncorrupted patch's target
    assert torch.equal(masked_loss(logits, other, corrupted), loss)
    other[1, 4] = (other[1, 4] + 3) % 8  # a corrupted one
    assert not torch.equal(masked_loss(logits, other, corrupted), loss)
    # L2 targets: the mean over corrupted patches of each patch's mean squared error.
    values = torch.rand(2, 5, 8, generator=gen)
    expected_l2 = sum(((logits[b, n] - values[b, n]) ** 2).mean() for b, n in picked) / len(picked)
    torch.testing.assert_close(masked_loss(logits, values, corrupted), expected_l2)


def test_uncorrupted_patch_changes_target_not_loss():
    # Two images differing only in an uncorrupted patch: its target differs, the masked loss does not.
    objective = MaskedPatchPrediction(8, 1, 4, mean=[0.0], std=[1.0])
    images = torch.zeros(1, 1, 8, 8)
    other = images.clone()
    other[..., 4:, 4:] = 1.0  # patch 3
    corrupted = torch.tensor([[True, True, False, False]])
    a, b = objective.targets(images), objective.targets(other)
    assert a[0, 3] != b[0, 3] and torch.equal(a[0, :3], b[0, :3])
    logits = torch.randn(1, 4, 8)
    assert torch.equal(masked_loss(logits, a, corrupted), masked_loss(logits, b, corrupted))


def test_forward_matches_the_pieces():
    model = tiny_model().eval()
    objective = MaskedPatchPrediction(64, 1, 4, mean=[0.5], std=[0.25])
    gen = torch.Generator().manual_seed(7)
    images_01 = torch.rand(3, 1, 28, 28, generator=gen)
    images = (images_01 - 0.5) / 0.25
    noise = torch.rand(3, *objective.noise_shape(49), generator=gen)
    out = objective(model, images, noise)
    assert out.corrupted_count == 3 * round(0.5 * 49)
    with torch.no_grad():
        patches, grid = model.embed_patches(images)
        corruption = corrupt_patches(patches, noise, objective.mask_embedding)
        tokens = model.encode(corruption.patches, grid)[:, 1:]  # (B, N, D), class token dropped
        logits = objective.head(tokens)  # (B, N, 8): 2**3 grey levels
        targets = colour_targets((images * 0.25 + 0.5).clamp(0, 1), 4, 3)  # the normalisation undone
    torch.testing.assert_close(out.loss, masked_loss(logits, targets, corruption.corrupted))
    correct = int((logits.argmax(-1) == targets)[corruption.corrupted].sum())
    assert out.correct == correct
    assert objective.head.out_features == 8
    assert MaskedPatchPrediction(64, 3, 4, [0.5] * 3, [0.5] * 3).head.out_features == 512


@pytest.mark.parametrize("target,width", [("downsized", 1 * 2 * 2), ("pixels", 1 * 4 * 4)])
def test_l2_targets_forward(target, width):
    model = tiny_model()
    objective = MaskedPatchPrediction(64, 1, 4, mean=[0.0], std=[1.0], target=target, downsize=2)
    assert objective.head.out_features == width
    images = torch.rand(2, 1, 28, 28)
    out = objective(model, images, torch.rand(2, 49, 3))
    assert out.loss.ndim == 0 and out.correct == 0 and out.corrupted_count == 2 * 24


def test_gradient_reaches_mask_head_and_model():
    model = tiny_model(pool="gap")
    objective = MaskedPatchPrediction(64, 1, 4, mean=[0.5], std=[0.5], split=(1.0, 0.0, 0.0))
    images = torch.randn(2, 1, 28, 28)
    out = objective(model, images, torch.rand(2, 49, 3))
    out.loss.backward()
    assert objective.mask_embedding.grad.abs().sum() > 0
    assert objective.head.weight.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_short_optimisation_lowers_the_loss():
    model = tiny_model(depth=1)
    objective = MaskedPatchPrediction(64, 1, 4, mean=[0.5], std=[0.5])
    # Each image one flat grey of four, in the middle of distinct 3-bit levels: visible patches give the answer.
    colours = torch.tensor([0.1, 0.4, 0.6, 0.9]).repeat(4)  # 16 images
    images = ((colours.view(-1, 1, 1, 1).expand(-1, 1, 28, 28)) - 0.5) / 0.5
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(8)
    losses = []
    for _ in range(60):
        out = objective(model, images, torch.rand(16, 49, 3, generator=gen))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], (losses[0], losses[-5:])
    assert out.correct > 0.9 * out.corrupted_count


# ---- errors ----


def objective_kwargs(**overrides):
    return {**dict(width=64, in_chans=1, patch_size=4, mean=[0.5], std=[0.5]), **overrides}


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(rate=0.0), "rate.*0.0"),
        (dict(rate=1.0), "rate.*1.0"),
        (dict(rate=-0.2), "rate.*-0.2"),
        (dict(split=(0.8, 0.1)), r"split.*\(0.8, 0.1\)"),
        (dict(split=(0.8, 0.1, 0.2)), r"split.*\(0.8, 0.1, 0.2\)"),
        (dict(split=(1.2, -0.1, -0.1)), r"split.*\(1.2, -0.1, -0.1\)"),
        (dict(bits=0), "bits.*0"),
        (dict(bits=9), "bits.*9"),
        (dict(bits=2.5), "bits.*2.5"),
        (dict(target="rgb"), "target 'rgb'"),
        (dict(mean=[0.5, 0.5]), r"mean \[0.5, 0.5\].*1 channels"),
        (dict(std=[0.2, 0.2, 0.2]), r"std \[0.2, 0.2, 0.2\].*1 channels"),
        (dict(target="downsized", downsize=3), "downsize 3.*patch size 4"),
    ],
)
def test_bad_configuration(overrides, match):
    with pytest.raises(ValueError, match=match):
        MaskedPatchPrediction(**objective_kwargs(**overrides))


def test_bad_inputs():
    model = tiny_model()
    objective = MaskedPatchPrediction(**objective_kwargs())
    noise = torch.rand(2, 49, 3)
    with pytest.raises(ValueError, match="noise.*49, 3.*got \\(2, 49, 2\\)"):
        objective(model, torch.rand(2, 1, 28, 28), torch.rand(2, 49, 2))
    with pytest.raises(ValueError, match="noise.*got \\(2, 48, 3\\)"):
        objective(model, torch.rand(2, 1, 28, 28), torch.rand(2, 48, 3))
    with pytest.raises(ValueError, match="image size 3x3 is smaller"):
        objective(model, torch.rand(2, 1, 3, 3), noise)
    with pytest.raises(ValueError, match="image size 28x30 is not divisible"):
        objective(model, torch.rand(2, 1, 28, 30), noise)
    with pytest.raises(ValueError, match="patch_dropout 0.5.*set patch_dropout 0"):
        objective(tiny_model(patch_dropout=0.5), torch.rand(2, 1, 28, 28), noise)
    with pytest.raises(ValueError, match="image size 6x6 is not divisible"):
        colour_targets(torch.rand(1, 1, 6, 6), 4)
    with pytest.raises(ValueError, match="bits.*12"):
        colour_targets(torch.rand(1, 1, 8, 8), 4, bits=12)
    with pytest.raises(ValueError, match="downsize 3"):
        downsized_targets(torch.rand(1, 1, 8, 8), 4, size=3)
    with pytest.raises(ValueError, match="rate.*1.5"):
        corrupt_patches(torch.rand(1, 4, 2), torch.rand(1, 4, 3), torch.zeros(2), rate=1.5)
    with pytest.raises(ValueError, match=r"split.*\[0.5, 0.5\]"):
        corrupt_patches(torch.rand(1, 4, 2), torch.rand(1, 4, 3), torch.zeros(2), split=[0.5, 0.5])
