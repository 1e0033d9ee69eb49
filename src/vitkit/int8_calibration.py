"""Activation ranges for int8 inference, measured once on sample images (static quantisation).

Dynamic int8 finds each linear layer's input range at every call: a pass over the activations and a wait for its
result. With the ranges measured beforehand on images like the ones to come, the rounding becomes a constant
multiply that torch.compile fuses into the LayerNorm before it, and the MLP's first linear can hand its GELU output
to the second one already in uint8 (vitkit.inference_modes.CalibratedInt8Linear). A value outside its layer's
measured range is clipped to it, which is why the samples should be real images of the task (a few hundred
training images) and not noise.

    calibration = calibrate_int8(model, train_images)         # (N, C, H, W), normalised as for the model
    calibration.save("int8_calibration.json")
    InferenceModel(model, "int8", int8_calibration=Int8Calibration.load("int8_calibration.json"))

`vitkit calibrate` writes the file from a dataset beside the weights, and `vitkit train` at the end of a run; eval,
predict and serve use the file they find there, or the one `--int8_calibration FILE` names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from vitkit.atomic import atomic_write_text

FORMAT = "vitkit int8 calibration"
VERSION = 1


@dataclass(frozen=True)
class Int8Calibration:
    """The input range (low <= 0 <= high) of every linear layer of one model and of its patch projection (where it
    has one, `quantised_names`), by the layer's qualified name. Without the patch projection's range, int8 leaves it
    in float."""

    ranges: dict[str, tuple[float, float]]
    images: int
    """How many images the ranges were measured on."""
    model: dict
    """The model's config (ViTConfig.to_dict()): a file measured on another architecture is refused."""
    weights: str
    """A digest of the quantised layers' weights (`weights_digest`): ranges measured on other weights are refused."""

    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless these ranges were measured on `model`'s architecture and cover its linears."""
        config = _config_of(model)
        if self.model != config:
            differing = sorted(key for key in set(self.model) | set(config) if self.model.get(key) != config.get(key))
            raise ValueError(f"this int8 calibration was measured on another model (its config differs in "
                             f"{', '.join(differing)}); run `vitkit calibrate` on these weights")
        if self.weights != weights_digest(model):
            raise ValueError("this int8 calibration was measured on other weights of this architecture (their "
                             "digest differs): run `vitkit calibrate` on these weights")
        missing = sorted(set(linear_names(model)) - set(self.ranges))
        if missing:
            raise ValueError(f"this int8 calibration has no range for the linear layers {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}; run `vitkit calibrate` on these weights")

    def save(self, path: str | Path) -> None:
        record = {"format": FORMAT, "version": VERSION, "images": self.images, "model": self.model,
                  "weights": self.weights, "ranges": {name: list(bounds) for name, bounds in self.ranges.items()}}
        atomic_write_text(Path(path), json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Int8Calibration:
        """The calibration saved at `path`; ValueError naming the file if it is not one."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"no int8 calibration file at {path}: write one with `vitkit calibrate`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable int8 calibration file ({err}); write it again with "
                             "`vitkit calibrate`") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"{path} is not an int8 calibration file (written by `vitkit calibrate`)")
        if record.get("version") != VERSION:
            raise ValueError(f"{path} is an int8 calibration of version {record.get('version')!r}; this vitkit reads "
                             f"version {VERSION}: write it again with `vitkit calibrate`")
        try:
            ranges = {str(name): _checked_range(bounds) for name, bounds in record["ranges"].items()}
            images, model, weights = int(record["images"]), dict(record["model"]), str(record["weights"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path} is a damaged int8 calibration file ({err}); write it again with "
                             "`vitkit calibrate`") from None
        return cls(ranges, images, model, weights)


def _checked_range(bounds: object) -> tuple[float, float]:
    low, high = (float(v) for v in bounds)  # type: ignore[union-attr]
    if not (low <= 0.0 <= high) or high - low == float("inf"):
        raise ValueError(f"range {bounds} does not span 0 with finite ends")
    return low, high


def linear_names(model: nn.Module) -> list[str]:
    """The qualified names of `model`'s nn.Linear layers, the ones int8 mode quantises."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


PATCH_PROJECTION = "patch_embed.proj"
"""The patch embedding's convolution, which calibrated int8 runs as an int8 linear over the patches."""


def is_patch_projection(module: nn.Module) -> bool:
    """Whether `module` cuts its input into non-overlapping patches and projects each (a Conv2d whose stride is its
    kernel, without padding, dilation or groups): then it is a linear layer over the flattened patches."""
    return (isinstance(module, nn.Conv2d) and module.stride == module.kernel_size and module.padding == (0, 0)
            and module.dilation == (1, 1) and module.groups == 1)


def quantised_names(model: nn.Module) -> list[str]:
    """The layers calibrated int8 quantises: every nn.Linear, and the patch projection where it is one."""
    projection = dict(model.named_modules()).get(PATCH_PROJECTION)
    return linear_names(model) + ([PATCH_PROJECTION] if projection is not None
                                  and is_patch_projection(projection) else [])


@torch.no_grad()
def calibrate_int8(model: nn.Module, images: Iterable[torch.Tensor] | torch.Tensor,
                   batch_size: int = 250) -> Int8Calibration:
    """Measure the input range of every linear layer and of the patch projection (`quantised_names`) on `images`:
    one (N, C, H, W) tensor, cut into batches of `batch_size`, or an iterable of such batches. The fp32 model runs in
    eval mode; the model is left as it was."""
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    device = next(model.parameters()).device
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            low, high = torch.aminmax(inputs[0].detach().float())
            lows[name] = min(lows.get(name, 0.0), float(low))
            highs[name] = max(highs.get(name, 0.0), float(high))
        return hook

    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(record(name)) for name in quantised_names(model)]
    was_training = model.training
    count = 0
    try:
        model.eval()
        for batch in batches:
            model(batch.to(device, torch.float32))
            count += len(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("no images to calibrate on")
    return Int8Calibration({name: (lows[name], highs[name]) for name in lows}, count, _config_of(model),
                           weights_digest(model))


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the names and fp32 bytes of the weights and biases of the layers calibrated int8 quantises: equal
    for the same weights however they were loaded, different for any other (0.06 s for S/16 on 2 cores)."""
    digest = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in quantised_names(model):
        for tensor in (modules[name].weight, modules[name].bias):
            if tensor is not None:
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def first_images(images: Dataset, count: int, batch_size: int = 250) -> Iterator[torch.Tensor]:
    """The first `count` images of a dataset of (image, label) items, stacked in batches of `batch_size`, for
    `calibrate_int8`; an item None (an unreadable image the dataset skipped) is left out."""
    end = min(count, len(images))
    for start in range(0, end, batch_size):
        batch = [item[0] for item in map(images.__getitem__, range(start, min(start + batch_size, end)))
                 if item is not None]
        if batch:
            yield torch.stack(batch)


def _config_of(model: nn.Module) -> dict:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise ValueError("int8 calibration is for vitkit models (a ViT with a `cfg`)")
    return json.loads(json.dumps(cfg.to_dict()))  # as the JSON file holds it: tuples become lists
