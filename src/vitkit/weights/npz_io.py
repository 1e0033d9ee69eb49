"""Reading and writing .npz archives (the official JAX/Flax checkpoints) without trusting their headers.

np.load allocates whatever shape an .npy header declares before reading a byte of data, so every
member's header is checked against the size the zip directory records for it first: a file that
claims a terabyte array but holds a few bytes is refused before anything is allocated.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from vitkit.atomic import atomic_path
from vitkit.weights.errors import WeightsError

_MAX_HEADER = 10_000  # numpy's own default limit on an .npy header's length
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data more than about 1032 times


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of an .npz archive as CPU tensors, keyed by member name (without ".npy")."""
    _check_members(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise WeightsError(f"{path} holds a single .npy array, not an .npz archive of named arrays: "
                           "save it with np.savez(path, name=array, ...)")
    tensors = {}
    with archive:
        for name in archive.files:
            try:
                array = archive[name]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                raise _unreadable(path, err, member=name) from err
            tensors[name] = _to_tensor(path, name, array)
    return tensors


def write_npz(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write named arrays to an uncompressed .npz, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # A file object, not a name: np.savez would append ".npz" to the temporary name.
        np.savez(f, **arrays)
    return path


def _check_members(path: Path) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise _unreadable(path, err) from err
    file_size = path.stat().st_size
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if info.header_offset + info.compress_size > file_size:
                raise WeightsError(f"{path} is truncated: member {info.filename!r} ends past the end of the file; "
                                   "copy the file again from its source")
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise _lying(path, info.filename, "its stored and declared sizes differ")
            if info.file_size > max(info.compress_size, 1) * _MAX_DEFLATE_RATIO:
                raise _lying(path, info.filename, f"it claims to expand {info.compress_size} bytes to {info.file_size}")
            try:
                with archive.open(info) as member:
                    _check_header(path, info, member)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
                raise _unreadable(path, err, member=info.filename) from err


def _check_header(path: Path, info: zipfile.ZipInfo, member) -> None:
    name = info.filename
    try:
        major, _ = np.lib.format.read_magic(member)
        if major == 1:
            shape, _, dtype = np.lib.format.read_array_header_1_0(member, max_header_size=_MAX_HEADER)
        elif major in (2, 3):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"unknown .npy format version {major}")
    except ValueError as err:
        raise WeightsError(f"{path}: member {name!r} is not a valid .npy array ({err}); "
                           "an .npz of weights holds only numeric arrays") from err
    if dtype.hasobject:
        raise WeightsError(f"{path}: member {name!r} is an array of Python objects (dtype {dtype}), which would "
                           "need unpickling to read; vitkit reads numeric arrays only: re-save the weights as "
                           "float arrays")
    data_bytes = math.prod(shape) * dtype.itemsize
    header_bytes = member.tell()
    if header_bytes + data_bytes != info.file_size:
        raise _lying(path, name, f"its header declares shape {shape} of {dtype} ({data_bytes} bytes) but the member "
                                 f"holds {info.file_size - header_bytes} bytes of data")


def _to_tensor(path: Path, name: str, array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "fiub":
        raise WeightsError(f"{path}: array {name!r} has dtype {array.dtype}, not a number type that vitkit loads; "
                           "convert it to float32")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError as err:
        raise WeightsError(f"{path}: array {name!r} has dtype {array.dtype}, which torch cannot hold; "
                           "convert it to float32") from err


def _unreadable(path: Path, err: BaseException, member: str | None = None) -> WeightsError:
    where = f" (member {member!r})" if member else ""
    return WeightsError(f"{path} is not a readable .npz archive{where}: {err}. It may be truncated or corrupt: "
                        "copy it again from its source")


def _lying(path: Path, member: str, what: str) -> WeightsError:
    return WeightsError(f"{path}: member {member!r} is inconsistent: {what}. The file is corrupt or crafted; "
                        "refusing to read it")
