"""Changing the channel count of uint8 images: grey <-> RGB."""

from __future__ import annotations

import torch

# ITU-R 601-2 luma in 16-bit fixed point, the weights Pillow's RGB -> L conversion uses.
_LUMA = (19595, 38470, 7471)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (..., 3, H, W) -> grey (..., 1, H, W), rounding as Pillow does."""
    rgb = images.to(torch.int32)
    r, g, b = rgb.unbind(dim=-3)
    grey = (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2] + 0x8000) >> 16
    return grey.unsqueeze(-3).to(torch.uint8)


def convert_channels(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 images (..., C, H, W) with C in {1, 3} converted to `in_chans` channels (1 or 3)."""
    have = images.shape[-3]
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans}")
    if have not in (1, 3):
        raise ValueError(f"cannot convert images with {have} channels: only grey (1) and RGB (3)")
    if have == in_chans:
        return images
    if in_chans == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:]).contiguous()
    return to_grey(images)
