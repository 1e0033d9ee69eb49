"""Telling the layout of a state dict from its keys: vitkit/timm, HF transformers or official (Flax) names."""

from __future__ import annotations

import re
from collections.abc import Mapping

from vitkit.weights.errors import WeightsError

FORMATS = ("vitkit", "timm", "hf", "official")

# The official checkpoints nest their parameters under one of these (classic: none; AugReg: opt/target/;
# big_vision: params/; big_vision image towers of two-tower models: params/img/).
OFFICIAL_PREFIXES = ("", "opt/target/", "params/", "params/img/")
HF_PREFIXES = ("vit.", "")

# A hybrid's ResNet, by timm's names: the root block alone is the backbone itself (`backbone.conv`), else
# `backbone.stem` and `backbone.stages.{i}.blocks.{j}`.
STEM_KEY = re.compile(
    r"patch_embed\.backbone\.(?:(?:stem\.)?(?:conv\.weight|norm\.(?:weight|bias))"
    r"|stages\.(?P<stage>\d+)\.blocks\.(?P<unit>\d+)\."
    r"(?:conv[123]\.weight|norm[123]\.(?:weight|bias)|downsample\.conv\.weight|downsample\.norm\.(?:weight|bias)))"
)

_VITKIT_KEY = re.compile(
    r"(patch_embed\.proj|norm|pre_logits\.fc|head"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))\.(weight|bias)"
    r"|cls_token|pos_embed|" + STEM_KEY.pattern
)


def detect_format(state_dict: Mapping[str, object]) -> str:
    """"vitkit", "timm", "hf" or "official", from the keys alone.

    vitkit and timm share parameter names: "vitkit" when every key is one vitkit has, "timm" when
    some key is timm-only (fc_norm, reg_token, ...), so the converter can say what it cannot map.
    """
    if official_prefix(state_dict) is not None:
        return "official"
    if hf_prefix(state_dict) is not None:
        return "hf"
    if "patch_embed.proj.weight" in state_dict:
        return "vitkit" if all(_VITKIT_KEY.fullmatch(k) for k in state_dict) else "timm"
    keys = list(state_dict)
    shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
    raise WeightsError(
        f"not a Vision Transformer checkpoint that vitkit recognises: it has no patch embedding under any known "
        f"name (saw keys: {shown or 'none'}). vitkit reads vitkit/timm ViT weights ('patch_embed.proj.weight'), "
        "HF transformers ViT ('vit.embeddings.patch_embeddings.projection.weight') and the official .npz "
        "('embedding/kernel')"
    )


def stem_layers_of(state_dict: Mapping[str, object]) -> tuple[int, ...] | None:
    """A hybrid's ResNet layout (units per stage) read off vitkit/timm key names; () for the root block alone, None
    for no ResNet (a plain ViT)."""
    units: dict[int, int] = {}
    root = False
    for key in state_dict:
        match = STEM_KEY.fullmatch(key)
        if match is None:
            continue
        root = True
        if match["stage"] is not None:
            stage = int(match["stage"])
            units[stage] = max(units.get(stage, 0), int(match["unit"]) + 1)
    if not root:
        return None
    if sorted(units) != list(range(len(units))):
        raise WeightsError(f"the hybrid's ResNet has the stages {sorted(units)}, not 0, 1, ...: the weights are "
                           "incomplete")
    return tuple(units[i] for i in range(len(units)))


def official_prefix(state_dict: Mapping[str, object]) -> str | None:
    return next((p for p in OFFICIAL_PREFIXES if f"{p}embedding/kernel" in state_dict), None)


def hf_prefix(state_dict: Mapping[str, object]) -> str | None:
    return next((p for p in HF_PREFIXES if f"{p}embeddings.patch_embeddings.projection.weight" in state_dict), None)
