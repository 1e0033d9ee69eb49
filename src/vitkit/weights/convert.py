"""Any supported state dict -> vitkit names and layouts, with what the source said about itself."""

from __future__ import annotations

from typing import NamedTuple

import torch

from vitkit.weights.formats import detect_format
from vitkit.weights.hf import from_hf
from vitkit.weights.official import from_official, official_heads
from vitkit.weights.timm import from_timm


class Converted(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    """vitkit names and layouts."""
    format: str
    """What it was converted from: "vitkit", "timm", "hf" or "official"."""
    heads: int | None
    """Attention heads when the source records them (official kernels keep heads apart); else None."""


def to_vitkit(state_dict: dict[str, torch.Tensor]) -> Converted:
    """Convert a state dict of any supported layout (detected from its keys) to vitkit's."""
    fmt = detect_format(state_dict)
    if fmt == "official":
        return Converted(from_official(state_dict), fmt, official_heads(state_dict))
    if fmt == "hf":
        return Converted(from_hf(state_dict), fmt, None)
    # vitkit and timm share names; from_timm also fills what timm may omit (a qkv bias) and refuses what
    # vitkit lacks.
    return Converted(from_timm(state_dict), fmt, None)
