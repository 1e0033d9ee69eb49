"""timm VisionTransformer state dicts -> vitkit.

vitkit uses timm's parameter names, so the common case is the identity, hybrids with the paper's ResNet
(vit_tiny_r_s16_p8, vit_small_r26_s32, vit_base_r50_s16, vit_large_r50_s32, ...) included. What differs is what
timm can build and vitkit cannot; those are refused with the reason, rather than silently dropped. One difference
names cannot show: timm's hybrids built with padding_same=False have the same names but PyTorch's symmetric
padding, where vitkit's ResNet pads as TensorFlow's SAME (timm's default, and the official weights').
"""

from __future__ import annotations

import re

import torch

from vitkit.weights.errors import WeightsError
from vitkit.weights.formats import STEM_KEY

# timm-only features, found by a key pattern, with what they are.
_UNSUPPORTED = {
    r"reg_token": "register tokens",
    r"dist_token|head_dist\.": "a distillation token (DeiT)",
    r"blocks\.\d+\.ls[12]\.gamma|blocks\.\d+\.gamma_[12]": "layer scale",
    r"blocks\.\d+\.attn\.[qk]_norm\.": "query/key normalisation",
    r"blocks\.\d+\.(attn|mlp)\.norm\.": "normalisation inside attention or MLP",
    r"norm_pre\.": "a normalisation before the encoder",
    r"attn_pool\.": "attention pooling (MAP head)",
    r"patch_embed\.norm\.": "a normalised patch embedding",
}


def from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer state dict with vitkit names (a new dict; tensors are shared, not copied)."""
    found = {}
    for pattern, what in _UNSUPPORTED.items():
        keys = [k for k in state_dict if re.match(pattern, k)]
        if keys:
            found[what] = keys[0]
    # Hybrids convert when their CNN is the paper's (timm's ResNetV2 of vit_*_r*_s*), not another timm CNN.
    other_cnn = [k for k in state_dict if k.startswith("patch_embed.backbone.") and not STEM_KEY.fullmatch(k)]
    if other_cnn:
        found["a hybrid CNN other than the paper's BiT ResNet (timm's vit_*_resnet26d/50d, MobileCLIP)"] = other_cnn[0]
    if found:
        listed = "; ".join(f"{what} (e.g. {key})" for what, key in found.items())
        raise WeightsError(f"this timm model uses features the paper's ViT (and vitkit) does not have: {listed}. "
                           "Only timm VisionTransformer weights of the paper's ViT (plain, or hybrid with its ResNet) "
                           "convert")
    if "fc_norm.weight" in state_dict:
        # timm's default for global_pool="avg": average the tokens, then normalise. The official code (and
        # vitkit's pool="gap") normalises every token, then averages; the two are different functions.
        raise WeightsError("this timm model normalises after pooling (fc_norm, timm's default with global_pool='avg'); "
                           "vitkit's pool='gap' normalises the tokens before averaging, as the official code does. "
                           "Only timm models built with fc_norm=False convert exactly")
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".attn.qkv.weight")]:
        bias = key[: -len("weight")] + "bias"
        if bias not in out:
            # qkv_bias=False: a zero bias is the same function.
            w = out[key]
            out[bias] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out
