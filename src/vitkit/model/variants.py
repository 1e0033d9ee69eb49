"""Variant names ("B/16", "R50+B/16") decoded to model dimensions: one table of sizes, one of ResNet stems.

A plain ViT is "<size>/<P>": P x P patches of the image. A hybrid (section 3.1) is "<stem>+<size>/<S>", where S is
the total stride, the pixels a token spans along each side: the ResNet's stride times the patch size on its feature
map, as in the paper's R50+ViT-B/16 (the R50 of three stages, stride 16, with 1x1 patches). So in both kinds of name
the number after the slash is the pixels per token, and a 224 px image gives a (224 / S)^2 grid.

A stem in STEMS names a ResNet by its four stages. Of its forms, the hybrid takes the one of the largest stride that
divides S, and patches of S / stride on its map:

- stride 32: the four stages (R50: 3, 4, 6, 3);
- stride 16: the paper's other form, stage 4 removed and its units added to stage 3 (R50: 3, 4, 9);
- "R" is the root block alone (a 7x7 convolution of stride 2 and a 3x3 max-pool of stride 2): stride 4.

So "R50+B/16" is (3, 4, 9) with patch 1, "R50+L/32" (3, 4, 6, 3) with patch 1, "R26+S/32" (2, 2, 2, 2) with patch 1,
"R50+B/64" the four stages with 2x2 patches, and "R+Ti/32" the root block with 8x8 patches. The last is timm's
vit_tiny_r_s16_p8_224, the official "R+ViT-Ti_16": its config says the root block downscales 2x, making /16 with
8x8 patches, but the root block downscales 4x, so its tokens span 32 pixels (a 7x7 grid at 224 px, as timm builds
it). vitkit names it by what it computes; "R+Ti/16" here is the root block with 4x4 patches.
"""

from __future__ import annotations

import re
from dataclasses import fields

from vitkit.model.resnet_stem import stem_channels, stem_parameters, stem_stride
from vitkit.model.vit import ViT, ViTConfig

# Paper table 1 (plus Ti and S from DeiT / AugReg): size -> (width, depth, mlp_dim, heads).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}

# The hybrids' ResNets by their four stages (units per stage); "R" is the root block alone.
STEMS: dict[str, tuple[int, ...]] = {
    "R": (),
    "R26": (2, 2, 2, 2),
    "R50": (3, 4, 6, 3),
}

_NAME = re.compile(r"^(?:(?P<stem>[A-Za-z]+\d*)\+)?(?:vit[-_]?)?(?P<size>[A-Za-z]+)/(?P<patch>\d+)$", re.IGNORECASE)
_OVERRIDABLE = tuple(f.name for f in fields(ViTConfig) if f.name not in ("name", "patch_size", "stem_layers"))


def stem_forms(stem: str) -> list[tuple[int, ...]]:
    """The layouts a stem of STEMS takes, largest stride first: its four stages (stride 32) and the paper's
    three-stage form with stage 4's units in stage 3 (stride 16); the root block alone for "R" (stride 4)."""
    stages = STEMS[stem]
    if not stages:
        return [()]
    return [stages, stages[:2] + (stages[2] + stages[3],)]


def stem_name(layers: tuple[int, ...]) -> str | None:
    """The STEMS name of a ResNet layout (in any of its forms), or None for a layout no name gives."""
    return next((stem for stem in STEMS if tuple(layers) in stem_forms(stem)), None)


def decode_variant(name: str) -> dict:
    """"B/16" (or "ViT-B/16") -> {"width": 768, "depth": 12, "mlp_dim": 3072, "heads": 12, "patch_size": 16,
    "stem_layers": None, "name": "B/16"}; "R50+B/16" (or "R50+ViT-B/16") -> the same with "patch_size": 1,
    "stem_layers": (3, 4, 9). See the module docstring for the hybrids' names."""
    match = _NAME.match(name.strip()) if isinstance(name, str) else None
    sizes = {k.lower(): k for k in SIZES}
    if not match or match["size"].lower() not in sizes:
        raise ValueError(
            f"unknown model name {name!r}: use '<size>/<patch>' with size one of {list(SIZES)}, "
            f"e.g. 'B/16', 'Ti/16', 'S/32', or a hybrid '<stem>+<size>/<total stride>' with stem one of "
            f"{list(STEMS)}, e.g. 'R50+B/16'"
        )
    size = sizes[match["size"].lower()]
    stride = int(match["patch"])
    if stride < 1:
        raise ValueError(f"patch size in {name!r} must be positive")
    width, depth, mlp_dim, heads = SIZES[size]
    dims = {"width": width, "depth": depth, "mlp_dim": mlp_dim, "heads": heads}
    if match["stem"] is None:
        return {**dims, "patch_size": stride, "stem_layers": None, "name": f"{size}/{stride}"}
    stems = {k.lower(): k for k in STEMS}
    if match["stem"].lower() not in stems:
        raise ValueError(f"unknown ResNet stem {match['stem']!r} in the model name {name!r}: the hybrids' stems are "
                         f"{list(STEMS)} (e.g. 'R50+B/16', 'R26+S/32', 'R+Ti/32')")
    stem = stems[match["stem"].lower()]
    forms = stem_forms(stem)
    for layers in forms:
        if stride % stem_stride(layers) == 0:
            return {**dims, "patch_size": stride // stem_stride(layers), "stem_layers": layers,
                    "name": f"{stem}+{size}/{stride}"}
    strides = " or ".join(str(stem_stride(layers)) for layers in reversed(forms))
    raise ValueError(f"{name!r}: the number after the slash is the total stride (pixels per token), the {stem} "
                     f"ResNet's stride times the patch size, so it must be a multiple of {strides}, got {stride}")


def model_config(name: str, **overrides) -> ViTConfig:
    """The ViTConfig of a variant, with any field overridden (img_size, num_classes, width, ...)."""
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; the options are {list(_OVERRIDABLE)}")
    dims = decode_variant(name)
    if "width" in overrides and "heads" not in overrides and overrides["width"] % dims["heads"]:
        raise ValueError(f"width {overrides['width']} is not divisible by the {dims['heads']} heads of {name}; "
                         "give heads too")
    return ViTConfig(**{**dims, **overrides})


def create_model(name: str, **overrides) -> ViT:
    """Build a randomly initialised ViT: `create_model("B/16", num_classes=10, img_size=384)`."""
    return ViT(model_config(name, **overrides))


def count_parameters(cfg: ViTConfig) -> int:
    """Parameters of a ViT with this config, computed from the dimensions alone (no allocation)."""
    d, m = cfg.width, cfg.mlp_dim
    gh, gw = cfg.grid_size
    if cfg.stem_layers is None:
        embed = cfg.in_chans * cfg.patch_size**2 * d + d
    else:  # the ResNet, then the projection of its feature map's patches
        embed = (stem_parameters(cfg.stem_layers, cfg.in_chans)
                 + stem_channels(cfg.stem_layers) * cfg.patch_size**2 * d + d)
    positions = {"learned": (cfg.num_prefix_tokens + gh * gw) * d, "learned_2d": (gh + gw) * (d // 2),
                 "relative": cfg.depth * cfg.heads * (2 * gh - 1) * (2 * gw - 1)}.get(cfg.pos_embed, 0)
    tokens = positions + cfg.num_prefix_tokens * d  # position tables + class token
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    final_norm = 2 * d
    rep = cfg.representation_size
    pre_logits = (d * rep + rep) if rep else 0
    head = (cfg.num_classes * (rep or d) + cfg.num_classes) if cfg.num_classes else 0
    return embed + tokens + cfg.depth * block + final_norm + pre_logits + head
