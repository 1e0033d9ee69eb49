"""Masked patch prediction (MPP): the self-supervised objective of the ViT paper's appendix B.1.2.

Half of each image's patch embeddings are corrupted (after the patch projection, before the position
embedding): of those, 80% become a learnable [mask] embedding, 10% the embedding of another patch of the
same image, 10% stay as they are. A linear head on the encoder's output token at each corrupted position
predicts the patch's mean colour, 3 bits per channel (512 classes for RGB); the loss is the cross-entropy
over the corrupted patches only. Two regression targets are options: the patch downsized to 4x4, and the
full patch, both with an L2 loss.

Randomness is an input, not drawn here: the caller passes, for each image, (N, 3) uniform noise
(`MaskedPatchPrediction.noise_shape`). A trainer draws it per image of the global batch from a seeded
generator, so the corruption of an image does not depend on how the batch is split over processes and
micro-batches, and a resumed run corrupts exactly as the uninterrupted one would have.
Column 0 picks which patches are corrupted, column 1 how, column 2 the source of a replacement.

Shapes: B batch, C channels, H x W image, P patch, N patches per image, D width, K classes or regression
width, M corrupted patches in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.model import check_image_size

TARGETS = ("colour", "downsized", "pixels")

# Values of Corruption.kind.
UNTOUCHED, MASKED, REPLACED, KEPT = 0, 1, 2, 3


class Corruption(NamedTuple):
    """What `corrupt_patches` returns."""

    patches: torch.Tensor
    """(B, N, D) patch embeddings with the corrupted ones masked or replaced."""
    corrupted: torch.Tensor
    """(B, N) bool: the patches whose target the objective predicts."""
    kind: torch.Tensor
    """(B, N) int8: 0 untouched, 1 masked, 2 replaced by another patch, 3 corrupted but kept."""


class MPPOutput(NamedTuple):
    """What `MaskedPatchPrediction.forward` returns."""

    loss: torch.Tensor
    """Scalar: mean over the corrupted patches of the cross-entropy (colour) or of the per-patch MSE."""
    corrupted_count: torch.Tensor
    """Number of corrupted patches in the batch (what the loss is averaged over), a 0-dim integer tensor."""
    correct: torch.Tensor
    """Corrupted patches whose most likely colour class is right (colour target; 0 for L2 targets), 0-dim."""


# ---- validation ----


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
        raise ValueError(f"rate (the fraction of patches corrupted) must be in (0, 1), got {rate!r}")
    return float(rate)


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in split)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or min(values) < 0.0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be three non-negative fractions (masked, replaced, kept) summing to 1, got {split!r}"
        )
    return values[0], values[1], values[2]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits (per colour channel) must be an integer from 1 to 8, got {bits!r}")
    return bits


def _check_images(images: torch.Tensor, patch_size: int) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h < patch_size or w < patch_size:
        raise ValueError(f"image size {h}x{w} is smaller than one {patch_size}x{patch_size} patch")
    check_image_size((h, w), patch_size)


def _check_downsize(size: int, patch_size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or patch_size % size:
        raise ValueError(
            f"downsize {size!r} must be a positive integer dividing the patch size {patch_size} "
            "(each patch is averaged over equal square blocks)"
        )
    return size


# ---- corruption ----


def corrupted_per_image(num_patches: int, rate: float = 0.5) -> int:
    """How many of an image's `num_patches` patches `corrupt_patches` corrupts: round(rate * N), at least 1."""
    return max(1, round(_check_rate(rate) * num_patches))


def corrupt_patches(
    patches: torch.Tensor,
    noise: torch.Tensor,
    mask_embedding: torch.Tensor,
    rate: float = 0.5,
    split: Sequence[float] = (0.8, 0.1, 0.1),
) -> Corruption:
    """Corrupt round(rate * N) patch embeddings of each image (at least one), chosen and treated by `noise`.

    patches (B, N, D); noise (B, N, 3) uniform in [0, 1); mask_embedding (D,). The corrupted patches are
    those of lowest noise[..., 0]; noise[..., 1] against the cumulative `split` picks masked / replaced /
    kept; noise[..., 2] picks a replacement's source uniformly among the other N - 1 patches of the image
    (with N == 1 the patch is its own source). Sources give their original embedding, even if corrupted
    themselves. Gradients flow into `patches` (untouched, kept, and replacement sources) and `mask_embedding`.
    """
    rate = _check_rate(rate)
    masked_share, replaced_share, _ = _check_split(split)
    if patches.ndim != 3:
        raise ValueError(f"patches must have shape (B, N, D), got {tuple(patches.shape)}")
    b, n, d = patches.shape
    if tuple(noise.shape) != (b, n, 3):
        raise ValueError(f"noise must have shape (B, N, 3) = {(b, n, 3)}, got {tuple(noise.shape)}")
    if tuple(mask_embedding.shape) != (d,):
        raise ValueError(f"mask_embedding must have shape (D,) = {(d,)}, got {tuple(mask_embedding.shape)}")
    # The trainer draws noise on the CPU from its own generator; follow the patches wherever they are.
    noise = noise.to(patches.device)

    # Which: the same count in every image, so a micro-batch's mean loss is a mean of per-image means
    # and micro-batches of equal size can be averaged without reweighting.
    count = corrupted_per_image(n, rate)
    chosen = noise[..., 0].argsort(dim=1, stable=True)[:, :count]  # (B, count)
    corrupted = torch.zeros(b, n, dtype=torch.bool, device=patches.device)
    corrupted.scatter_(1, chosen, True)  # (B, N)

    # How: thresholds at the cumulative shares; a share of 0 never fires, since the noise is in [0, 1).
    u = noise[..., 1]  # (B, N)
    kind = torch.full((b, n), KEPT, dtype=torch.int8, device=patches.device)
    kind[u < masked_share + replaced_share] = REPLACED
    kind[u < masked_share] = MASKED
    kind[~corrupted] = UNTOUCHED

    # From where: an index among the other N - 1 patches, then skip over the patch itself.
    position = torch.arange(n, device=patches.device)  # (N,)
    if n > 1:
        other = (noise[..., 2] * (n - 1)).floor().long().clamp(0, n - 2)  # (B, N) in [0, N - 2]
        source = other + (other >= position).long()  # (B, N) in [0, N - 1], never the position itself
    else:
        source = position.expand(b, n)
    replacement = patches.gather(1, source.unsqueeze(-1).expand(-1, -1, d))  # (B, N, D), original embeddings

    mask = mask_embedding.to(patches.dtype).expand(b, n, d)  # (B, N, D); autocast may hand bf16 patches
    out = torch.where((kind == MASKED).unsqueeze(-1), mask, patches)
    out = torch.where((kind == REPLACED).unsqueeze(-1), replacement, out)  # (B, N, D)
    return Corruption(out, corrupted, kind)


# ---- targets (images in [0, 1]) ----


def colour_targets(images_01: torch.Tensor, patch_size: int, bits: int = 3) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, N) class of each patch's mean colour, in row-major grid order.

    Each channel's mean is quantised to 2**bits levels, level = min(floor(mean * 2**bits), 2**bits - 1),
    and the levels are read as a base-2**bits number with channel 0 most significant:
    (2**bits)**C classes, 512 for RGB at 3 bits.
    """
    bits = _check_bits(bits)
    _check_images(images_01, patch_size)
    levels = 2**bits
    # float32 at least: bf16 would blur the level boundaries.
    means = F.avg_pool2d(images_01.float(), patch_size).flatten(2)  # (B, C, N)
    level = (means * levels).floor().clamp(0, levels - 1).long()  # (B, C, N)
    c = images_01.shape[1]
    weight = levels ** torch.arange(c - 1, -1, -1, device=images_01.device)  # (C,): channel 0 most significant
    return (level * weight[:, None]).sum(dim=1)  # (B, N)


def _patchify(images: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, gh * side, gw * side) -> (B, gh * gw, C * side * side): each patch flattened as (C, y, x)."""
    b, c, h, w = images.shape
    gh, gw = h // side, w // side
    x = images.reshape(b, c, gh, side, gw, side)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * side * side)


def downsized_targets(images_01: torch.Tensor, patch_size: int, size: int = 4) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, N, C * size * size): each patch area-averaged to size x size."""
    _check_images(images_01, patch_size)
    _check_downsize(size, patch_size)
    pooled = F.avg_pool2d(images_01.float(), patch_size // size)  # (B, C, gh * size, gw * size)
    return _patchify(pooled, size)


def pixel_targets(images_01: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, N, C * P * P): each patch's pixels, flattened as (C, y, x)."""
    _check_images(images_01, patch_size)
    return _patchify(images_01.float(), patch_size)


# ---- loss ----


def _flat_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(M, K) predictions of the M corrupted patches -> scalar mean loss: cross-entropy against (M,) classes,
    or mean squared error per patch against (M, K) values."""
    predictions = predictions.float()  # the loss in fp32 even when the head ran in bf16
    if targets.dtype.is_floating_point:
        return (predictions - targets).pow(2).mean(dim=1).mean()
    return F.cross_entropy(predictions, targets)


def masked_loss(predictions: torch.Tensor, targets: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """The loss over the corrupted patches only.

    predictions (B, N, K); targets (B, N) class indices (cross-entropy) or (B, N, K) values (per-patch MSE);
    corrupted (B, N) bool. Returns the mean over the corrupted patches; with none, a zero that keeps the graph.
    """
    if predictions.shape[:2] != corrupted.shape or targets.shape[:2] != corrupted.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)}, targets {tuple(targets.shape)} and corrupted "
            f"{tuple(corrupted.shape)} must share the leading (B, N)"
        )
    if not corrupted.any():
        return predictions.sum() * 0.0
    return _flat_loss(predictions[corrupted], targets[corrupted])  # (M, K) against (M,) or (M, K)


# ---- the objective ----


class MaskedPatchPrediction(nn.Module):
    """The MPP objective: owns the [mask] embedding and the prediction head; the encoder is the model itself.

    `mean` / `std` are the per-channel normalisation the data pipeline applied: images arrive normalised,
    and the targets are computed on them undone (and clamped to [0, 1]).
    """

    def __init__(
        self,
        width: int,
        in_chans: int,
        patch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        target: str = "colour",
        bits: int = 3,
        rate: float = 0.5,
        split: Sequence[float] = (0.8, 0.1, 0.1),
        downsize: int = 4,
    ):
        super().__init__()
        for key, value in {"width": width, "in_chans": in_chans, "patch_size": patch_size}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if target not in TARGETS:
            raise ValueError(f"unknown MPP target {target!r}; choose one of {TARGETS}")
        self.width, self.in_chans, self.patch_size, self.target = width, in_chans, patch_size, target
        self.bits = _check_bits(bits)
        self.rate = _check_rate(rate)
        self.split = _check_split(split)
        self.downsize = downsize
        if target == "colour":
            outputs = (2**bits) ** in_chans
        elif target == "downsized":
            _check_downsize(downsize, patch_size)
            outputs = in_chans * downsize * downsize
        else:
            outputs = in_chans * patch_size * patch_size

        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != in_chans or std_t.numel() != in_chans:
            raise ValueError(
                f"mean {list(mean)!r} and std {list(std)!r} must give one value per channel ({in_chans} channels)"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {list(std)!r}")
        # Not persistent: configuration (rebuilt from the arguments), not learned state.
        self.register_buffer("mean", mean_t.view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, in_chans, 1, 1), persistent=False)

        self.mask_embedding = nn.Parameter(torch.empty(width))
        nn.init.normal_(self.mask_embedding, std=0.02)
        self.head = nn.Linear(width, outputs)
        # Not zero like a classifier head: a zero head would pass no gradient to the encoder on the first step.
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def noise_shape(num_patches: int) -> tuple[int, int]:
        """Shape of the uniform noise one image needs: (N, 3) -- which patches, how, and from where."""
        return (num_patches, 3)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, N) colour classes, or (B, N, K) values for L2 targets."""
        _check_images(images, self.patch_size)
        if images.shape[1] != self.in_chans:
            raise ValueError(f"the objective was built for {self.in_chans}-channel images, got {images.shape[1]}")
        with torch.no_grad():
            images_01 = (images.float() * self.std + self.mean).clamp(0.0, 1.0)  # (B, C, H, W)
            if self.target == "colour":
                return colour_targets(images_01, self.patch_size, self.bits)
            if self.target == "downsized":
                return downsized_targets(images_01, self.patch_size, self.downsize)
            return pixel_targets(images_01, self.patch_size)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this objective cannot train: PatchDropout on, or another width, channel count or patch."""
        cfg = model.cfg
        if cfg.stem_layers is not None:
            raise ValueError(
                f"the model is a hybrid ({cfg.name or 'a ResNet stem'}): its tokens are patches of a feature map, not "
                "of the image, so they have no colour to predict; pretrain a plain ViT with MPP"
            )
        if cfg.patch_dropout > 0:
            raise ValueError(
                f"the model has patch_dropout {cfg.patch_dropout}: PatchDropout would drop some of the corrupted "
                "patches MPP must predict; set patch_dropout 0 for MPP pretraining"
            )
        for key in ("width", "in_chans", "patch_size"):
            if getattr(cfg, key) != getattr(self, key):
                raise ValueError(
                    f"the model's {key} is {getattr(cfg, key)} but the MPP objective was built for {getattr(self, key)}"
                )

    def forward(self, model: nn.Module, images: torch.Tensor, noise: torch.Tensor) -> MPPOutput:
        """Corrupt, encode and score one batch: images (B, C, H, W) normalised, noise (B, N, 3) uniform."""
        self.check_model(model)
        targets = self.targets(images)  # (B, N) or (B, N, K); also checks the image size
        patches, grid = model.embed_patches(images)  # (B, N, D)
        corruption = corrupt_patches(patches, noise, self.mask_embedding, self.rate, self.split)  # checks noise
        tokens = model.encode(corruption.patches, grid)  # (B, T, D)
        patch_tokens = tokens[:, model.cfg.num_prefix_tokens:]  # (B, N, D)
        # Only the corrupted tokens go through the head: the loss ignores the others.
        corrupted = corruption.corrupted
        predictions = self.head(patch_tokens[corrupted])  # (M, K)
        wanted = targets[corrupted]  # (M,) or (M, K)
        loss = _flat_loss(predictions, wanted)
        # Counts stay tensors: reading them here (.item()) would break a compiled graph at every step.
        correct = torch.zeros((), dtype=torch.long, device=loss.device)
        if self.target == "colour":
            correct = (predictions.detach().argmax(dim=1) == wanted).sum()
        return MPPOutput(loss, corrupted.sum(), correct)

    def extra_repr(self) -> str:
        return (f"target={self.target!r}, bits={self.bits}, rate={self.rate}, split={self.split}, "
                f"outputs={self.head.out_features}, downsize={self.downsize}")


__all__ = [
    "TARGETS", "UNTOUCHED", "MASKED", "REPLACED", "KEPT", "Corruption", "MPPOutput", "MaskedPatchPrediction",
    "colour_targets", "corrupt_patches", "corrupted_per_image", "downsized_targets", "masked_loss", "pixel_targets",
]
