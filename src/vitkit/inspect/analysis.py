"""The paper's inspection analyses (Dosovitskiy et al. 2020, section 4.5, figures 6-7, appendix D.7-D.8) as arrays.

Shapes: B images, C channels, H x W image, P patch, (gh, gw) patch grid, N = gh * gw patches,
T = prefix + N tokens (prefix 1 with a class token, 0 for "gap" pooling), D width, L blocks, h heads.

Everything here returns numpy arrays (float64 unless said otherwise) and draws nothing: figures.py plots them.
The `*_from_maps` functions take attention weights directly, so forced attention patterns can be analysed
without a model; the model-level functions capture the weights with `ViT.forward_intermediates`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.model import check_image_size

HEAD_FUSIONS = ("mean", "max", "min")
SOURCE_CLASS_TOKEN = "class token"
SOURCE_PATCH_MEAN = "mean of patch-token rows"

AttentionMaps = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]
"""Attention weights of L blocks: an (L, B, h, T, T) array, or a list of L (B, h, T, T) arrays."""


class Rollout(NamedTuple):
    """What `attention_rollout` and `rollout_from_maps` return."""

    maps: np.ndarray
    """(B, gh, gw) rolled-out attention over the patches: the class token's row over the patch columns,
    or (no class token) the mean of the patch tokens' rows over the patch columns. Not renormalised."""
    matrices: np.ndarray
    """(B, T, T) rollout matrices A'_L @ ... @ A'_1; every row sums to 1."""
    source: str
    """Which rows the maps come from: "class token" or "mean of patch-token rows"."""


# ---- inputs ----


def check_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Check that `model` can take `images` (B, C, H, W) before anything runs; return them as a float tensor.

    Raises ValueError, naming the offending value, for: not a 4-D tensor, an empty batch, a channel count other
    than `model.cfg.in_chans`, a height or width that is not a positive multiple of the patch size, or
    non-finite values. A size other than `model.cfg.img_size` is fine: the model resamples its position table.
    """
    if isinstance(images, np.ndarray):
        images = torch.tensor(images)  # a copy: the array may be read-only
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if b == 0:
        raise ValueError(f"the image batch is empty (shape {tuple(images.shape)}): give at least one image")
    cfg = model.cfg
    if c != cfg.in_chans:
        raise ValueError(f"the model takes {cfg.in_chans}-channel images but the images have {c} channels "
                         f"(shape {tuple(images.shape)})")
    p = cfg.total_stride  # pixels per token: the patch size, times the ResNet's stride in a hybrid
    if h < p or w < p:
        raise ValueError(f"image size {h}x{w} is smaller than one {p}x{p} patch of the model")
    check_image_size((h, w), cfg.patch_size, stem_stride=cfg.stem_stride)
    if not images.is_floating_point():
        images = images.float()
    if not torch.isfinite(images).all():
        raise ValueError("the images contain NaN or infinite values")
    return images


def image_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """The (gh, gw) patch grid the model cuts `images` (B, C, H, W) into."""
    p = model.cfg.total_stride
    return images.shape[-2] // p, images.shape[-1] // p


def check_class_token(model: nn.Module) -> None:
    """Raise ValueError if `model` has no class token (pool "gap")."""
    if model.cfg.num_prefix_tokens == 0:
        raise ValueError(f"require_class_token=True but the model has no class token (pool={model.cfg.pool!r}); "
                         f"pass require_class_token=False to use the mean of the patch-token rows instead")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Dropout and drop-path would make the weights random; restore each submodule's own flag afterwards.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def capture_attention(model: nn.Module, images: torch.Tensor, blocks: list[int] | None = None) -> list[torch.Tensor]:
    """(B, C, H, W) images -> list of (B, h, T, T) float64 CPU softmax attention weights, one per block.

    `blocks` are block indices as in `ViT.forward_intermediates` (None: all). Runs in eval mode under
    torch.no_grad() and restores the model's training flags afterwards.
    """
    images = check_images(model, images)
    param = model.patch_embed.proj.weight
    with _eval_mode(model):
        out = model.forward_intermediates(images.to(device=param.device, dtype=param.dtype), blocks=blocks,
                                          attention=True)
    return [a.detach().to(device="cpu", dtype=torch.float64) for a in out.attention]


def _as_layers(attn: AttentionMaps) -> list[torch.Tensor]:
    """Attention of L blocks -> list of L (B, h, T, T) float64 tensors, checked for matching shapes."""
    if isinstance(attn, (torch.Tensor, np.ndarray)):
        if attn.ndim != 5:
            raise ValueError(f"attention must be (L, B, h, T, T) or a list of (B, h, T, T), got shape "
                             f"{tuple(attn.shape)}")
        attn = list(attn)
    layers = [a.detach().to(device="cpu", dtype=torch.float64) if isinstance(a, torch.Tensor)
              else torch.tensor(np.asarray(a), dtype=torch.float64) for a in attn]  # tensor(): a copy
    if not layers:
        raise ValueError("no attention maps given: need at least one block's (B, h, T, T) weights")
    first = tuple(layers[0].shape)
    for i, a in enumerate(layers):
        if a.ndim != 4 or a.shape[-1] != a.shape[-2] or tuple(a.shape) != first:
            raise ValueError(f"attention of block {i} has shape {tuple(a.shape)}; every block needs the same "
                             f"(B, h, T, T) shape, block 0 has {first}")
    return layers


def _check_tokens(tokens: int, grid: tuple[int, int], num_prefix_tokens: int) -> None:
    gh, gw = grid
    if tokens != num_prefix_tokens + gh * gw:
        raise ValueError(f"attention over {tokens} tokens does not match {num_prefix_tokens} prefix tokens plus a "
                         f"{gh}x{gw} patch grid ({num_prefix_tokens + gh * gw} tokens)")


# ---- figure 7 left: patch-embedding filters ----


def embedding_filters(model: nn.Module, k: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal components of the patch-embedding filters (figure 7, left).

    Each of the D filters of `model.patch_embed.proj.weight` (D, C, P, P) is flattened to C*P*P values (for a
    hybrid, whose projection sees a feature map, the filters that see pixels: the 64 of the ResNet's 7x7 root
    convolution, as stored, before their weight standardisation);
    the filters are centred (their mean filter subtracted) and the components come from an SVD of the
    centred (D, C*P*P) matrix. k is clipped to the rank available, min(D, C*P*P) (centring leaves at most
    D - 1 non-zero variances, so with D <= C*P*P the last ratio is 0). Each component's sign is fixed so
    that its largest-magnitude entry is positive.

    Returns (components (k, C, P, P), explained variance ratio (k,)): a component's share of the total
    variance of all filters, largest first.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    weight = _pixel_filters(model).detach().to(device="cpu", dtype=torch.float64).numpy()  # (D, C, P, P)
    d, c, p, _ = weight.shape
    flat = weight.reshape(d, c * p * p)  # (D, C*P*P): one row per filter
    centred = flat - flat.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)  # vt (min(D, CPP), CPP)
    k = min(k, d, c * p * p)
    variance = singular**2
    total = variance.sum()
    ratio = variance[:k] / total if total > 0 else np.zeros(k)
    components = vt[:k].copy()  # (k, CPP)
    peak = np.abs(components).argmax(axis=1)  # (k,)
    signs = np.sign(components[np.arange(k), peak])
    components *= np.where(signs == 0, 1.0, signs)[:, None]
    return components.reshape(k, c, p, p), ratio  # (k, C, P, P), (k,)


def _pixel_filters(model: nn.Module) -> torch.Tensor:
    """(D, C, P, P) weights of the first layer that sees the pixels."""
    if model.cfg.stem_layers is None:
        return model.patch_embed.proj.weight
    backbone = model.patch_embed.backbone
    return (backbone.stem if hasattr(backbone, "stem") else backbone).conv.weight  # the root block's 7x7 conv


# ---- figure 7 centre: position-embedding similarity ----


def pos_embed_similarity(model: nn.Module) -> np.ndarray:
    """(gh, gw, gh, gw) cosine similarity of each patch position's embedding with every other (figure 7, centre).

    `sim[i, j]` is the (gh, gw) map of position (i, j)'s similarity to every position; the class-token entry is
    left out. The grid is the model's trained `cfg.grid_size`; the embedding is what the model adds to its tokens
    there (`pos_embed_for`), so the 2D and sin-cos kinds are compared on the same footing as the learned one.
    """
    gh, gw = model.cfg.grid_size
    prefix = model.cfg.num_prefix_tokens
    with torch.no_grad():
        added = model.pos_embed_for((gh, gw))  # (1, T, D) or None
    if added is None:
        raise ValueError(f"the model adds no position embedding to its tokens (pos_embed={model.cfg.pos_embed!r}): "
                         "there is no table to compare")
    table = added.detach().to(device="cpu", dtype=torch.float64)[0, prefix:]  # (N, D)
    if table.shape[0] != gh * gw:
        raise ValueError(f"pos_embed holds {table.shape[0]} patch positions, the {gh}x{gw} grid needs {gh * gw}")
    unit = F.normalize(table, dim=1, eps=1e-12)  # (N, D)
    return (unit @ unit.T).numpy().reshape(gh, gw, gh, gw)  # (N, N) -> (gh, gw, gh, gw)


def pos_embed_grid_correlation(model: nn.Module) -> float:
    """How much 2D structure a position embedding holds: the Pearson correlation, over all pairs of distinct
    patch positions, between their embeddings' cosine similarity and minus their distance on the grid.

    Near 1: positions close on the grid have similar embeddings, as figure 7 (centre) shows for a trained 1D
    embedding; near 0: no relation, as for a random initialisation.
    """
    similarity = pos_embed_similarity(model)  # (gh, gw, gh, gw)
    gh, gw = similarity.shape[:2]
    centres = patch_centres((gh, gw), 1)  # (N, 2) grid coordinates
    distance = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)  # (N, N)
    pairs = ~np.eye(gh * gw, dtype=bool)
    return float(np.corrcoef(similarity.reshape(gh * gw, gh * gw)[pairs], -distance[pairs])[0, 1])


# ---- figure 7 right: mean attention distance ----


def patch_centres(grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(N, 2) pixel coordinates (row, column) of the patch centres, patches in row-major token order."""
    gh, gw = grid
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # each (gh, gw)
    return (np.stack([rows.ravel(), cols.ravel()], axis=1) + 0.5) * patch_size  # (N, 2)


def attention_distance_from_maps(attn: AttentionMaps, grid: tuple[int, int], patch_size: int,
                                 num_prefix_tokens: int) -> np.ndarray:
    """(L, h) mean attention distance in pixels from attention weights (L, B, h, T, T) or L x (B, h, T, T).

    For query patch i of a head, distance_i = sum_j a_ij * ||c_i - c_j||, with c the patch centres in pixels
    (patch_size times the grid distance) and j running over the patch keys only. Choice made here: the class
    token's row and column are left out, and the weights a_ij are the head's attention restricted to the patch
    keys, renormalised to sum to 1 over them (a query that puts all its weight on the class token contributes
    0). distance_i is averaged over the query patches and the images.
    """
    layers = _as_layers(attn)
    _check_tokens(layers[0].shape[-1], grid, num_prefix_tokens)
    centres = torch.from_numpy(patch_centres(grid, patch_size))  # (N, 2)
    dist = torch.cdist(centres, centres)  # (N, N) pixels
    out = []
    for a in layers:
        patch = a[..., num_prefix_tokens:, num_prefix_tokens:]  # (B, h, N, N): patch queries, patch keys
        patch = patch / patch.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        per_query = (patch * dist).sum(dim=-1)  # (B, h, N)
        out.append(per_query.mean(dim=(0, 2)))  # (h,)
    return torch.stack(out).numpy()  # (L, h)


def mean_attention_distance(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """(L, h) mean attention distance in pixels of each block and head over `images` (B, C, H, W) (figure 7, right).

    The paper's "attention distance", analogous to receptive field size: see `attention_distance_from_maps` for
    the definition (attention restricted to the patch keys and renormalised over them; class token left out).
    """
    images = check_images(model, images)
    attn = capture_attention(model, images)
    return attention_distance_from_maps(attn, image_grid(model, images), model.cfg.total_stride,
                                        model.cfg.num_prefix_tokens)


# ---- figure 6 and appendix D.8: attention rollout ----


def _fuse_heads(a: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(B, h, T, T) -> (B, T, T)."""
    if head_fusion == "mean":
        return a.mean(dim=1)
    if head_fusion == "max":
        return a.amax(dim=1)
    return a.amin(dim=1)


def rollout_from_maps(attn: AttentionMaps, num_prefix_tokens: int, grid: tuple[int, int] | None = None,
                      head_fusion: str = "mean", discard_ratio: float = 0.0,
                      require_class_token: bool = False) -> Rollout:
    """Attention rollout (Abnar & Zuidema 2020) of attention weights (L, B, h, T, T) or L x (B, h, T, T).

    Per block: A = the heads fused by `head_fusion` ("mean" as in the paper, or "max"/"min"), (B, T, T); with
    `discard_ratio` > 0, the smallest that fraction of each row's weights is set to 0 (never the diagonal);
    A' = A + I with every row renormalised to sum to 1 (the residual connection). The rollout is
    A'_L @ ... @ A'_1 (block 1 applied first). The map is the class token's row (token 0) over the patch
    columns; without a class token (num_prefix_tokens 0) it is the mean of the patch tokens' rows, and
    `source` says which. `grid` (gh, gw) shapes the maps; None means a square grid.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    if num_prefix_tokens == 0 and require_class_token:
        raise ValueError("require_class_token=True but num_prefix_tokens is 0: there is no class token")
    layers = _as_layers(attn)
    b, _, t, _ = layers[0].shape
    n = t - num_prefix_tokens
    if grid is None:
        side = math.isqrt(max(n, 0))
        if side * side != n:
            raise ValueError(f"{n} patch tokens do not make a square grid: pass grid=(gh, gw)")
        grid = (side, side)
    _check_tokens(t, grid, num_prefix_tokens)
    eye = torch.eye(t, dtype=torch.float64)  # (T, T)
    rollout = eye.expand(b, t, t).clone()  # (B, T, T)
    for a in layers:
        fused = _fuse_heads(a, head_fusion)  # (B, T, T)
        drop = int(t * discard_ratio)
        if drop:
            # Rank each row's weights, the diagonal forced to the top so the residual path is never dropped.
            ranked = fused.masked_fill(eye.bool(), math.inf).argsort(dim=-1)  # (B, T, T) ascending
            fused = fused.scatter(-1, ranked[..., :drop], 0.0)
        step = fused + eye
        step = step / step.sum(dim=-1, keepdim=True)
        rollout = step @ rollout  # (B, T, T): this block after all earlier ones
    if num_prefix_tokens:
        flat, source = rollout[:, 0, num_prefix_tokens:], SOURCE_CLASS_TOKEN  # (B, N)
    else:
        flat, source = rollout.mean(dim=1), SOURCE_PATCH_MEAN  # (B, N)
    return Rollout(flat.reshape(b, *grid).numpy(), rollout.numpy(), source)  # maps (B, gh, gw)


def attention_rollout(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      require_class_token: bool = False) -> Rollout:
    """Attention rollout of `images` (B, C, H, W) through every block of `model` (figure 6, appendix D.8).

    Returns `Rollout(maps (B, gh, gw), matrices (B, T, T), source)`: see `rollout_from_maps` for the method.
    A model without a class token (pool "gap") gets the mean of the patch tokens' rows, source
    "mean of patch-token rows", unless `require_class_token` is True, which raises ValueError instead.
    """
    if require_class_token:
        check_class_token(model)
    images = check_images(model, images)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    attn = capture_attention(model, images)
    return rollout_from_maps(attn, model.cfg.num_prefix_tokens, image_grid(model, images), head_fusion,
                             discard_ratio)


def last_layer_attention(model: nn.Module, images: torch.Tensor, require_class_token: bool = False) -> np.ndarray:
    """(B, h, gh, gw) raw attention of each head of the last block over the patches (appendix D.8 style).

    The class token's row over the patch columns, as the softmax gave it (not renormalised over the patches);
    for a model without a class token, the mean of the patch tokens' rows (ValueError instead if
    `require_class_token`).
    """
    if require_class_token:
        check_class_token(model)
    images = check_images(model, images)
    (a,) = capture_attention(model, images, blocks=[-1])  # (B, h, T, T)
    prefix = model.cfg.num_prefix_tokens
    if prefix:
        flat = a[:, :, 0, prefix:]  # (B, h, N)
    else:
        flat = a[:, :, prefix:, prefix:].mean(dim=2)  # (B, h, N)
    return flat.reshape(*flat.shape[:2], *image_grid(model, images)).numpy()  # (B, h, gh, gw)


def upsample_map(attention_map: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw) map, or a (..., gh, gw) stack, to (H, W) (resp. (..., H, W))."""
    if isinstance(attention_map, torch.Tensor):
        x = attention_map.detach().cpu().double()
    else:
        x = torch.tensor(np.asarray(attention_map), dtype=torch.float64)
    if x.ndim < 2:
        raise ValueError(f"a map must be (gh, gw) or (..., gh, gw), got shape {tuple(x.shape)}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (H, W), got {tuple(size)}")
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])  # (M, 1, gh, gw)
    up = F.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False)  # (M, 1, H, W)
    return up.reshape(*lead, h, w).numpy()
