"""HF transformers ViTModel / ViTForImageClassification state dicts -> vitkit.

Two key layouts exist: the one HF checkpoints are saved in (`encoder.layer.{i}.attention.attention.query`,
`intermediate.dense`, `output.dense`, ...) and the module names of transformers 5
(`layers.{i}.attention.q_proj`, `mlp.fc1`, ...). Both are read. Query, key and value are separate
linears in HF and one fused `qkv` in vitkit: their rows are concatenated in that order.
"""

from __future__ import annotations

import re

import torch

from vitkit.weights.errors import WeightsError
from vitkit.weights.formats import hf_prefix

_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    # ViTModel's pooler is tanh(dense(class token)): the paper's pre-logits layer.
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
}

# (saved name, transformers-5 module name) -> vitkit name, inside block i.
_BLOCK = {
    ("layernorm_before", "layernorm_before"): "norm1",
    ("layernorm_after", "layernorm_after"): "norm2",
    ("attention.output.dense", "attention.o_proj"): "attn.proj",
    ("intermediate.dense", "mlp.fc1"): "mlp.fc1",
    ("output.dense", "mlp.fc2"): "mlp.fc2",
}
_QKV = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"))
_LAYER = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF ViT state dict with vitkit names. Keys it does not know are kept as they are (and reported on load)."""
    prefix = hf_prefix(state_dict)
    if prefix is None:
        raise WeightsError("not an HF transformers ViT state dict: no 'embeddings.patch_embeddings.projection.weight'")
    if any(key.startswith(f"{prefix}embeddings.patch_embeddings.backbone.") for key in state_dict):
        raise WeightsError("this is HF transformers' ViTHybrid (a BiT backbone under HF's names), which vitkit "
                           "does not convert: load the same model's timm or official .npz weights")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in ("classifier.weight", "classifier.bias"):
            out["head." + key.split(".")[-1]] = value
            continue
        if not key.startswith(prefix):
            out[key] = value
            continue
        name = key[len(prefix):]
        if name in _TOP:
            out[_TOP[name]] = value
            continue
        match = _LAYER.fullmatch(name)
        if match is None:
            out[key] = value
            continue
        i, module, kind = int(match[1]), match[2], match[3]
        target = next((v for names, v in _BLOCK.items() if module in names), None)
        if target is not None:
            out[f"blocks.{i}.{target}.{kind}"] = value
            continue
        part = next((j for j, names in enumerate(_QKV) if module in names), None)
        if part is None:
            out[key] = value
            continue
        qkv.setdefault((i, kind), {})[part] = value
    for (i, kind), parts in qkv.items():
        if kind == "weight" and len(parts) != 3:
            missing = [_QKV[j][0].split(".")[-1] for j in range(3) if j not in parts]
            raise WeightsError(f"HF ViT layer {i} lacks the attention {'/'.join(missing)} weight")
        if kind == "bias" and len(parts) != 3:
            raise WeightsError(f"HF ViT layer {i} has biases for only some of query/key/value")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)  # (3D, ...)
    for (i, kind) in list(qkv):
        bias = f"blocks.{i}.attn.qkv.bias"
        if kind == "weight" and bias not in out:
            # qkv_bias=False: zero biases are the same function.
            w = out[f"blocks.{i}.attn.qkv.weight"]
            out[bias] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out
