"""A ViTConfig read off the shapes of a state dict, for weights that come without one."""

from __future__ import annotations

import math

import torch

from vitkit.model import SIZES, ViTConfig
from vitkit.model.resnet_stem import ROOT_WIDTH, root_conv_key, stem_channels, stem_stride
from vitkit.weights.convert import to_vitkit
from vitkit.weights.errors import WeightsError
from vitkit.weights.formats import stem_layers_of


def infer_config(
    state_dict: dict[str, torch.Tensor],
    fmt: str | None = None,
    *,
    heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> ViTConfig:
    """The ViTConfig that the weights fit, in any supported layout.

    Shapes give everything but the number of heads (except in official checkpoints, whose kernels keep
    the heads apart) and a non-square grid; a hybrid's ResNet layout (`stem_layers`) is read off its key names.
    `heads` defaults to the paper's for a known size (width, depth, MLP), else width // 64; `img_size` defaults to
    the square grid of the position embedding (times the patch size and a hybrid's ResNet stride).
    Dropout rates are not stored in weights and stay 0. `fmt`, if given, must be the detected format.
    """
    sd, detected, found_heads = to_vitkit(state_dict)
    if fmt is not None and fmt != detected and {fmt, detected} != {"vitkit", "timm"}:
        raise WeightsError(f"these weights are in {detected!r} layout, not {fmt!r}")
    fmt = detected
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise WeightsError(f"cannot infer a config from these {fmt} weights: they lack {key!r}")
    width, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
    if ph != pw:
        raise WeightsError(f"the patch embedding is {ph}x{pw}; vitkit's patches are square")
    stem_layers = stem_layers_of(sd)
    if stem_layers is not None:
        in_chans = _stem_input_channels(sd, stem_layers, in_chans)
    stride = ph * (1 if stem_layers is None else stem_stride(stem_layers))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    mlp_dim = sd["blocks.0.mlp.fc1.weight"].shape[0]
    pool = "cls" if "cls_token" in sd else "gap"
    prefix = 1 if pool == "cls" else 0
    if img_size is None:
        patches = sd["pos_embed"].shape[1] - prefix
        side = math.isqrt(patches)
        if side * side != patches:
            raise WeightsError(f"the position embedding has {patches} patch positions, not a square grid: "
                               "pass img_size=(H, W)")
        img_size = (side * stride, side * stride)
    if heads is None:
        heads = found_heads or _default_heads(width, depth, mlp_dim)
    elif found_heads is not None and heads != found_heads:
        raise WeightsError(f"heads={heads} was given but the checkpoint has {found_heads} attention heads")
    rep = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    return ViTConfig(img_size=img_size, patch_size=ph, in_chans=in_chans, num_classes=num_classes, width=width,
                     depth=depth, heads=heads, mlp_dim=mlp_dim, pool=pool, representation_size=rep,
                     stem_layers=stem_layers)


def _stem_input_channels(sd: dict[str, torch.Tensor], layers: tuple[int, ...], feature_chans: int) -> int:
    """The image channels of a hybrid, from its root convolution; refuses ResNets of other widths than vitkit's."""
    key = "patch_embed.backbone." + root_conv_key(layers)
    if key not in sd:
        raise WeightsError(f"cannot infer a config from these hybrid weights: they lack {key!r}")
    root_width, in_chans = sd[key].shape[:2]
    if root_width != ROOT_WIDTH or feature_chans != stem_channels(layers):
        raise WeightsError(f"the hybrid's ResNet has {root_width} root channels and gives {feature_chans} feature "
                           f"channels; vitkit's ResNet (BiT's width factor 1) has {ROOT_WIDTH} and "
                           f"{stem_channels(layers)} for the layout {layers}")
    return in_chans


def _default_heads(width: int, depth: int, mlp_dim: int) -> int:
    for w, d, m, h in SIZES.values():
        if (w, d, m) == (width, depth, mlp_dim):
            return h
    if width % 64 == 0:
        return width // 64
    raise WeightsError(f"cannot guess the number of attention heads for width {width}: pass heads=")
