"""The ViT model family."""

from vitkit.model.pos_embed import resample_pos_embed
from vitkit.model.variants import SIZES, count_parameters, create_model, decode_variant, model_config
from vitkit.model.vit import Intermediates, ViT, ViTConfig

__all__ = [
    "SIZES", "Intermediates", "ViT", "ViTConfig", "count_parameters", "create_model", "decode_variant",
    "model_config", "resample_pos_embed",
]
