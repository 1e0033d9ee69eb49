"""Inspecting a ViT as in section 4.5 of the paper: patch-embedding filters, position-embedding similarity,
mean attention distance, attention rollout (analysis.py: arrays; figures.py: PNGs; report.py: both, on disk)."""

from vitkit.inspect.analysis import (
    HEAD_FUSIONS,
    SOURCE_CLASS_TOKEN,
    SOURCE_PATCH_MEAN,
    Rollout,
    attention_distance_from_maps,
    attention_rollout,
    capture_attention,
    check_class_token,
    check_images,
    embedding_filters,
    last_layer_attention,
    mean_attention_distance,
    patch_centres,
    pos_embed_grid_correlation,
    pos_embed_similarity,
    rollout_from_maps,
    upsample_map,
)
from vitkit.inspect.figures import (
    display_image,
    overlay_image,
    plot_attention_distance,
    plot_embedding_filters,
    plot_pos_embed_similarity,
    plot_prediction_explained,
    plot_rollout,
)
from vitkit.inspect.report import ALL, ANALYSES, write_inspection

__all__ = [
    "ALL", "ANALYSES", "HEAD_FUSIONS", "SOURCE_CLASS_TOKEN", "SOURCE_PATCH_MEAN", "Rollout",
    "attention_distance_from_maps", "attention_rollout", "capture_attention", "check_class_token", "check_images",
    "embedding_filters", "last_layer_attention", "mean_attention_distance", "patch_centres",
    "pos_embed_grid_correlation", "pos_embed_similarity", "rollout_from_maps", "upsample_map", "display_image",
    "overlay_image", "plot_attention_distance", "plot_embedding_filters",
    "plot_pos_embed_similarity", "plot_prediction_explained", "plot_rollout", "write_inspection",
]
