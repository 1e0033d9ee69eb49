"""A validating reader for the IDX format of MNIST and Fashion-MNIST (gzip-compressed or raw).

An IDX file is a 4-byte magic number, one big-endian uint32 per dimension, then the values in
row-major order, big-endian. The magic number is two zero bytes, a type code (0x08 uint8,
0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64) and the number of dimensions.
Every part is checked: the zero bytes, the type code, the dimensions, and that the data holds
exactly as many bytes as the dimensions say, no fewer (truncated) and no more (trailing bytes).
Compression is recognised by the gzip magic bytes, not by the file name.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from vitkit.data.errors import DataFileError

IDX_TYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 24


def _read_exact(stream, count: int, path: str, what: str) -> bytes:
    """`count` bytes from the stream, in chunks (a corrupt header must not trigger one huge allocation)."""
    parts, remaining = [], count
    while remaining > 0:
        part = stream.read(min(remaining, _CHUNK))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    data = b"".join(parts)
    if len(data) < count:
        raise DataFileError(path, f"truncated: {what} needs {count:,} bytes but only {len(data):,} are there")
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file at `path`, in native byte order.

    Raises DataFileError naming the file when it is not a well-formed IDX file.
    """
    path = os.fspath(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            return _parse(stream, path)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        if isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        raise DataFileError(path, f"corrupt gzip data ({type(error).__name__}: {error})") from error


def _parse(stream, path: str) -> np.ndarray:
    magic = _read_exact(stream, 4, path, "the magic number")
    if magic[0] != 0 or magic[1] != 0:
        raise DataFileError(path, f"not an IDX file: the magic number {magic.hex()} does not start with two zero bytes")
    if magic[2] not in IDX_TYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_TYPES)
        raise DataFileError(path, f"unknown IDX type code 0x{magic[2]:02X} (known: {known})")
    dtype, ndim = IDX_TYPES[magic[2]], magic[3]
    if ndim == 0:
        raise DataFileError(path, "the IDX header declares zero dimensions")
    dims = tuple(int(d) for d in np.frombuffer(_read_exact(stream, 4 * ndim, path, "the dimensions"), dtype=">u4"))
    count = math.prod(dims) * dtype.itemsize
    data = _read_exact(stream, count, path, f"an array of shape {dims} of {dtype.name}")
    if stream.read(1):
        raise DataFileError(path, f"more bytes than the header's shape {dims} of {dtype.name} accounts for")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))
