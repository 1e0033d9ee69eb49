"""Fine-tuning building blocks: the new head, resolution and channel changes, the few-shot probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitkit.finetune import adapt_for_finetune, adapt_input_channels, few_shot_indices, fit_linear_probe
from vitkit.model import create_model

timm_pos_embed = pytest.importorskip("timm.layers.pos_embed")


def pretrained(**overrides):
    torch.manual_seed(0)
    model = create_model("Ti/4", img_size=16, in_chans=3, num_classes=7, width=32, depth=2, heads=4, mlp_dim=64,
                         **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" model: nothing left at its initial zero
    return model.eval()


def test_new_head_is_exactly_zero_and_everything_else_is_kept():
    source = pretrained(representation_size=24)
    model = adapt_for_finetune(source, num_classes=3)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.head.weight.shape == (3, 32)  # the pre-logits layer is dropped, as in the paper
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, theirs[key]), key
    kept = adapt_for_finetune(source, num_classes=3, keep_pre_logits=True)
    assert kept.head.weight.shape == (3, 24)
    assert torch.equal(kept.pre_logits.fc.weight, source.pre_logits.fc.weight)
    assert source.head.weight.shape == (7, 24)  # the source is untouched


def test_same_grid_keeps_the_position_embedding_bit_for_bit():
    source = pretrained()
    model = adapt_for_finetune(source, num_classes=3, img_size=16)
    assert torch.equal(model.pos_embed, source.pos_embed)


@pytest.mark.parametrize("size", [24, 32, (16, 28)])
def test_new_grid_matches_timm_resample_and_is_stored(size):
    source = pretrained()
    model = adapt_for_finetune(source, num_classes=3, img_size=size)
    new_grid = model.cfg.grid_size
    expected = timm_pos_embed.resample_abs_pos_embed(source.pos_embed.detach(), list(new_grid), [4, 4],
                                                     num_prefix_tokens=1, interpolation="bicubic", antialias=True)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-5)
    assert model.pos_embed.shape == (1, 1 + new_grid[0] * new_grid[1], 32)
    model(torch.randn(1, 3, *model.cfg.img_size))


@pytest.mark.parametrize("old,new", [(1, 3), (3, 1)])
def test_channel_change_keeps_grey_images_unchanged(old, new):
    torch.manual_seed(0)
    source = pretrained() if old == 3 else create_model("Ti/4", img_size=16, in_chans=1, num_classes=7, width=32,
                                                        depth=2, heads=4, mlp_dim=64).eval()
    model = adapt_for_finetune(source, num_classes=3, in_chans=new)
    grey = torch.randn(2, 1, 16, 16)
    src_in = grey.expand(-1, old, -1, -1)
    new_in = grey.expand(-1, new, -1, -1)
    torch.testing.assert_close(model.forward_features(new_in), source.forward_features(src_in), rtol=1e-5, atol=1e-5)


def test_unsupported_changes_are_clear_errors():
    source = pretrained()
    with pytest.raises(ValueError, match=r"30x30 is not divisible by the patch size 4"):
        adapt_for_finetune(source, num_classes=3, img_size=30)
    with pytest.raises(ValueError, match="at least 2 classes"):
        adapt_for_finetune(source, num_classes=1)
    with pytest.raises(ValueError, match="3-channel patch embedding to 4 channels"):
        adapt_input_channels(source.patch_embed.proj.weight, 4)


def test_linear_probe_matches_numpy_least_squares():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    labels = rng.integers(0, 4, size=40)
    l2 = 0.7
    w, b = fit_linear_probe(torch.from_numpy(x), torch.from_numpy(labels), num_classes=4, l2=l2)
    # The same ridge problem as plain least squares: [X 1; sqrt(l2) I 0] W = [Y; 0].
    y = -np.ones((40, 4))
    y[np.arange(40), labels] = 1
    a = np.vstack([np.hstack([x, np.ones((40, 1))]), np.hstack([np.sqrt(l2) * np.eye(6), np.zeros((6, 1))])])
    target = np.vstack([y, np.zeros((6, 4))])
    expected, *_ = np.linalg.lstsq(a, target, rcond=None)
    np.testing.assert_allclose(w.numpy(), expected[:6], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), expected[6], rtol=1e-9, atol=1e-10)


def test_few_shot_draws_k_per_class_and_rejects_too_many():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 8)
    picked = few_shot_indices(labels, shots=3, seed=1)
    assert torch.equal(torch.bincount(labels[picked]), torch.tensor([3, 3, 3]))
    assert torch.equal(picked, few_shot_indices(labels, shots=3, seed=1))
    with pytest.raises(ValueError, match=r"--shots 4 .* smallest class \(3\)"):
        few_shot_indices(labels, shots=4, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        few_shot_indices(torch.zeros(5, dtype=torch.long), shots=1, seed=0)
