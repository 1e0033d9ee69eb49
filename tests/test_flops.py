"""Training FLOPs per image, counted from the model, against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitkit.model import create_model
from vitkit.model.flops import training_flops_per_image
from vitkit.model.resnet import ResNetBaseline, ResNetConfig


def test_a_two_layer_mlp_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    forward = 2 * (4 * 3 + 3 * 2)  # 2 FLOPs per multiply-add; the bias additions are not counted
    # Backward: the second layer's weight and input gradients (2 x 3 x 2 each), the first layer's weight gradient
    # (2 x 4 x 3); the images need no gradient, so the first layer's input gradient is not computed.
    backward = 2 * (3 * 2) * 2 + 2 * (4 * 3)
    assert training_flops_per_image(model, (2, 2), 1) == forward + backward == 84


def test_a_convolution_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 5, kernel_size=3, padding=1), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    conv = 2 * (4 * 4) * 5 * (2 * 3 * 3)  # per output pixel and channel, 2 x 3 x 3 multiply-adds
    linear = 2 * 80 * 3
    # The convolution's weight gradient only; the linear layer's weight and input gradients.
    assert training_flops_per_image(model, 4, 2, batch=3) == (conv + linear) + conv + 2 * linear


def test_a_vit_is_three_forward_passes_but_its_patch_embedding_input_gradient():
    model = create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=128, depth=4, heads=4, mlp_dim=256)
    d, m, k, n, p = 128, 256, 10, 49, 4
    t = n + 1  # with the class token
    patch = 2 * n * (p * p) * d
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m  # qkv, q k^T and a v, out, MLP
    forward = patch + 4 * block + 2 * d * k
    # Every product's backward is its weight and input gradients, twice its forward, but the patch projection's
    # input gradient; the attention's two products count although the fused kernel would hide them.
    assert training_flops_per_image(model, 28, 1) == 3 * forward - patch


def test_patch_dropout_counts_the_tokens_a_training_step_keeps():
    full = create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=64, depth=2, heads=2, mlp_dim=128)
    dropped = create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=64, depth=2, heads=2, mlp_dim=128,
                           patch_dropout=0.5)
    assert training_flops_per_image(dropped, 28, 1) < 0.6 * training_flops_per_image(full, 28, 1)


def test_the_model_and_the_random_state_are_untouched():
    model = ResNetBaseline(ResNetConfig(img_size=8, in_chans=1, num_classes=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    flops = training_flops_per_image(model, 8, 1)
    assert flops > 0 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        training_flops_per_image(model, 8, 1, batch=0)
