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

_VITKIT_KEY = re.compile(
    r"(patch_embed\.proj|norm|pre_logits\.fc|head"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))\.(weight|bias)"
    r"|cls_token|pos_embed"
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


def official_prefix(state_dict: Mapping[str, object]) -> str | None:
    return next((p for p in OFFICIAL_PREFIXES if f"{p}embedding/kernel" in state_dict), None)


def hf_prefix(state_dict: Mapping[str, object]) -> str | None:
    return next((p for p in HF_PREFIXES if f"{p}embeddings.patch_embeddings.projection.weight" in state_dict), None)
