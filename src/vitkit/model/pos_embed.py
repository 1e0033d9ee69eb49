"""Resampling learned position embeddings to another patch grid.

Used when an image of a new size goes through the model (on the fly), when fine-tuning at a
higher resolution (once, at load), and when foreign weights were trained at another grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INTERPOLATION_MODES = ("bicubic", "bilinear")


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + gh*gw, D) position embedding from `old_grid` to `new_grid`.

    The prefix tokens (the class token's embedding) have no place on the grid and are kept as
    they are. The grid part is interpolated in 2D, in float32, and returned in the input dtype.
    At the same grid the input is returned unchanged (the very same tensor, bit for bit).
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"position-embedding interpolation {mode!r} is not one of {INTERPOLATION_MODES}")
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    expected = num_prefix_tokens + old_h * old_w
    if pos_embed.ndim != 3 or pos_embed.shape[1] != expected:
        raise ValueError(
            f"position embedding of shape {tuple(pos_embed.shape)} does not fit a {old_h}x{old_w} grid "
            f"with {num_prefix_tokens} prefix token(s): expected (1, {expected}, D)"
        )
    # Exported with a dynamic image size (torch.export, as `vitkit export --dynamic` does), the new grid is symbolic:
    # comparing it with the old one would make the exporter fix the graph to the traced size, so the exported graph
    # always resamples. That is exact at the same grid: the kernels weigh the sample itself 1 and its neighbours 0.
    if _known(new_grid) and (old_h, old_w) == (new_h, new_w):
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=(new_h, new_w), mode=mode, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)  # (1, N', D)
    return torch.cat([prefix, grid], dim=1)


def _known(grid: tuple[int, int]) -> bool:
    """Whether `grid` holds plain sizes, not the symbolic ones of a dynamic-shape export."""
    return not (torch.compiler.is_exporting() and any(isinstance(side, torch.SymInt) for side in grid))
