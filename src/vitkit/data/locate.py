"""Where dataset files are looked for, in order.

With `data_dir` given, only there: a user who names a directory means that one, and data found
elsewhere instead would hide the mistake. Otherwise: $VITKIT_DATA_DIR, the system's directories
for the dataset (a Debian package), then vitkit's cache ~/.cache/vitkit (where --download puts
files). Each base directory is tried as it is and with the dataset's usual subdirectories.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

DATA_DIR_ENV = "VITKIT_DATA_DIR"


def cache_root() -> Path:
    """vitkit's download and cache directory, ~/.cache/vitkit."""
    return Path.home() / ".cache" / "vitkit"


def search_dirs(data_dir: str | os.PathLike | None, subdirs: Sequence[str],
                system_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Candidate directories in search order, without duplicates."""
    def with_subdirs(base: Path) -> list[Path]:
        return [base, *(base / sub for sub in subdirs)]

    if data_dir is not None:
        candidates = with_subdirs(Path(data_dir).expanduser())
    else:
        candidates = []
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        if env:
            candidates += with_subdirs(Path(env).expanduser())
        candidates += [Path(d) for d in system_dirs]
        candidates += with_subdirs(cache_root())
    unique = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def download_root(data_dir: str | os.PathLike | None) -> Path:
    """Where --download puts files: `data_dir` if given, else the cache."""
    return Path(data_dir).expanduser() if data_dir is not None else cache_root()
