"""Reading an image size given as one int (square) or (H, W)."""

from __future__ import annotations

from collections.abc import Sequence


def hw(size: int | Sequence[int], what: str = "image_size") -> tuple[int, int]:
    """`size` as (H, W): an int n means (n, n). Both must be positive integers."""
    if isinstance(size, (bool, str, bytes)):
        raise TypeError(f"{what} must be an int or (H, W), got {size!r}")
    if isinstance(size, int):
        size = (size, size)
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an int or a pair (H, W) of ints, got {size!r}") from None
    if height < 1 or width < 1 or tuple(size) != (height, width):
        raise ValueError(f"{what} must be positive whole numbers, got {size!r}")
    return height, width
