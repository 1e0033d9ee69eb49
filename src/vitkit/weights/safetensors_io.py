"""vitkit's own weight files: .safetensors with the model config in the header metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vitkit.atomic import atomic_path
from vitkit.weights.errors import WeightsError

CONFIG_KEY = "vitkit_config"
"""Metadata key holding the model's ViTConfig as JSON; `load_model` rebuilds the model from it."""

PREPROCESS_KEY = "vitkit_preprocess"
"""Metadata key holding, as JSON, how `vitkit train` fed the images: dataset, mean, std and class names."""


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write `model`'s weights to a .safetensors file, atomically, with its config in the metadata.

    `metadata` adds str -> str entries (e.g. "vitkit_preprocess": JSON of the normalisation).
    Returns the path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"vitkit writes weights as .safetensors; got the file name {path.name!r}")
    header = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata must map str to str (JSON-encode other values); got {key!r}: {type(value).__name__}"
            )
        header[key] = value
    if CONFIG_KEY in header:
        raise ValueError(f"metadata key {CONFIG_KEY!r} is reserved: save_weights stores model.cfg there itself")
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        header[CONFIG_KEY] = json.dumps(cfg.to_dict(), sort_keys=True)
    # safetensors refuses tensors that share storage (and views): give each its own contiguous copy.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(
            f"{path} is not a readable .safetensors file ({err}); it may be truncated or corrupt: "
            "write it again or copy it again from its source"
        ) from err
    return tensors, metadata
