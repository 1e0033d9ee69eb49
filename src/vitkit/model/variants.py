"""Variant names ("B/16") decoded to model dimensions: one table, no per-size functions."""

from __future__ import annotations

import re
from dataclasses import fields

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

_NAME = re.compile(r"^(?:vit[-_]?)?(?P<size>[A-Za-z]+)/(?P<patch>\d+)$", re.IGNORECASE)
_OVERRIDABLE = tuple(f.name for f in fields(ViTConfig) if f.name not in ("name", "patch_size"))


def decode_variant(name: str) -> dict:
    """"B/16" (or "ViT-B/16") -> {"width": 768, "depth": 12, "mlp_dim": 3072, "heads": 12, "patch_size": 16}."""
    match = _NAME.match(name.strip()) if isinstance(name, str) else None
    sizes = {k.lower(): k for k in SIZES}
    if not match or match["size"].lower() not in sizes:
        raise ValueError(
            f"unknown model name {name!r}: use '<size>/<patch>' with size one of {list(SIZES)}, "
            f"e.g. 'B/16', 'Ti/16', 'S/32'"
        )
    size = sizes[match["size"].lower()]
    patch = int(match["patch"])
    if patch < 1:
        raise ValueError(f"patch size in {name!r} must be positive")
    width, depth, mlp_dim, heads = SIZES[size]
    return {"width": width, "depth": depth, "mlp_dim": mlp_dim, "heads": heads, "patch_size": patch,
            "name": f"{size}/{patch}"}


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
    embed = cfg.in_chans * cfg.patch_size**2 * d + d
    positions = {"learned": (cfg.num_prefix_tokens + gh * gw) * d, "learned_2d": (gh + gw) * (d // 2),
                 "relative": cfg.depth * cfg.heads * (2 * gh - 1) * (2 * gw - 1)}.get(cfg.pos_embed, 0)
    tokens = positions + cfg.num_prefix_tokens * d  # position tables + class token
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    final_norm = 2 * d
    rep = cfg.representation_size
    pre_logits = (d * rep + rep) if rep else 0
    head = (cfg.num_classes * (rep or d) + cfg.num_classes) if cfg.num_classes else 0
    return embed + tokens + cfg.depth * block + final_norm + pre_logits + head
