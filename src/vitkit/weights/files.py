"""Reading weights files of any supported kind into a state dict, by file suffix."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from vitkit.weights.errors import WeightsError
from vitkit.weights.npz_io import read_npz
from vitkit.weights.safetensors_io import read_safetensors

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
SUFFIXES = (".safetensors", ".npz") + PICKLE_SUFFIXES

# Training checkpoints often wrap the weights: {"state_dict": ...}, {"model": ...}, {"epoch": 3, "model": ...}.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "params")


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a .safetensors, .npz or .pt/.pth/.bin file, tensors on the CPU.

    Keys are as stored (vitkit/timm, HF or official names). Metadata is the safetensors header
    metadata (empty for other kinds). Pickle files are read with torch.load(weights_only=True):
    tensors and plain containers only, never arbitrary objects.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.is_dir():
        raise WeightsError(f"{path} is a directory; give the weights file inside it (e.g. model.safetensors)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, metadata = read_safetensors(path)
    elif suffix == ".npz":
        state, metadata = read_npz(path), {}
    elif suffix in PICKLE_SUFFIXES:
        state, metadata = _read_pickle(path), {}
    else:
        raise WeightsError(f"{path}: unsupported weights file type {path.suffix!r}; vitkit reads {', '.join(SUFFIXES)}")
    if not state:
        raise WeightsError(f"{path} holds no tensors: it is empty or not a weights file")
    return state, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"{path} contains pickled Python objects beyond tensors and plain containers, and was refused "
            f"(loading it could run arbitrary code): {str(err).splitlines()[0]}. If you trust its source, "
            "re-save just the tensors with torch.save(model.state_dict(), path) or as .safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise WeightsError(f"{path} is not a readable PyTorch file ({str(err).splitlines()[0]}); it may be "
                           "truncated or corrupt: write it again or copy it again from its source") from err
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: object, origin: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside common checkpoint wrappers; wrapper prefixes "module." and "_orig_mod." removed."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"{origin} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{origin} is not a state dict: entries {not_tensors[:5]} are not tensors "
                           f"(wrapper keys vitkit unwraps: {list(_WRAPPER_KEYS)})")
    state = {str(k): v for k, v in obj.items()}
    # DistributedDataParallel and torch.compile wrap the model and prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
