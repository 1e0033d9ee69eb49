"""The official JAX/Flax checkpoints (.npz, Flax parameter names) <-> vitkit, both ways.

Layouts read: the classic one of the paper's release
(`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`,
`Transformer/posembed_input/pos_embedding` with a class-token row), the same nested under
`opt/target/` (AugReg), and big_vision's (`params/`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
`MlpBlock_0`, a top-level `pos_embedding` without a class-token row, optionally with the blocks
stacked on a leading axis under `Transformer/encoderblock/`). The classic layout is written.

Flax Dense kernels are (in, out), torch Linear weights (out, in). Attention kernels keep the heads
apart: query/key/value (D, h, hd), out (h, hd, D).

A hybrid's ResNet (vit_jax/models_resnet.py) sits at the top level next to `embedding`, which then projects its
feature map: `conv_root/kernel`, `gn_root/{scale,bias}`, and per stage i and unit j (from 1)
`block{i}/unit{j}/{conv1,conv2,conv3,conv_proj}/kernel` and `gn1`..`gn3`, `gn_proj` `{scale,bias}`; convolution
kernels are (k, k, in, out), torch's (out, in, k, k). These are the names timm's npz loader reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitkit.weights.errors import WeightsError
from vitkit.weights.formats import STEM_KEY, official_prefix
from vitkit.weights.npz_io import write_npz

_CLASSIC = {"attn": "MultiHeadDotProductAttention_1", "ln2": "LayerNorm_2", "mlp": "MlpBlock_3"}
_BIG_VISION = {"attn": "MultiHeadDotProductAttention_0", "ln2": "LayerNorm_1", "mlp": "MlpBlock_0"}
_UNSUPPORTED = {"MAPHead_0/probe": "attention pooling (MAP head)"}

# A ResNet unit's layers: vitkit (timm) name -> official name.
_UNIT = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "downsample.conv": "conv_proj",
         "norm1": "gn1", "norm2": "gn2", "norm3": "gn3", "downsample.norm": "gn_proj"}


def official_heads(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The number of attention heads, read off the first block's query kernel (D, h, hd)."""
    prefix = official_prefix(state_dict)
    for block in ("Transformer/encoderblock_0/", "Transformer/encoderblock/"):
        for names in (_CLASSIC, _BIG_VISION):
            kernel = state_dict.get(f"{prefix}{block}{names['attn']}/query/kernel")
            if kernel is not None and kernel.ndim >= 3:
                return int(kernel.shape[-2])
    return None


def from_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official-layout state dict with vitkit names and torch layouts.

    Keys outside the checkpoint's prefix (optimizer state of `opt/...`) are ignored; keys inside it
    that have no vitkit counterpart are kept under their own names, so loading reports them.
    """
    prefix = official_prefix(state_dict)
    if prefix is None:
        raise WeightsError("not an official ViT checkpoint: no 'embedding/kernel' under any known prefix")
    w = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    for key, what in _UNSUPPORTED.items():
        if key in w:
            raise WeightsError(
                f"this official checkpoint has {what} ('{prefix}{key}'), which vitkit does not implement"
            )
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str, index: int | None = None) -> torch.Tensor | None:
        value = w.get(name)
        if value is None:
            return None
        used.add(name)
        return value if index is None else value[index]

    def put(name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            out[name] = value.contiguous()

    _stem_from_official(w, take, put)
    kernel = take("embedding/kernel")
    if kernel.ndim != 4:
        raise WeightsError(f"official 'embedding/kernel' has shape {tuple(kernel.shape)}; vitkit reads the "
                           "convolutional (P, P, C, D) patch embedding only")
    put("patch_embed.proj.weight", kernel.permute(3, 2, 0, 1))  # (P, P, C, D) -> (D, C, P, P)
    put("patch_embed.proj.bias", take("embedding/bias"))
    cls = take("cls")
    put("cls_token", cls)
    pos = take("Transformer/posembed_input/pos_embedding")
    if pos is None:
        pos = take("pos_embedding")
        if pos is not None and cls is not None:
            # big_vision adds the position embedding before prepending the class token, so the class
            # token has no row; a zero row in front gives the same sums in vitkit's order.
            pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    put("pos_embed", pos)

    for i, (block, index) in enumerate(_blocks(w)):
        names = _CLASSIC if f"{block}{_CLASSIC['attn']}/query/kernel" in w else _BIG_VISION
        attn, ln2, mlp = (block + names[k] for k in ("attn", "ln2", "mlp"))
        qkv = [take(f"{attn}/{n}/kernel", index) for n in ("query", "key", "value")]  # each (D, h, hd)
        if all(t is not None for t in qkv):
            d = qkv[0].shape[0]
            put(f"blocks.{i}.attn.qkv.weight", torch.cat([t.reshape(d, -1).T for t in qkv], dim=0))  # (3D, D)
        biases = [take(f"{attn}/{n}/bias", index) for n in ("query", "key", "value")]  # each (h, hd)
        if all(b is not None for b in biases):
            put(f"blocks.{i}.attn.qkv.bias", torch.cat([b.reshape(-1) for b in biases]))
        out_kernel = take(f"{attn}/out/kernel", index)  # (h, hd, D)
        if out_kernel is not None:
            put(f"blocks.{i}.attn.proj.weight", out_kernel.reshape(-1, out_kernel.shape[-1]).T)
        put(f"blocks.{i}.attn.proj.bias", take(f"{attn}/out/bias", index))
        for ours, flax in (("norm1", f"{block}LayerNorm_0"), ("norm2", ln2)):
            put(f"blocks.{i}.{ours}.weight", take(f"{flax}/scale", index))
            put(f"blocks.{i}.{ours}.bias", take(f"{flax}/bias", index))
        for j in (0, 1):
            dense_kernel = take(f"{mlp}/Dense_{j}/kernel", index)
            if dense_kernel is not None:
                put(f"blocks.{i}.mlp.fc{j + 1}.weight", dense_kernel.T)
            put(f"blocks.{i}.mlp.fc{j + 1}.bias", take(f"{mlp}/Dense_{j}/bias", index))

    put("norm.weight", take("Transformer/encoder_norm/scale"))
    put("norm.bias", take("Transformer/encoder_norm/bias"))
    for flax, ours in (("pre_logits", "pre_logits.fc"), ("head", "head")):
        dense_kernel = take(f"{flax}/kernel")
        if dense_kernel is not None:
            put(f"{ours}.weight", dense_kernel.T)
        put(f"{ours}.bias", take(f"{flax}/bias"))
    out.update({prefix + k: v for k, v in w.items() if k not in used})  # reported as unexpected on load
    return out


def _stem_from_official(w: dict[str, torch.Tensor], take, put) -> None:
    """A hybrid's ResNet, if the checkpoint has one, under vitkit's (timm's) names."""
    if "conv_root/kernel" not in w:
        return
    stages = []  # units per stage
    while any(k.startswith(f"block{len(stages) + 1}/") for k in w):
        units = 0
        while any(k.startswith(f"block{len(stages) + 1}/unit{units + 1}/") for k in w):
            units += 1
        stages.append(units)
    root = "patch_embed.backbone." + ("stem." if stages else "")  # the root block alone is the whole network

    def conv(name: str, ours: str) -> None:
        kernel = take(f"{name}/kernel")
        put(ours, None if kernel is None else kernel.permute(3, 2, 0, 1))  # (k, k, in, out) -> (out, in, k, k)

    def norm(name: str, ours: str) -> None:
        for flax, torch_name in (("scale", "weight"), ("bias", "bias")):
            value = take(f"{name}/{flax}")
            put(f"{ours}.{torch_name}", None if value is None else value.reshape(-1))

    conv("conv_root", root + "conv.weight")
    norm("gn_root", root + "norm")
    for i, units in enumerate(stages):
        for j in range(units):
            for ours, flax in _UNIT.items():
                name, target = f"block{i + 1}/unit{j + 1}/{flax}", f"patch_embed.backbone.stages.{i}.blocks.{j}.{ours}"
                if flax.startswith("conv"):
                    conv(name, target + ".weight")
                else:
                    norm(name, target)


def _stem_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A hybrid's ResNet (vitkit/timm names) under the official names; empty for a plain ViT."""
    out = {}
    for key, value in sd.items():
        match = STEM_KEY.fullmatch(key)
        if match is None:
            continue
        layer, _, leaf = key.rpartition(".")  # e.g. "...blocks.0.downsample.conv", "weight"
        if match["stage"] is None:
            name = "conv_root" if layer.endswith("conv") else "gn_root"
        else:
            prefix = f"patch_embed.backbone.stages.{match['stage']}.blocks.{match['unit']}."
            name = f"block{int(match['stage']) + 1}/unit{int(match['unit']) + 1}/{_UNIT[layer[len(prefix):]]}"
        if value.ndim == 4:
            out[f"{name}/kernel"] = value.permute(2, 3, 1, 0)  # (out, in, k, k) -> (k, k, in, out)
        else:
            out[f"{name}/{'scale' if leaf == 'weight' else 'bias'}"] = value
    return out


def _blocks(w: dict[str, torch.Tensor]) -> list[tuple[str, int | None]]:
    """(key prefix, index on the stacked axis or None) of each encoder block, in order."""
    stacked = w.get("Transformer/encoderblock/LayerNorm_0/scale")
    if stacked is not None:
        return [("Transformer/encoderblock/", i) for i in range(stacked.shape[0])]
    blocks = []
    while any(k.startswith(f"Transformer/encoderblock_{len(blocks)}/") for k in w):
        blocks.append((f"Transformer/encoderblock_{len(blocks)}/", None))
    return blocks


def to_official(state_dict: dict[str, torch.Tensor], heads: int) -> dict[str, np.ndarray]:
    """A vitkit state dict in the classic official layout, as float numpy arrays."""
    sd = {k: _numpy_ready(v) for k, v in state_dict.items()}
    d = sd["patch_embed.proj.weight"].shape[0]
    if d % heads:
        raise ValueError(f"width {d} is not divisible by {heads} heads")
    hd = d // heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),  # (D, C, P, P) -> (P, P, C, D)
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if "cls_token" in sd:
        out["cls"] = sd["cls_token"]
    out.update(_stem_to_official(sd))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, block = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attn = block + _CLASSIC["attn"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]  # (3D, D), (3D,)
        for j, name in enumerate(("query", "key", "value")):
            out[f"{attn}/{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
            out[f"{attn}/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, hd)
        out[f"{attn}/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, hd, d)
        out[f"{attn}/out/bias"] = sd[b + "attn.proj.bias"]
        out[f"{block}LayerNorm_0/scale"] = sd[b + "norm1.weight"]
        out[f"{block}LayerNorm_0/bias"] = sd[b + "norm1.bias"]
        out[f"{block}{_CLASSIC['ln2']}/scale"] = sd[b + "norm2.weight"]
        out[f"{block}{_CLASSIC['ln2']}/bias"] = sd[b + "norm2.bias"]
        for j in (0, 1):
            out[f"{block}{_CLASSIC['mlp']}/Dense_{j}/kernel"] = sd[f"{b}mlp.fc{j + 1}.weight"].T
            out[f"{block}{_CLASSIC['mlp']}/Dense_{j}/bias"] = sd[f"{b}mlp.fc{j + 1}.bias"]
    for ours, flax in (("pre_logits.fc", "pre_logits"), ("head", "head")):
        if f"{ours}.weight" in sd:
            out[f"{flax}/kernel"] = sd[f"{ours}.weight"].T
            out[f"{flax}/bias"] = sd[f"{ours}.bias"]
    return {k: np.ascontiguousarray(v.numpy()) for k, v in out.items()}


def export_npz(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` as an official-layout .npz (readable by the official code and timm's npz loader), atomically."""
    kind = model.cfg.pos_embed
    if kind != "learned":
        raise ValueError(f"the official .npz layout holds a learned 1D position embedding only; this model's is "
                         f"{kind!r}: write it as vitkit .safetensors or ONNX instead")
    return write_npz(to_official(model.state_dict(), model.cfg.heads), path)


def _numpy_ready(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.float() if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
