"""Suite-wide set-up: what vitkit measures about the machine (vitkit.fastest_mode's cache) goes to a temporary
directory, not the user's ~/.cache, for the tests and the processes they start."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    previous = os.environ.get("VITKIT_CACHE_DIR")
    os.environ["VITKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("vitkit-cache"))
    yield
    if previous is None:
        os.environ.pop("VITKIT_CACHE_DIR", None)
    else:
        os.environ["VITKIT_CACHE_DIR"] = previous
