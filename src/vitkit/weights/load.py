"""Loading weights of any supported layout into a vitkit model, and rebuilding a model from a vitkit file.

Everything that does not fit is reported at once, key by key with both shapes. The only changes made
without being asked are exact or standard: a position embedding trained at another grid is resampled
(as when fine-tuning at another resolution); converters fill exact equivalents (zero qkv biases, a zero
class-token row). A head of another size is replaced only when asked (`reset_head=True`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from vitkit.model import ViT, ViTConfig, resample_pos_embed, resample_position_state
from vitkit.model.resnet import ARCHITECTURE as RESNET
from vitkit.model.resnet_stem import stem_stride
from vitkit.model.variants import stem_name
from vitkit.weights.convert import to_vitkit
from vitkit.weights.errors import WeightsError
from vitkit.weights.files import read_weights, unwrap_state_dict
from vitkit.weights.formats import stem_layers_of
from vitkit.weights.infer import infer_config
from vitkit.weights.safetensors_io import CONFIG_KEY, PREPROCESS_KEY

Source = str | os.PathLike | dict


@dataclass
class LoadReport:
    """What `load_weights` did beyond copying tensors."""

    format: str
    """Layout the weights were in: "vitkit", "timm", "hf" or "official"."""
    pos_embed_resampled: tuple[tuple[int, int], tuple[int, int]] | None = None
    """(old grid, new grid) when the position embedding was resampled."""
    head_reset: bool = False
    """True when the head was replaced by a zero-initialised one (reset_head=True)."""
    dropped: list[str] = field(default_factory=list)
    """Checkpoint keys left out on purpose (the old head, the pre-logits layer)."""
    missing: list[str] = field(default_factory=list)
    """Model keys the checkpoint lacked (only with strict=False)."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint keys the model lacks (only with strict=False)."""

    def __str__(self) -> str:
        parts = [f"loaded {self.format} weights"]
        if self.pos_embed_resampled:
            (oh, ow), (nh, nw) = self.pos_embed_resampled
            parts.append(f"position embedding resampled {oh}x{ow} -> {nh}x{nw}")
        if self.head_reset:
            parts.append("head reset to zeros")
        for what in ("dropped", "missing", "unexpected"):
            keys = getattr(self, what)
            if keys:
                parts.append(f"{what}: {', '.join(keys)}")
        return "; ".join(parts)


def load_weights(model: ViT, source: Source, *, reset_head: bool = False, strict: bool = True) -> LoadReport:
    """Load weights into `model` in place: a file path (.safetensors, .npz, .pt/.pth/.bin) or a state dict.

    Any supported layout (vitkit/timm, HF transformers, official) is converted. A position embedding of
    another grid is resampled to the model's. A head of another size is an error unless `reset_head`,
    which drops the checkpoint's head (and pre-logits layer, if the model has none) and zero-initialises
    the model's. With strict=False, missing and unexpected keys are reported instead of refused; a
    wrong shape is always an error.
    """
    if isinstance(source, dict):
        state, metadata = unwrap_state_dict(source), {}
    else:
        state, metadata = read_weights(source)
    return _load(model, state, metadata, reset_head=reset_head, strict=strict)


def load_model(path: str | os.PathLike, *, reset_head: bool = False, **overrides) -> ViT:
    """Rebuild the model saved in a vitkit .safetensors file from the config stored with it.

    `overrides` change config fields (e.g. img_size=384 resamples the position embedding; num_classes=10
    needs reset_head=True).
    """
    state, metadata = read_weights(path)
    if CONFIG_KEY not in metadata:
        raise WeightsError(
            f"{path} carries no vitkit model config (it was not written by vitkit.save_weights), so the "
            "architecture is unknown: build the model with vitkit.create_model(name, ...) (or a config from "
            "vitkit.weights.infer_config) and call vitkit.load_weights(model, path)"
        )
    cfg = _stored_config(metadata, str(path))
    cfg_dict = cfg.to_dict()
    unknown = sorted(set(overrides) - set(cfg_dict))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; the options are {sorted(cfg_dict)}")
    model = ViT(ViTConfig.from_dict({**cfg_dict, **overrides}))
    _load(model, state, metadata, reset_head=reset_head, strict=True)
    return model


def load_pretrained(path: str | os.PathLike, heads: int | None = None) -> tuple[ViT, dict]:
    """The model in a weights file of any format vitkit reads, and the preprocessing stored with it.

    vitkit files carry their config; timm, HF and official weights get one inferred from their shapes
    (`heads` is needed when it is not the paper's for that size and the layout does not keep heads apart).
    The preprocessing dict (dataset, mean, std, class_names) is empty for weights not written by `vitkit train`.
    """
    state, metadata = read_weights(path)
    if CONFIG_KEY in metadata:
        cfg = _stored_config(metadata, str(path))
    else:
        state = unwrap_state_dict(state)
        try:
            cfg = infer_config(state, heads=heads)
        except WeightsError as err:
            raise WeightsError(f"{path}: {err} (on the command line: --model.heads N)") from err
    model = ViT(cfg)
    _load(model, state, metadata, reset_head=False, strict=True)
    try:
        preprocess = json.loads(metadata.get(PREPROCESS_KEY, "{}"))
    except ValueError as err:
        raise WeightsError(f"{path}: the stored {PREPROCESS_KEY!r} is not valid JSON ({err})") from err
    return model, preprocess


def _stored_config(metadata: dict[str, str], origin: str) -> ViTConfig:
    try:
        stored = json.loads(metadata[CONFIG_KEY])
    except ValueError as err:
        message = f"{origin}: the stored {CONFIG_KEY!r} is not valid JSON ({err}); the file is corrupt"
        raise WeightsError(message) from err
    if isinstance(stored, dict) and stored.get("architecture") == RESNET:
        raise WeightsError(
            f"{origin} holds the ResNet-18 baseline (a `vitkit train --model.name {RESNET}` run), not a ViT: the "
            "weights loaders, and the commands on them (eval, predict, fewshot, export, finetune), take ViT weights "
            "only. Rebuild it in Python: vitkit.model.resnet.ResNetBaseline(ResNetConfig.from_dict(its stored "
            "config)), then load_state_dict of the file's tensors")
    try:
        return ViTConfig.from_dict(stored)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{origin}: the stored {CONFIG_KEY!r} is not a valid ViT config ({err}); "
                           "the file is corrupt or from an incompatible vitkit version") from err


def _load(model: ViT, state: dict[str, torch.Tensor], metadata: dict[str, str], *,
          reset_head: bool, strict: bool) -> LoadReport:
    stored = _stored_config(metadata, "the weights file") if CONFIG_KEY in metadata else None
    sd, fmt, heads = to_vitkit(state)
    report = LoadReport(format=fmt)
    cfg = model.cfg
    if stored is not None and stored.width == cfg.width:
        heads = stored.heads
    if heads is not None and heads != cfg.heads:
        # Shapes cannot show this: the same qkv matrix split into other heads is another function.
        raise WeightsError(f"the weights have {heads} attention heads but the model has {cfg.heads}: "
                           f"build the model with heads={heads}")
    _check_stem(sd, cfg, stored)
    _check_pool(sd, cfg)
    _fit_head(model, sd, reset_head, report)
    _check_position_kind(sd, cfg, stored)
    _fit_pos_embed(sd, cfg, stored, report)
    _check_keys(model, sd, strict, report)
    with torch.no_grad():
        model.load_state_dict(sd, strict=strict)
    return report


def _describe_stem(layers: tuple[int, ...] | None) -> str:
    if layers is None:
        return "a plain ViT (patches cut from the image, no ResNet)"
    if not layers:
        return "a hybrid whose ResNet is the root block alone (stem_layers=())"
    return f"a hybrid with a ResNet of {len(layers)} stage(s) of {', '.join(map(str, layers))} units " \
           f"(stem_layers={layers})"


def _check_stem(sd: dict[str, torch.Tensor], cfg: ViTConfig, stored: ViTConfig | None) -> None:
    """Refuse hybrid weights for a plain model, plain weights for a hybrid, and another ResNet layout."""
    theirs = stored.stem_layers if stored is not None else stem_layers_of(sd)
    if theirs == cfg.stem_layers:
        return
    hint = ("build the model with the weights' config: vitkit.load_pretrained(path) or "
            "vitkit.weights.infer_config(state_dict) finds it")
    proj = sd.get("patch_embed.proj.weight")
    if theirs is not None and stem_name(theirs) is not None and proj is not None and proj.ndim == 4:
        hint += (f", or vitkit.create_model('{stem_name(theirs)}+<size>/{stem_stride(theirs) * proj.shape[-1]}') "
                 "with the weights' size")
    raise WeightsError(f"the weights are {_describe_stem(theirs)} but the model is {_describe_stem(cfg.stem_layers)}: "
                       f"{hint}")


def _check_pool(sd: dict[str, torch.Tensor], cfg: ViTConfig) -> None:
    has_cls = "cls_token" in sd
    if has_cls and cfg.pool == "gap":
        raise WeightsError("the weights have a class token (pool='cls') but the model averages patch tokens "
                           "(pool='gap'): build the model with pool='cls'")
    if not has_cls and cfg.pool == "cls" and "pos_embed" in sd:
        raise WeightsError("the weights have no class token (they average patch tokens, pool='gap') but the model "
                           "classifies a class token: build the model with pool='gap'")


def _fit_head(model: ViT, sd: dict[str, torch.Tensor], reset_head: bool, report: LoadReport) -> None:
    cfg = model.cfg
    theirs = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(("head.", "pre_logits."))}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(("head.", "pre_logits."))}
    if reset_head:
        for key in [k for k in theirs if k.startswith("head.") or k not in ours]:
            # Fine-tuning drops the pre-logits layer with the old head (paper, section 3.1).
            report.dropped.append(key)
            del sd[key]
        # The zero-initialised head of reset_classifier, written by the same load as everything else, so
        # the model is untouched when any later check fails.
        for key, value in model.state_dict().items():
            if key.startswith("head."):
                sd[key] = torch.zeros_like(value)
        report.head_reset = True
        return
    if "pre_logits.fc.weight" in theirs and "pre_logits.fc.weight" not in ours:
        rep = theirs["pre_logits.fc.weight"][0]
        raise WeightsError(
            f"the weights have a pre-logits layer of size {rep} that the model lacks: build the model with "
            f"representation_size={rep}, or pass reset_head=True to drop it with the head, "
            "as fine-tuning does"
        )
    their_head = {k: s for k, s in theirs.items() if k.startswith("head.")}
    our_head = {k: s for k, s in ours.items() if k.startswith("head.")}
    if their_head != our_head:
        def describe(shapes: dict) -> str:
            w = shapes.get("head.weight")
            return f"a {w[0]}-class head {w}" if w else "no head"
        fresh = f" and start from a zero-initialised one for {cfg.num_classes} classes" if cfg.num_classes else ""
        raise WeightsError(
            f"the weights have {describe(their_head)} but the model has {describe(our_head)}: pass "
            f"reset_head=True to drop the weights' head{fresh}, or build the model with the "
            "weights' num_classes"
        )


def _position_kind(sd: dict[str, torch.Tensor]) -> str | None:
    """The kind of position information a state dict holds, where its keys tell (not "none" from "sincos_2d")."""
    if "pos_embed" in sd:
        return "learned"
    if "pos_embed_row" in sd:
        return "learned_2d"
    if any(key.endswith("relative_position_bias_table") for key in sd):
        return "relative"
    return None


def _check_position_kind(sd: dict[str, torch.Tensor], cfg: ViTConfig, stored: ViTConfig | None) -> None:
    theirs = stored.pos_embed if stored is not None else _position_kind(sd)
    if theirs is not None and theirs != cfg.pos_embed:
        raise WeightsError(f"the weights use the position embedding {theirs!r} but the model uses "
                           f"{cfg.pos_embed!r}: build the model with pos_embed={theirs!r}")


def _fit_pos_embed(sd: dict[str, torch.Tensor], cfg: ViTConfig, stored: ViTConfig | None,
                   report: LoadReport) -> None:
    if cfg.pos_embed != "learned":
        # The other kinds are only in vitkit files, which say their grid; a fixed or absent table has none to fit.
        if stored is not None and stored.grid_size != cfg.grid_size:
            sd.update(resample_position_state(sd, cfg.pos_embed, cfg.grid_size, stored.grid_size,
                                              cfg.num_prefix_tokens, cfg.pos_embed_interp))
            report.pos_embed_resampled = (tuple(stored.grid_size), tuple(cfg.grid_size))
        return
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != cfg.width:
        return  # absent or of another width: the key check reports it
    prefix, new_grid = cfg.num_prefix_tokens, cfg.grid_size
    tokens = pos.shape[1]
    if stored is not None and prefix + math.prod(stored.grid_size) == tokens:
        old_grid = stored.grid_size
    elif prefix + math.prod(new_grid) == tokens:
        old_grid = new_grid
    elif _square(tokens - prefix):
        side = math.isqrt(tokens - prefix)
        old_grid = (side, side)
    elif prefix == 1 and _square(tokens):
        # A class token without a position-embedding row (timm's no_embed_class, DeiT III): adding a
        # zero row for it first is the same function.
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        side = math.isqrt(tokens)
        old_grid = (side, side)
    else:
        raise WeightsError(
            f"cannot tell the patch grid of the weights' position embedding: {tokens - prefix} positions is not "
            f"the model's {new_grid[0]}x{new_grid[1]} grid nor a square one. Resample it to the model's grid "
            "yourself (vitkit.resample_pos_embed) or save the weights with vitkit, which stores the config"
        )
    if old_grid != new_grid:
        pos = resample_pos_embed(pos, new_grid, old_grid, prefix, cfg.pos_embed_interp)
        report.pos_embed_resampled = (tuple(old_grid), tuple(new_grid))
    sd["pos_embed"] = pos


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _check_keys(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool, report: LoadReport) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and given[k] != expected[k]]
    problems = [f"  wrong shape: {k}: weights {given[k]}, model {expected[k]}" for k in wrong]
    if strict:
        problems += [f"  missing from the weights: {k} (model {expected[k]})" for k in missing]
        problems += [f"  not in the model: {k} (weights {given[k]})" for k in unexpected]
    else:
        report.missing, report.unexpected = missing, unexpected
        for key in unexpected:
            del sd[key]
    if problems:
        hint = ("Build the model with the weights' config (vitkit.weights.infer_config reads it off the shapes)"
                + (", or pass strict=False to skip missing and unexpected keys" if strict and (missing or unexpected)
                   else ""))
        raise WeightsError(f"the weights do not fit the model ({len(problems)} problem(s)):\n"
                           + "\n".join(problems) + f"\n{hint}")
