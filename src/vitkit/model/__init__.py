"""The ViT model family (plain and hybrid), and the surgery that adapts a built model to another task or input."""

from vitkit.model.pos_embed import POS_EMBEDS, resample_pos_embed, resample_position_state
from vitkit.model.surgery import adapt_for_finetune, adapt_input_channels, freeze_backbone
from vitkit.model.variants import SIZES, STEMS, count_parameters, create_model, decode_variant, model_config
from vitkit.model.vit import Intermediates, ViT, ViTConfig, check_image_size

__all__ = [
    "SIZES", "STEMS", "Intermediates", "ViT", "ViTConfig", "adapt_for_finetune", "adapt_input_channels",
    "check_image_size", "count_parameters", "create_model", "decode_variant", "freeze_backbone", "model_config",
    "POS_EMBEDS", "resample_pos_embed", "resample_position_state",
]
