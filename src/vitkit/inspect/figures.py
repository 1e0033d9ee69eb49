"""Plots of the inspection analyses (figures 6-7 of the paper), one PNG per function.

Every figure is drawn on its own `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so
plotting neither needs a display nor changes the caller's backend or open figures. Each PNG has a fixed pixel
size (figure size in inches times DPI, no tight bounding box) given by the *_SIZE constants below, and is
written atomically (a temporary file renamed into place).

Image shapes: (C, H, W) with C 1 (shown in grey) or 3 (RGB); maps (gh, gw); see analysis.py for the rest.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitkit.atomic import atomic_path
from vitkit.inspect.analysis import SOURCE_CLASS_TOKEN, upsample_map

DPI = 100
FILTERS_SIZE = (1000, 800)
"""(width, height) in pixels of `plot_embedding_filters`' PNG."""
POS_EMBED_SIZE = (800, 800)
"""(width, height) in pixels of `plot_pos_embed_similarity`' PNG."""
DISTANCE_SIZE = (800, 600)
"""(width, height) in pixels of `plot_attention_distance`' PNG."""
ROLLOUT_SIZE = (1000, 500)
"""(width, height) in pixels of `plot_rollout`' PNG."""
PREDICTION_SIZE = (1200, 400)
"""(width, height) in pixels of `plot_prediction_explained`' PNG."""

OVERLAY_CMAP = "jet"
OVERLAY_ALPHA = 0.5


def _figure(size: tuple[int, int]) -> Figure:
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders with Agg whatever pyplot's backend is
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    # No bbox_inches="tight": it would crop the canvas and change the stated pixel size.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def display_image(image: np.ndarray | torch.Tensor, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> np.ndarray:
    """(C, H, W) image -> (H, W) grey or (H, W, 3) RGB in [0, 1] for imshow.

    With `mean` and `std` (one value per channel, or one for all) the image is denormalised (x * std + mean)
    and clipped to [0, 1]; without them it is min-max scaled. C other than 1 or 3: the channel mean, grey.
    """
    x = _numpy(image)
    if x.ndim != 3:
        raise ValueError(f"an image must be (C, H, W), got shape {x.shape}")
    c = x.shape[0]
    if mean is not None or std is not None:
        m = np.broadcast_to(np.asarray(0.0 if mean is None else mean, dtype=np.float64).reshape(-1), (c,))
        s = np.broadcast_to(np.asarray(1.0 if std is None else std, dtype=np.float64).reshape(-1), (c,))
        x = np.clip(x * s[:, None, None] + m[:, None, None], 0.0, 1.0)
    else:
        span = x.max() - x.min()
        x = (x - x.min()) / span if span > 0 else np.zeros_like(x)
    if c == 3:
        return x.transpose(1, 2, 0)  # (H, W, 3)
    return x.mean(axis=0)  # (H, W)


def _show_image(ax, shown: np.ndarray) -> None:
    if shown.ndim == 2:
        ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(shown)
    ax.set_axis_off()


def _show_overlay(ax, shown: np.ndarray, attention_map: np.ndarray) -> None:
    """The image with its (gh, gw) map upsampled to the image size and scaled to [0, 1] on top."""
    _show_image(ax, shown)
    up = upsample_map(attention_map, shown.shape[:2])  # (H, W)
    peak = up.max()
    up = up / peak if peak > 0 else up
    ax.imshow(up, cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)


def overlay_image(image: np.ndarray | torch.Tensor, attention_map: np.ndarray | torch.Tensor,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  min_side: int = 224) -> np.ndarray:
    """The image (C, H, W) with its (gh, gw) map over it, as one uint8 RGB picture (H', W', 3).

    The blend the figures draw (the map scaled to its peak, OVERLAY_CMAP at OVERLAY_ALPHA), without a figure
    around it. A small image is first enlarged by a whole factor to at least `min_side` pixels on its shorter
    side, by repeating pixels, so that a 28-pixel image stays sharp and the map over it stays smooth.
    """
    shown = display_image(image, mean, std)
    rgb = np.repeat(shown[..., None], 3, axis=2) if shown.ndim == 2 else shown  # (H, W, 3)
    factor = max(1, math.ceil(min_side / min(rgb.shape[:2])))
    rgb = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    up = upsample_map(_numpy(attention_map), rgb.shape[:2])  # (H', W')
    peak = up.max()
    up = up / peak if peak > 0 else up
    heat = colormaps[OVERLAY_CMAP](up)[..., :3]
    blend = (1.0 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * heat
    return np.round(np.clip(blend, 0.0, 1.0) * 255).astype(np.uint8)


def plot_embedding_filters(components: np.ndarray | torch.Tensor, variance_ratio: np.ndarray | torch.Tensor,
                           path: str | os.PathLike, title: str | None = None) -> None:
    """Figure 7 left: the k principal components (k, C, P, P) of the patch-embedding filters as tiles.

    One channel: grey, each tile on its own scale; three: RGB, min-max scaled per tile; other counts: the
    channel mean in grey. Each tile is titled with its explained variance ratio. PNG of FILTERS_SIZE pixels.
    """
    comps, ratio = _numpy(components), _numpy(variance_ratio).reshape(-1)
    if comps.ndim != 4 or comps.shape[0] != ratio.shape[0] or comps.shape[0] == 0:
        raise ValueError(f"need components (k, C, P, P) and k variance ratios, got shapes {comps.shape} and "
                         f"{ratio.shape}")
    k = comps.shape[0]
    cols = math.ceil(math.sqrt(k * FILTERS_SIZE[0] / FILTERS_SIZE[1]))
    rows = math.ceil(k / cols)
    fig = _figure(FILTERS_SIZE)
    axes = fig.subplots(rows, cols, squeeze=False)
    for idx, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if idx >= k:
            continue
        tile = comps[idx]  # (C, P, P)
        if tile.shape[0] == 3:
            span = tile.max() - tile.min()
            rgb = (tile - tile.min()) / span if span > 0 else np.zeros_like(tile)
            ax.imshow(rgb.transpose(1, 2, 0), interpolation="nearest")  # (P, P, 3)
        else:
            ax.imshow(tile.mean(axis=0), cmap="gray", interpolation="nearest")
        ax.set_title(f"{ratio[idx]:.1%}", fontsize=8)
    fig.suptitle(title or f"Principal components of the patch-embedding filters (top {k}, variance ratio)")
    _save(fig, path)


def plot_pos_embed_similarity(similarity: np.ndarray | torch.Tensor, path: str | os.PathLike,
                              title: str | None = None) -> None:
    """Figure 7 centre: a gh x gw grid of (gh, gw) heatmaps, tile (i, j) the cosine similarity of position
    (i, j)'s embedding with every position; one colour scale [-1, 1] for all, one colorbar.

    The tiles are drawn as one mosaic image with blank separators (one image, so a 24 x 24 grid draws as fast as
    a 7 x 7); rows and columns are numbered from 1 as in the paper. PNG of POS_EMBED_SIZE pixels.
    """
    sim = _numpy(similarity)
    if sim.ndim != 4 or sim.shape[:2] != sim.shape[2:]:
        raise ValueError(f"similarity must be (gh, gw, gh, gw), got shape {sim.shape}")
    gh, gw = sim.shape[:2]
    mosaic = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)  # tiles of (gh, gw) plus 1-cell gaps
    for i in range(gh):
        for j in range(gw):
            mosaic[i * (gh + 1):i * (gh + 1) + gh, j * (gw + 1):j * (gw + 1) + gw] = sim[i, j]
    cmap = colormaps["viridis"].with_extremes(bad="white")  # bad: the NaN gaps between tiles
    fig = _figure(POS_EMBED_SIZE)
    ax = fig.add_subplot()
    image = ax.imshow(mosaic, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([j * (gw + 1) + (gw - 1) / 2 for j in range(gw)], [str(j + 1) for j in range(gw)])
    ax.set_yticks([i * (gh + 1) + (gh - 1) / 2 for i in range(gh)], [str(i + 1) for i in range(gh)])
    ax.tick_params(length=0, labelsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
    ax.set_title(title or "Position embedding similarity")
    _save(fig, path)


def plot_attention_distance(distance: np.ndarray | torch.Tensor, path: str | os.PathLike,
                            title: str | None = None) -> None:
    """Figure 7 right: mean attention distance (L, h) in pixels, one dot per head, against the layer (1..L).

    Heads are coloured by index (legend up to 16 heads). PNG of DISTANCE_SIZE pixels.
    """
    dist = _numpy(distance)
    if dist.ndim != 2 or dist.size == 0:
        raise ValueError(f"distance must be (layers, heads), got shape {dist.shape}")
    layers, heads = dist.shape
    fig = _figure(DISTANCE_SIZE)
    ax = fig.add_subplot()
    colours = colormaps["tab20"] if heads > 10 else colormaps["tab10"]
    x = np.arange(1, layers + 1)
    for head in range(heads):
        ax.scatter(x, dist[:, head], s=24, color=colours(head % colours.N), label=f"head {head + 1}")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xlim(0.5, layers + 0.5)
    ax.set_ylim(0.0, max(float(dist.max()) * 1.1, 1e-9))
    ax.set_xticks(x if layers <= 32 else x[:: math.ceil(layers / 16)])
    ax.grid(True, alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title(title or "Mean attention distance per head")
    _save(fig, path)


def plot_rollout(images: np.ndarray | torch.Tensor, maps: np.ndarray | torch.Tensor, source: str,
                 path: str | os.PathLike, title: str | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, max_images: int = 8) -> None:
    """Figure 6: for each of the first `max_images` images (B, C, H, W), the image (top row) and its rollout map
    (B, gh, gw) upsampled over it (bottom row, scaled to its own maximum).

    `source` is the rollout's source ("class token" or "mean of patch-token rows"); the figure title always
    says which. `mean`/`std` denormalise the images (see `display_image`). PNG of ROLLOUT_SIZE pixels.
    """
    imgs, maps = _numpy(images), _numpy(maps)
    if imgs.ndim != 4 or maps.ndim != 3 or imgs.shape[0] != maps.shape[0] or imgs.shape[0] == 0:
        raise ValueError(f"need images (B, C, H, W) and maps (B, gh, gw) for the same B >= 1, got shapes "
                         f"{imgs.shape} and {maps.shape}")
    n = min(imgs.shape[0], max_images)
    fig = _figure(ROLLOUT_SIZE)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        shown = display_image(imgs[i], mean, std)
        _show_image(axes[0, i], shown)
        _show_overlay(axes[1, i], shown, maps[i])
    heading = f"Attention rollout from the {source}"
    fig.suptitle(f"{title}\n{heading}" if title else heading)
    _save(fig, path)


def plot_prediction_explained(image: np.ndarray | torch.Tensor, rollout_map: np.ndarray | torch.Tensor,
                              class_names: Sequence[str], probs: np.ndarray | torch.Tensor,
                              path: str | os.PathLike, title: str | None = None, top_k: int = 5,
                              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                              source: str = SOURCE_CLASS_TOKEN) -> None:
    """One prediction explained: the image (C, H, W), the image with its rollout map (gh, gw) over it, and a
    horizontal bar chart of the `top_k` class probabilities (`probs` (classes,), one name per class).

    PNG of PREDICTION_SIZE pixels.
    """
    p = _numpy(probs).reshape(-1)
    if len(class_names) != p.shape[0]:
        raise ValueError(f"{len(class_names)} class names for {p.shape[0]} probabilities")
    if p.shape[0] == 0:
        raise ValueError("probs is empty: need at least one class")
    amap = _numpy(rollout_map)
    if amap.ndim != 2:
        raise ValueError(f"rollout_map must be (gh, gw), got shape {amap.shape}")
    top = np.argsort(-p, kind="stable")[:max(1, min(top_k, p.shape[0]))]  # most probable first
    shown = display_image(image, mean, std)
    fig = _figure(PREDICTION_SIZE)
    ax_image, ax_overlay, ax_bars = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.4]})
    _show_image(ax_image, shown)
    ax_image.set_title("Input")
    _show_overlay(ax_overlay, shown, amap)
    ax_overlay.set_title(f"Attention rollout ({source})", fontsize=9)
    y = np.arange(top.shape[0])
    ax_bars.barh(y, p[top], color="tab:blue")
    ax_bars.set_yticks(y, [str(class_names[i]) for i in top])
    ax_bars.invert_yaxis()  # most probable on top
    ax_bars.set_xlim(0.0, 1.0)
    ax_bars.set_xlabel("Probability")
    for yi, value in zip(y, p[top]):
        ax_bars.text(min(value + 0.02, 0.85), yi, f"{value:.1%}", va="center", fontsize=8)
    fig.suptitle(title or f"Prediction: {class_names[top[0]]} ({p[top[0]]:.1%})")
    fig.subplots_adjust(wspace=0.35)
    _save(fig, path)
