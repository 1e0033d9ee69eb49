"""The errors the data package raises: each names the file or places involved and what to do."""

from __future__ import annotations

import os
from collections.abc import Sequence


class BadImageError(ValueError):
    """An image file that cannot be decoded safely; `path` and `reason` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(str(path), reason)  # both in args, so the error survives pickling (loader workers)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read image {self.path}: {self.reason}"


class DataFileError(ValueError):
    """A dataset file (IDX, CIFAR batch) that exists but is corrupt, truncated or not what it claims."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"bad dataset file {self.path}: {self.reason}"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset whose files are in none of the places searched; `places` lists them in search order."""

    def __init__(self, name: str, places: Sequence[str], hint: str):
        self.name = name
        self.places = [str(p) for p in places]
        self.hint = hint
        super().__init__(str(self))  # one argument: OSError would read three as (errno, strerror, filename)

    def __reduce__(self):
        return type(self), (self.name, self.places, self.hint)

    def __str__(self) -> str:
        looked = "".join(f"\n  - {place}" for place in self.places) or "\n  (nowhere)"
        return f"dataset {self.name!r} not found. Looked in:{looked}\n{self.hint}"
