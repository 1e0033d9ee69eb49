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


# ---- the other kinds of position information (appendix D.4) ----

POS_EMBEDS = ("learned", "none", "learned_2d", "sincos_2d", "relative")
"""learned: one learned vector per token (the paper's default, 1D). none: no position information. learned_2d: a
learned row table and column table of width D/2 each, concatenated per patch. sincos_2d: the same layout, fixed
sines and cosines. relative: a learned bias per 2D offset between two patches and head, added to every block's
attention logits."""

SINCOS_TEMPERATURE = 10000.0


def sincos_2d_table(grid: tuple[int, int], width: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, gh * gw, width) fixed 2D sine-cosine embedding, patches in row-major order.

    The first width/2 channels encode the patch's row r, the last width/2 its column c, each as
    [sin(p w_0), ..., sin(p w_{K-1}), cos(p w_0), ..., cos(p w_{K-1})] for p = r or c, with K = width / 4 and
    w_k = 10000^(-k / K). Defined at every grid, so it needs no resampling.
    """
    if width % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = SINCOS_TEMPERATURE ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (K,)
    rows = torch.arange(grid[0], dtype=torch.float32, device=device)[:, None] * omega  # (gh, K)
    cols = torch.arange(grid[1], dtype=torch.float32, device=device)[:, None] * omega  # (gw, K)
    return concat_2d(torch.cat([rows.sin(), rows.cos()], dim=1), torch.cat([cols.sin(), cols.cos()], dim=1))


def concat_2d(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(gh, C) row entries and (gw, C') column entries -> (1, gh * gw, C + C'): patch (r, c) gets [rows[r], cols[c]]."""
    gh, gw = rows.shape[0], cols.shape[0]
    grid = torch.cat([rows[:, None, :].expand(gh, gw, -1), cols[None, :, :].expand(gh, gw, -1)], dim=-1)
    return grid.reshape(1, gh * gw, -1)  # (1, N, C + C')


def resample_1d(table: torch.Tensor, length: int, mode: str = "bicubic") -> torch.Tensor:
    """(1, n, C) table of positions along one axis -> (1, length, C), interpolated with the end points fixed.

    align_corners=True puts the first and last entries on the first and last positions, so a table taken from n
    to k(n - 1) + 1 positions and back is the original, bit for bit up to float rounding.
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"position-embedding interpolation {mode!r} is not one of {INTERPOLATION_MODES}")
    if _known((length, length)) and table.shape[1] == length:
        return table
    x = table.float().permute(0, 2, 1).unsqueeze(2)  # (1, C, 1, n)
    x = F.interpolate(x, size=(1, length), mode=mode, align_corners=True)  # (1, C, 1, length)
    return x.squeeze(2).permute(0, 2, 1).to(table.dtype)  # (1, length, C)


def relative_table_size(grid: tuple[int, int]) -> int:
    """Entries of a relative-position table for a (gh, gw) grid: one per offset (dr, dc), |dr| < gh, |dc| < gw."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1)


def resample_relative_table(table: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                            mode: str = "bicubic") -> torch.Tensor:
    """((2gh - 1)(2gw - 1), h) per-offset biases of `old_grid` -> those of `new_grid`.

    The table is an image over the offset plane (dr, dc), interpolated with its corners fixed (align_corners), so
    offset 0 stays at the centre and the largest offsets at the edges.
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"position-embedding interpolation {mode!r} is not one of {INTERPOLATION_MODES}")
    if table.ndim != 2 or table.shape[0] != relative_table_size(old_grid):
        raise ValueError(f"relative position table of shape {tuple(table.shape)} does not fit a "
                         f"{old_grid[0]}x{old_grid[1]} grid: expected ({relative_table_size(old_grid)}, heads)")
    if _known(new_grid) and tuple(new_grid) == tuple(old_grid):
        return table
    old_h, old_w = 2 * old_grid[0] - 1, 2 * old_grid[1] - 1
    plane = table.float().T.reshape(1, -1, old_h, old_w)  # (1, h, 2gh - 1, 2gw - 1)
    plane = F.interpolate(plane, size=(2 * new_grid[0] - 1, 2 * new_grid[1] - 1), mode=mode, align_corners=True)
    return plane.reshape(table.shape[1], -1).T.to(table.dtype)  # (M', h)


def relative_index(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(N, N) index into a relative-position table: entry [i, j] is the row of the offset from patch j to patch i."""
    gh, gw = grid
    # Broadcasts, not division or repeat_interleave: those export wrongly or not at all with a dynamic grid.
    rows = torch.arange(gh, device=device)[:, None].expand(gh, gw).reshape(-1)  # (N,) row of each patch
    cols = torch.arange(gw, device=device)[None, :].expand(gh, gw).reshape(-1)  # (N,) column of each patch
    dr = rows[:, None] - rows[None, :] + gh - 1  # (N, N) in [0, 2gh - 2]
    dc = cols[:, None] - cols[None, :] + gw - 1  # (N, N) in [0, 2gw - 2]
    return dr * (2 * gw - 1) + dc


def resample_position_state(state: dict[str, torch.Tensor], kind: str, new_grid: tuple[int, int],
                            old_grid: tuple[int, int], num_prefix_tokens: int, mode: str) -> dict[str, torch.Tensor]:
    """A model state dict whose position tensors of kind `kind` are resampled from `old_grid` to `new_grid`."""
    state = dict(state)
    if kind == "learned" and "pos_embed" in state:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], new_grid, old_grid, num_prefix_tokens, mode)
    elif kind == "learned_2d":
        for key, length in (("pos_embed_row", new_grid[0]), ("pos_embed_col", new_grid[1])):
            if key in state:
                state[key] = resample_1d(state[key], length, mode)
    elif kind == "relative":
        for key in [k for k in state if k.endswith("relative_position_bias_table")]:
            state[key] = resample_relative_table(state[key], new_grid, old_grid, mode)
    return state
