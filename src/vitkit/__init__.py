"""vitkit: Vision Transformers (Dosovitskiy et al., 2020) for PyTorch."""

from vitkit.model import (ViT, ViTConfig, adapt_for_finetune, count_parameters, create_model, decode_variant,
                          resample_pos_embed)
from vitkit.weights import (
    LoadReport,
    WeightsError,
    detect_format,
    export_npz,
    infer_config,
    load_model,
    load_pretrained,
    load_weights,
    read_weights,
    save_weights,
)

__version__ = "0.1.0"

__all__ = [
    "ViT", "ViTConfig", "adapt_for_finetune", "count_parameters", "create_model", "decode_variant",
    "resample_pos_embed", "LoadReport", "WeightsError", "detect_format", "export_npz", "infer_config", "load_model",
    "load_pretrained", "load_weights", "read_weights", "save_weights",
]
