"""The options of `vitkit serve`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vitkit.inference import InferenceOptions

DEFAULT_MAX_PIXELS = 16_000_000
"""Uploads with more pixels are refused before decoding: 16 megapixels decode to 48 MB of RGB."""


@dataclass
class ServeOptions(InferenceOptions):
    """Serve saved weights over HTTP: POST /predict, POST /explain, GET /healthz, and a page at /."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on."""
    topk: int = 5
    """Classes returned per image unless the request asks otherwise (?topk=K)."""
    max_batch: int = 16
    """Largest batch that concurrent requests are gathered into."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for others to join it, in milliseconds."""
    queue_size: int = 256
    """Requests that may wait for the model; more are answered 503 (busy, retry)."""
    max_upload_mb: float = 10.0
    """Largest accepted request body, in megabytes; larger uploads are answered 413."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are refused (422) before their pixels are decoded: a decompression-bomb guard."""
    timeout_s: float = 10.0
    """Each request's time limit in seconds, reading the upload included (408 while reading, else 504)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn's log level (info logs every request)."""

    def check(self) -> None:
        """A ValueError naming the first option out of range."""
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}")
        for name in ("topk", "max_batch", "queue_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_upload_mb", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max_wait_ms must be 0 or more, got {self.max_wait_ms}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)
