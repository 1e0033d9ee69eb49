"""Weights in and out: vitkit's .safetensors files, and timm, HF transformers and official .npz layouts (the
paper's hybrids too, from timm and .npz).

`save_weights` / `load_model` round-trip a model with its config. `load_weights` loads any supported
file or state dict into a built model, converting layouts and resampling the position embedding.
`export_npz` writes the official (Flax) layout that the original code and timm's npz loader read.
"""

from vitkit.weights.convert import Converted, to_vitkit
from vitkit.weights.errors import WeightsError
from vitkit.weights.files import read_weights, unwrap_state_dict
from vitkit.weights.formats import FORMATS, detect_format
from vitkit.weights.hf import from_hf
from vitkit.weights.infer import infer_config
from vitkit.weights.load import LoadReport, load_model, load_pretrained, load_weights
from vitkit.weights.official import export_npz, from_official, to_official
from vitkit.weights.safetensors_io import CONFIG_KEY, PREPROCESS_KEY, save_weights
from vitkit.weights.timm import from_timm

__all__ = [
    "CONFIG_KEY", "FORMATS", "PREPROCESS_KEY", "Converted", "LoadReport", "WeightsError", "detect_format",
    "export_npz", "from_hf", "from_official", "from_timm", "infer_config", "load_model", "load_pretrained",
    "load_weights", "read_weights", "save_weights", "to_official", "to_vitkit", "unwrap_state_dict",
]
