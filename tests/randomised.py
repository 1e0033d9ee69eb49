"""Reference models with every parameter randomised, shared by the weight tests."""

from __future__ import annotations

import torch


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter to noise of a sensible scale: no zero heads or biases that would hide a dropped tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                is_scale = ("norm" in name or "layernorm" in name) and name.endswith("weight")
                p.copy_(1 + 0.2 * noise if is_scale else 0.2 * noise)
            elif p.ndim == 3:  # class token, position embedding
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)
    return model
