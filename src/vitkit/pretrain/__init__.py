"""Self-supervised pretraining objectives: masked patch prediction (the paper's appendix B.1.2)."""

from vitkit.pretrain.mpp import (
    KEPT,
    MASKED,
    REPLACED,
    TARGETS,
    UNTOUCHED,
    Corruption,
    MaskedPatchPrediction,
    MPPOutput,
    colour_targets,
    corrupt_patches,
    corrupted_per_image,
    downsized_targets,
    masked_loss,
    pixel_targets,
)

__all__ = [
    "KEPT", "MASKED", "REPLACED", "TARGETS", "UNTOUCHED", "Corruption", "MaskedPatchPrediction", "MPPOutput",
    "colour_targets", "corrupt_patches", "corrupted_per_image", "downsized_targets", "masked_loss", "pixel_targets",
]
