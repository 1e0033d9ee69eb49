"""Reading plain-data pickles (the CIFAR "python version" batches) without running code from the file.

A pickle is a program: `pickle.load` calls whatever callable the file names, so a crafted file
runs arbitrary code (`os.system`, `exec`, ...) the moment it is loaded. The CIFAR batches hold only
dicts, lists, strings, bytes, ints and numpy arrays, so this unpickler resolves exactly the
globals needed to rebuild those and refuses every other one before anything is called.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from vitkit.data.errors import DataFileError

try:  # numpy >= 2 moved the internals; files written by either name the module they were made with
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call (as `_codecs.encode`) to rebuild a bytes object."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("builtins", "dict"): dict, ("builtins", "list"): list, ("builtins", "bytes"): bytes,
    ("builtins", "str"): str, ("builtins", "int"): int,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    **{(module, "_reconstruct"): _reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
}


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(module, name)
        self.module, self.name = module, name


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # the Python 2 name, in protocol 0-2 pickles
            module = "builtins"
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def load_data_pickle(path: str | os.PathLike, encoding: str = "latin1"):
    """Unpickle the file at `path` allowing only plain data (dict, list, str, bytes, int, numpy arrays).

    `encoding` decodes Python 2 strings (the CIFAR files were written by Python 2). Raises
    DataFileError naming the file when it asks for anything else, or is not a readable pickle.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        try:
            return _DataOnlyUnpickler(file, encoding=encoding).load()
        except RefusedGlobal as refused:
            raise DataFileError(path, f"refused to unpickle: the file asks for {refused.module}.{refused.name}, "
                                      "which plain data never needs (a crafted file could run code this way); "
                                      "it was not called") from None
        except Exception as error:  # truncated or garbled: UnpicklingError, EOFError, ValueError, ...
            raise DataFileError(path, f"not a readable pickle ({type(error).__name__}: {error})") from error
