"""`vitkit serve` as a real process on a free loopback port, for the load benchmark and the tests that talk to it
over HTTP."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

VITKIT = Path(sys.executable).with_name("vitkit")


class ServerDidNotStart(RuntimeError):
    """`vitkit serve` exited, or did not answer /healthz in time; the message holds its output or the wait."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(weights: Path, *args: str, startup_s: float = 60.0) -> Iterator[str]:
    """The base URL of `vitkit serve --weights WEIGHTS ARGS` once /healthz answers; stopped on leaving."""
    port = free_port()
    process = subprocess.Popen([str(VITKIT), "serve", "--weights", str(weights), "--port", str(port),
                                "--log_level", "warning", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise ServerDidNotStart(f"vitkit serve exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerDidNotStart(f"vitkit serve did not answer /healthz within {startup_s} s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
