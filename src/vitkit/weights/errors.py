"""The one error type of weight files and conversions."""

from __future__ import annotations


class WeightsError(ValueError):
    """A weights file or state dict that vitkit cannot use: the message says which, why, and what to do."""
