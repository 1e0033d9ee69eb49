"""Training compute of a model, counted from the operations it runs: FLOPs of one training step per image.

The count is torch's FlopCounterMode over a real forward and backward pass of a copy of the model in training mode:
2 FLOPs per multiply-add of every matrix product and convolution, forward and backward (the gradients of the weights
and of the activations; the images need no gradient, so the first layer's input gradient is neither computed nor
counted). Elementwise work (normalisation, activations, softmax, the optimiser's update) is left out, as in the
paper's and most published counts. Attention is counted as its two matrix products: the fused kernels are replaced
by the plain implementation while counting.

In training mode a ViT with PatchDropout encodes only the tokens it keeps, so its count is that of the tokens kept,
the compute a training step really spends.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def training_flops_per_image(model: nn.Module, img_size: tuple[int, int] | int, in_chans: int, batch: int = 2) -> int:
    """FLOPs of one forward and backward pass per image of `img_size` with `in_chans` channels, counted on a copy of
    `model` in training mode over a batch of `batch` random images (the model itself, its gradients, statistics and
    the random state are untouched)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if min(h, w) < 1 or in_chans < 1:
        raise ValueError(f"img_size {img_size!r} and in_chans {in_chans!r} must be positive")
    counted = copy.deepcopy(model).float().train()
    for param in counted.parameters():
        param.grad = None
    device = next(counted.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        images = torch.randn(batch, in_chans, h, w, device=device)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            counted(images).float().sum().backward()
    total = counter.get_total_flops()
    if total % batch:
        raise RuntimeError(f"{total} FLOPs do not divide over the batch of {batch}: the model's work depends on the "
                           "batch in a way this count does not handle")
    return total // batch
