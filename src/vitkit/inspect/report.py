"""`write_inspection`: run the chosen inspection analyses on a model and write their figures and arrays.

Nothing is written unless everything succeeds: the inputs are checked first, the arrays are computed, then the
figures and `arrays.npz` are written into a temporary directory beside `out_dir`, which is renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitkit.atomic import atomic_path, current_umask
from vitkit.inspect import figures
from vitkit.inspect.analysis import (
    attention_distance_from_maps,
    capture_attention,
    check_images,
    embedding_filters,
    image_grid,
    pos_embed_similarity,
    rollout_from_maps,
)

ANALYSES = ("filters", "pos_embed", "attention_distance", "rollout")
"""The analyses `write_inspection` knows, each written as `<name>.png`."""
ALL = ANALYSES
NEEDS_IMAGES = ("attention_distance", "rollout")
ARRAYS_FILE = "arrays.npz"


def check_analyses(analyses: str | Iterable[str]) -> tuple[str, ...]:
    """A name or names of analyses -> a tuple of distinct known names in the given order; ValueError otherwise."""
    names = (analyses,) if isinstance(analyses, str) else tuple(analyses)
    if not names:
        raise ValueError(f"no analyses asked for: choose from {list(ANALYSES)}")
    for name in names:
        if name not in ANALYSES:
            raise ValueError(f"unknown analysis {name!r}: the known analyses are {list(ANALYSES)}")
    return tuple(dict.fromkeys(names))


def _check_stats(name: str, values: Sequence[float] | None, channels: int, positive: bool) -> None:
    if values is None:
        return
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.shape[0] not in (1, channels):
        raise ValueError(f"{name} must hold 1 or {channels} values (one per channel), got {flat.shape[0]}: "
                         f"{flat.tolist()}")
    if not np.isfinite(flat).all() or (positive and (flat <= 0).any()):
        raise ValueError(f"{name} must be finite{' and positive' if positive else ''}, got {flat.tolist()}")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`: one rename when `out` is absent or empty, else each file
    renamed in turn (each rename atomic; files of `out` with other names stay)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        try:
            os.replace(tmp, out)  # POSIX rename(2) replaces an empty directory in one step
            return
        except OSError:
            pass  # e.g. Windows: fall back to moving the files
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


def write_inspection(model: nn.Module, images: torch.Tensor | None, out_dir: str | os.PathLike,
                     analyses: str | Iterable[str] = ALL, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> dict[str, Path]:
    """Compute `analyses` for `model` and write `<name>.png` for each, plus `arrays.npz`, into `out_dir`.

    analyses: any of "filters" (figure 7 left), "pos_embed" (figure 7 centre), "attention_distance" (figure 7
    right) and "rollout" (figure 6); the last two need `images` (B, C, H, W), normalised as the model expects;
    `mean`/`std` (per channel) only denormalise them for display.

    arrays.npz holds, by analysis: filters_components (k, C, P, P), filters_variance_ratio (k,);
    pos_embed_similarity (gh, gw, gh, gw); attention_distance (L, h) in pixels; rollout_maps (B, gh, gw),
    rollout_matrices (B, T, T), rollout_source (0-d string).

    The full set leaves "pos_embed" out for a model that adds no position embedding (pos_embed "none" or
    "relative"); asked for with fewer, it is a ValueError.

    Every input is checked before anything is written (ValueError naming the bad value: an unknown analysis,
    images the model cannot take or an empty batch, mean/std of the wrong length, `out_dir` an existing file);
    then the output is built in a temporary directory beside `out_dir` and renamed into place, so a failure
    leaves no partial output. An existing non-empty `out_dir` keeps its other files; files of the same names are
    replaced, each atomically. Returns the written paths by name ("filters", ..., "arrays").
    """
    names = check_analyses(analyses)
    cfg = model.cfg
    if "pos_embed" in names and cfg.pos_embed in ("none", "relative"):
        if set(names) != set(ANALYSES):
            raise ValueError(f"the pos_embed analysis needs a position embedding, and this model adds none "
                             f"(pos_embed={cfg.pos_embed!r}): leave it out of the analyses")
        names = tuple(name for name in names if name != "pos_embed")  # the full set: all that apply
    if any(name in NEEDS_IMAGES for name in names):
        if images is None:
            raise ValueError(f"the analyses {[n for n in names if n in NEEDS_IMAGES]} need images, got None")
        images = check_images(model, images)
    _check_stats("mean", mean, cfg.in_chans, positive=False)
    _check_stats("std", std, cfg.in_chans, positive=True)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")

    arrays: dict[str, np.ndarray] = {}
    if "filters" in names:
        arrays["filters_components"], arrays["filters_variance_ratio"] = embedding_filters(model)
    if "pos_embed" in names:
        arrays["pos_embed_similarity"] = pos_embed_similarity(model)
    rollout = None
    if any(name in NEEDS_IMAGES for name in names):
        attn = capture_attention(model, images)  # once for both analyses: L x (B, h, T, T)
        grid = image_grid(model, images)
        if "attention_distance" in names:
            arrays["attention_distance"] = attention_distance_from_maps(attn, grid, cfg.total_stride,
                                                                        cfg.num_prefix_tokens)
        if "rollout" in names:
            rollout = rollout_from_maps(attn, cfg.num_prefix_tokens, grid)
            arrays["rollout_maps"], arrays["rollout_matrices"] = rollout.maps, rollout.matrices
            arrays["rollout_source"] = np.array(rollout.source)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # it becomes `out`: the mode mkdir would have given, not mkdtemp's
        for name in names:
            path = tmp / f"{name}.png"
            if name == "filters":
                figures.plot_embedding_filters(arrays["filters_components"], arrays["filters_variance_ratio"], path)
            elif name == "pos_embed":
                figures.plot_pos_embed_similarity(arrays["pos_embed_similarity"], path)
            elif name == "attention_distance":
                figures.plot_attention_distance(arrays["attention_distance"], path)
            else:
                figures.plot_rollout(images, rollout.maps, rollout.source, path, mean=mean, std=std)
        with atomic_path(tmp / ARRAYS_FILE) as part, open(part, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append ".npz" to a path
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = {name: out / f"{name}.png" for name in names}
    written["arrays"] = out / ARRAYS_FILE
    return written
