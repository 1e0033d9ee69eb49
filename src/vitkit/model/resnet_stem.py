"""The ResNet of the paper's hybrid architecture (section 3.1): its feature map, not the image, is cut into patches.

The network is the ResNet v2 of Big Transfer (BiT, Kolesnikov et al. 2020) as the hybrid uses it: every convolution
weight-standardised (Qiao et al. 2019) and followed by GroupNorm with 32 groups, bottleneck units without
pre-activation (conv -> norm -> ReLU; the stride on the 3x3 convolution; the shortcut projected by a strided 1x1
convolution and a GroupNorm where the shape changes), and TensorFlow's SAME padding throughout. Layer order,
epsilons, padding and parameter names are those of timm's ResNetV2 built with preact=False, stem_type='same' and
conv_layer=StdConv2dSame(eps=1e-8) (timm/models/vision_transformer_hybrid.py), so timm's hybrid state dicts load
without renaming; the official Flax checkpoints (vit_jax/models_resnet.py) convert in vitkit.weights.

The layout is a tuple of units per stage, `layers`:

    ()              the root block alone (timm's "stem only" hybrid): a 7x7 convolution of stride 2, GroupNorm,
                    ReLU and a 3x3 max-pool of stride 2, giving 64 channels at stride 4.
    (n1, ..., nk)   the root block, then k <= 4 stages of n_i bottleneck units. Stage i gives 256 * 2^(i-1)
                    channels; the first keeps the resolution and every later one halves it, so the network's
                    stride is 4 * 2^(k-1): 16 for the paper's R50 of three stages (3, 4, 9), 32 for four.

Numerics are timm's, which differ slightly from the official Flax code: the weights are standardised as
(w - mean) / sqrt(var + 1e-8) (Flax: (w - mean) / (std + 1e-5)), and GroupNorm's epsilon is 1e-5 (Flax: 1e-6).

Shapes: B batch, C channels, H x W input of a layer, s its stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ROOT_WIDTH = 64
"""Channels of the root block (BiT's width factor 1)."""
STAGE_WIDTHS = (256, 512, 1024, 2048)
"""Output channels of the four stages; a bottleneck unit's inner width is a quarter of its stage's."""
GROUPS = 32
NORM_EPS = 1e-5
"""GroupNorm's epsilon (timm's; the official Flax code uses 1e-6)."""
STANDARDISATION_EPS = 1e-8
"""Added to the variance of each output channel's weights before dividing by its square root (timm's)."""


def check_layers(layers: object) -> tuple[int, ...]:
    """`layers` as a tuple of at most four positive unit counts, or a ValueError saying what is wrong."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (tuple, list)):
        raise ValueError(f"stem_layers must be a tuple of units per ResNet stage (e.g. (3, 4, 9); () for the root "
                         f"block alone) or None for no stem, got {layers!r}")
    if len(layers) > len(STAGE_WIDTHS) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                              for n in layers):
        raise ValueError(f"stem_layers must hold at most {len(STAGE_WIDTHS)} positive unit counts (one per ResNet "
                         f"stage), got {tuple(layers)!r}")
    return tuple(layers)


def stem_stride(layers: tuple[int, ...]) -> int:
    """How many input pixels one feature-map position spans along each side: 4, then x2 per stage after the first."""
    return 4 * 2 ** max(len(layers) - 1, 0)


def stem_channels(layers: tuple[int, ...]) -> int:
    """Channels of the feature map the patch projection takes."""
    return STAGE_WIDTHS[len(layers) - 1] if layers else ROOT_WIDTH


def stem_parameters(layers: tuple[int, ...], in_chans: int) -> int:
    """Parameters of the network with this layout, from the dimensions alone (no allocation)."""
    count = in_chans * ROOT_WIDTH * 7 * 7 + 2 * ROOT_WIDTH  # root convolution (no bias) and its GroupNorm
    chans = ROOT_WIDTH
    for stage, units in enumerate(layers):
        out = STAGE_WIDTHS[stage]
        mid = out // 4
        for unit in range(units):
            count += chans * mid + mid * mid * 3 * 3 + mid * out  # conv1 (1x1), conv2 (3x3), conv3 (1x1)
            count += 2 * (mid + mid + out)  # norm1, norm2, norm3
            if unit == 0:
                count += chans * out + 2 * out  # the shortcut's projection and its GroupNorm
            chans = out
    return count


def root_conv_key(layers: tuple[int, ...]) -> str:
    """State-dict key, inside the network, of the convolution that takes the image (timm's names)."""
    return "stem.conv.weight" if layers else "conv.weight"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's SAME along one side of `size` pixels: the output has
    ceil(size / stride) positions, the padding is split as evenly as it goes, the odd pixel after."""
    rest = size % stride
    total = max(kernel - (stride if rest == 0 else rest), 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)  # (B, C, H + top + bottom, W + left + right)


class StdConv2d(nn.Conv2d):
    """A bias-free convolution whose kernel is standardised per output channel (zero mean and unit variance over
    its fan-in) at every call, with SAME padding: symmetric and fixed at stride 1, computed from the input's size
    otherwise. The standardisation is computed in float32 whatever the weights' dtype."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1):
        # At stride 1 SAME pads an odd kernel by (k - 1) / 2 on every side, whatever the input size.
        fixed = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_chans, out_chans, kernel_size, stride=stride,
                         padding=(kernel_size - 1) // 2 if fixed else 0, bias=False)
        self.pad_at_call = not fixed

    def standardised_weight(self) -> torch.Tensor:
        """(O, I, k, k) kernel with each output channel's weights at zero mean and unit variance."""
        flat = self.weight.float().flatten(1)  # (O, I k k): one row of fan-in weights per output channel
        # Layer normalisation without scale and shift is exactly (w - mean) / sqrt(var + eps) per row, in one fused
        # kernel: four times faster than the three elementwise passes (measured on the R50 layers' shapes).
        flat = F.layer_norm(flat, flat.shape[1:], eps=STANDARDISATION_EPS)
        return flat.reshape(self.weight.shape).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_at_call:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])  # (B, C, H', W')
        return F.conv2d(x, self.standardised_weight(), None, self.stride, self.padding)  # (B, O, H/s, W/s)


def _group_norm(chans: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, chans, eps=NORM_EPS)


class RootBlock(nn.Module):
    """The root ("stem") of the ResNet: 7x7 convolution of stride 2 -> GroupNorm -> ReLU -> 3x3 max-pool of stride 2."""

    def __init__(self, in_chans: int):
        super().__init__()
        self.conv = StdConv2d(in_chans, ROOT_WIDTH, 7, stride=2)
        self.norm = _group_norm(ROOT_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))  # (B, C, H, W) -> (B, 64, H/2, W/2)
        x = _pad_same(x, 3, 2, value=float("-inf"))  # the padding never wins a maximum
        # Max-pooling on a CPU is vectorised over channels only in the channels-last layout: there, at the fast
        # preset's shape (batch 256 of 64 x 17 x 17), it ran 15x faster forward and 2x backward than on NCHW.
        x = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size=3, stride=2)
        # ReLU after the pooling gives the same values and gradients as before it (the maximum of rectified values
        # is the rectified maximum), on a quarter of the positions and in the pooling's layout.
        return F.relu(x, inplace=True)  # (B, 64, H/4, W/4), channels-last


class Projection(nn.Module):
    """The shortcut of a unit that changes the shape: a strided 1x1 convolution and a GroupNorm (no ReLU)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv = StdConv2d(in_chans, out_chans, 1, stride=stride)
        self.norm = _group_norm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))  # (B, C, H, W) -> (B, O, H/s, W/s)


class Bottleneck(nn.Module):
    """A residual unit: 1x1 convolution to a quarter of the output width, 3x3 (carrying the stride), 1x1 back, each
    followed by GroupNorm and all but the last by ReLU; then the shortcut is added and ReLU applied."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1):
        super().__init__()
        mid = out_chans // 4
        self.downsample = (Projection(in_chans, out_chans, stride)
                           if stride != 1 or in_chans != out_chans else None)
        self.conv1 = StdConv2d(in_chans, mid, 1)
        self.norm1 = _group_norm(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = _group_norm(mid)
        self.conv3 = StdConv2d(mid, out_chans, 1)
        self.norm3 = _group_norm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, O, H/s, W/s)
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)  # (B, O/4, H, W)
        y = F.relu(self.norm2(self.conv2(y)), inplace=True)  # (B, O/4, H/s, W/s)
        y = self.norm3(self.conv3(y))  # (B, O, H/s, W/s)
        return F.relu(y + shortcut, inplace=True)  # (B, O, H/s, W/s)


class Stage(nn.Module):
    """`units` bottleneck units; the first changes the width and carries the stage's stride."""

    def __init__(self, in_chans: int, out_chans: int, units: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(*(Bottleneck(in_chans if i == 0 else out_chans, out_chans, stride if i == 0 else 1)
                                      for i in range(units)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, C, H, W) -> (B, O, H/s, W/s)


class ResNet(nn.Module):
    """The root block and the stages of `layers` (at least one): (B, C, H, W) -> (B, C', H/s, W/s), s = stem_stride."""

    def __init__(self, layers: tuple[int, ...], in_chans: int):
        super().__init__()
        self.stem = RootBlock(in_chans)
        stages, chans = [], ROOT_WIDTH
        for i, units in enumerate(layers):
            stages.append(Stage(chans, STAGE_WIDTHS[i], units, stride=1 if i == 0 else 2))
            chans = STAGE_WIDTHS[i]
        self.stages = nn.Sequential(*stages)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Back to NCHW: GroupNorm on channels-last tensors runs several times slower on a CPU.
        x = self.stem(x).contiguous()  # (B, 64, H/4, W/4)
        for stage in self.stages:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)  # each later stage halves H and W
        return x  # (B, C', H/s, W/s)


def build_stem(layers: tuple[int, ...], in_chans: int) -> nn.Module:
    """The network of a layout: the root block alone for (), else the root block and the stages (timm's module
    structure in both cases, which sets the parameter names)."""
    layers = check_layers(layers)
    return ResNet(layers, in_chans) if layers else RootBlock(in_chans)
