"""Safe decoding of one image file (`load_image`), or of its bytes (`decode_image`), into a uint8 tensor (C, H, W).

Whatever a collection of user images holds (empty or truncated files, text saved as `.jpg`, CMYK
JPEGs, palettes with a transparent colour, 16-bit scans, phone photos stored sideways, files of a
billion pixels) ends either in a tensor or in `BadImageError` naming the file and the reason.
The full decode happens inside the error handling: Pillow opens lazily, and a truncated file only
fails when its pixels are read.

Conversions to the requested mode ("L" grey or "RGB"):
- transparency (an alpha channel, or a transparent palette entry or colour key) is composited on a
  white background, as an image viewer shows it, instead of being dropped (which would expose
  whatever colour the transparent pixels happen to store);
- 16-bit and 32-bit integer grey ("I;16", "I") is rescaled from 0..65535 to 0..255, rounding half up
  (65535 -> 255, 32768 -> 128), not clamped at 255; float grey ("F") is taken to be in [0, 1];
- CMYK, YCbCr and palette images go through Pillow's conversions; RGB -> L uses ITU-R 601-2 luma;
- the EXIF orientation tag is applied, so a photo is seen the way up it was taken.

Decompression bombs: an image with more pixels than `max_pixels` is refused before its pixels are
decoded. The limit is, in order: the `max_pixels` argument, the environment variable
VITKIT_MAX_IMAGE_PIXELS, Pillow's `Image.MAX_IMAGE_PIXELS` (89,478,485 unless changed).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from vitkit.data.errors import BadImageError

MAX_PIXELS_ENV = "VITKIT_MAX_IMAGE_PIXELS"
MODES = {"L": 1, "RGB": 3}

_HIGH_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
GREY_MODES = ("1", "L", "LA", "La", "F", *_HIGH_BIT_GREY)

# Pillow's own bomb check reads a module global; raising it for one call has to exclude other threads.
_PILLOW_LIMIT_LOCK = threading.Lock()


def max_image_pixels(max_pixels: int | None = None) -> int | None:
    """The pixel limit in force: the argument, else $VITKIT_MAX_IMAGE_PIXELS, else Pillow's (None: no limit)."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return Image.MAX_IMAGE_PIXELS
        try:
            max_pixels = int(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"{MAX_PIXELS_ENV}={text!r} is not a whole number of pixels") from None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive whole number of pixels, got {max_pixels!r}")
    return max_pixels


def bomb_reason(width: int, height: int, limit: int) -> str:
    return (f"{width}x{height} = {width * height:,} pixels is over the limit of {limit:,} pixels "
            "(a guard against decompression bombs). If you trust this file, raise the limit with "
            f"max_pixels=N or the environment variable {MAX_PIXELS_ENV}=N")


@contextlib.contextmanager
def _pillow_allows(limit: int | None):
    """Let Pillow open and decode images up to `limit` pixels; our own check does the refusing."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if pillow_limit is None or (limit is not None and limit <= pillow_limit):
            yield
            return
        with _PILLOW_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = limit
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit


def _stored_size(source: str | io.BytesIO) -> tuple[int, int] | None:
    """(width, height) as the header states it, read with Pillow's own guard off (no pixel is decoded)."""
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with _pillow_allows(None), Image.open(source) as img:
            return img.size
    except Exception:
        return None


def _pillow_bomb_reason(source: str | io.BytesIO, error: Exception, limit: int | None) -> str:
    """The reason for a refusal by Pillow's own guard (at twice its limit), in the same words as ours.

    Whether Pillow or vitkit refuses a file depends on how the limits compare; the reason should not:
    it names the image's size and the limit in force, whichever found it.
    """
    size = _stored_size(source)
    if size is not None and limit is not None and size[0] * size[1] > limit:
        return bomb_reason(size[0], size[1], limit)
    # Not the stored size (an animation frame larger than the first, say): Pillow's words, and the way out.
    return (f"{error} If you trust this file, raise the limit with max_pixels=N or the environment variable "
            f"{MAX_PIXELS_ENV}=N")


def _check_file(path: str) -> None:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadImageError(path, "no such file") from None
    except OSError as error:
        raise BadImageError(path, f"cannot access the file ({error.strerror or error})") from None
    if os.path.isdir(path):
        raise BadImageError(path, "is a directory, not an image file")
    if size == 0:
        raise BadImageError(path, "the file is empty (0 bytes)")


def _describe(error: Exception) -> str:
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image format Pillow recognises (is it an image at all?)"
    text = str(error).strip() or "no detail given"
    return f"{type(error).__name__}: {text}"


def _rescale_high_bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer grey 0..65535 -> 8-bit 0..255, rounding half up; values outside are clipped."""
    values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 510 + 65535) // 131070).astype(np.uint8), "L")


def _rescale_float(img: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
    return Image.fromarray(np.floor(np.clip(values, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), "L")


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _convert(img: Image.Image, mode: str) -> Image.Image:
    if img.mode in _HIGH_BIT_GREY:
        img = _rescale_high_bit(img)
    elif img.mode == "F":
        img = _rescale_float(img)
    elif _has_transparency(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != mode:
        img = img.convert(mode)
    return img


def _to_tensor(img: Image.Image) -> torch.Tensor:
    array = np.array(img, dtype=np.uint8)  # a copy: Pillow's buffer is read-only
    tensor = torch.from_numpy(array)
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)  # (1, H, W)
    return tensor.permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W)


def load_image(path: str | os.PathLike, mode: str = "RGB", *, max_pixels: int | None = None) -> torch.Tensor:
    """Decode the image file at `path` into a uint8 tensor (C, H, W): C = 1 for mode "L", 3 for "RGB".

    Raises BadImageError (a ValueError) naming the file and the reason when the file is missing,
    empty, truncated, not an image, in a colour mode with no conversion, or has more than
    `max_pixels` pixels (see the module docstring for the default and how to raise it).
    """
    _check_mode(mode)
    path = os.fspath(path)
    limit = max_image_pixels(max_pixels)
    _check_file(path)
    return _decode(path, path, mode, limit)


def decode_image(data: bytes, mode: str = "RGB", *, name: str = "<bytes>",
                 max_pixels: int | None = None) -> torch.Tensor:
    """`load_image` for an image file's bytes held in memory (an upload, say); errors name it `name`."""
    _check_mode(mode)
    limit = max_image_pixels(max_pixels)
    if not data:
        raise BadImageError(name, "the data is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, mode, limit)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")


def _decode(source: str | io.BytesIO, name: str, mode: str, limit: int | None) -> torch.Tensor:
    try:
        with _pillow_allows(limit), Image.open(source) as img:
            width, height = img.size
            if limit is not None and width * height > limit:
                raise BadImageError(name, bomb_reason(width, height, limit))
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _to_tensor(_convert(upright, mode))
    except BadImageError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's guard, on opening or on a later frame
        raise BadImageError(name, _pillow_bomb_reason(source, error, limit)) from error
    except MemoryError as error:
        raise BadImageError(name, "decoding it ran out of memory") from error
    except Exception as error:  # Pillow reports corrupt data as OSError, SyntaxError, ValueError, struct.error, ...
        raise BadImageError(name, _describe(error)) from error


def read_header(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[tuple[int, int], str]:
    """((H, W), Pillow mode) of an image file from its header alone, without decoding the pixels.

    The size is as stored: an EXIF orientation that turns the image is applied only by load_image.
    Raises BadImageError for missing, empty, unrecognised and over-limit files.
    """
    path = os.fspath(path)
    limit = max_image_pixels(max_pixels)
    _check_file(path)
    try:
        with _pillow_allows(limit), Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except Image.DecompressionBombError as error:
        raise BadImageError(path, _pillow_bomb_reason(path, error, limit)) from error
    except Exception as error:
        raise BadImageError(path, _describe(error)) from error
    if limit is not None and width * height > limit:
        raise BadImageError(path, bomb_reason(width, height, limit))
    return (height, width), mode
