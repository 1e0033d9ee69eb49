"""A corpus of awkward and broken image files, one of each kind vitkit must handle, with known answers.

`write_corpus(root)` writes them into two class folders, root/a and root/b, and returns what each must
give: the images that decode with their exact expected pixels, and the files that must be refused
with words their reason must contain. The decodable images are 2x2 (or, for two of them, a 1x1
image and a 100x100 one of one colour), so at image_size 2 their expected tensors need no resampling.

The 100x100 "bomb" holds 10,000 pixels: under a pixel limit of BOMB_LIMIT (5,000) it is refused,
under RAISED_LIMIT (10,000) it decodes; every other file with a readable header is within BOMB_LIMIT.
The "huge" PNG declares 100,000 x 100,000 pixels over 20 bytes of data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BOMB_LIMIT = 5_000
RAISED_LIMIT = 10_000
WHITE = (255, 255, 255)


@dataclass
class Corpus:
    good: dict[str, torch.Tensor] = field(default_factory=dict)
    """{path: expected uint8 tensor (3, 2, 2)} of the files that decode."""
    tolerance: dict[str, int] = field(default_factory=dict)
    """{path: largest allowed difference per value}: 0 except for lossy JPEGs."""
    bad: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """{path: words its refusal reason must contain, once thousands separators are removed}."""
    bomb: str = ""
    """The file over BOMB_LIMIT pixels (in `bad`); under RAISED_LIMIT it decodes to `bomb_expected`."""
    bomb_expected: torch.Tensor | None = None


def rgb(rows) -> torch.Tensor:
    """Rows of (r, g, b) pixels as a uint8 tensor (3, H, W)."""
    return torch.tensor(rows, dtype=torch.uint8).permute(2, 0, 1).contiguous()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_bytes(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header for a `width` x `height` grey image over a few bytes of compressed data."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 20))
            + _png_chunk(b"IEND", b""))


def truncated_bytes(fmt: str) -> bytes:
    """The first half of a 64x64 noise image: its header is intact, its pixel data cut short."""
    import io

    buffer = io.BytesIO()
    noise = Image.effect_noise((64, 64), 60)
    (noise if fmt == "PNG" else noise.convert("RGB")).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    data = buffer.getvalue()
    return data[: len(data) // 2]


def write_corpus(root: Path) -> Corpus:
    a, b = root / "a", root / "b"
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    corpus = Corpus()

    def good(path: Path, expected: torch.Tensor, tolerance: int = 0) -> None:
        corpus.good[str(path)] = expected
        corpus.tolerance[str(path)] = tolerance

    # CMYK, lossless (TIFF) and as a JPEG; pure cyan and pure magenta.
    Image.new("CMYK", (2, 2), (255, 0, 0, 0)).save(a / "cmyk.tif")
    good(a / "cmyk.tif", rgb([[(0, 255, 255)] * 2] * 2))
    Image.new("CMYK", (2, 2), (0, 255, 0, 0)).save(b / "cmyk.jpg", quality=100)
    good(b / "cmyk.jpg", rgb([[(255, 0, 255)] * 2] * 2), tolerance=3)

    # RGBA: transparent, half-transparent red, opaque colours; composited on white.
    rgba = Image.new("RGBA", (2, 2))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 128), (10, 20, 30, 255), (0, 0, 0, 255)])
    rgba.save(a / "rgba.png")
    good(a / "rgba.png", rgb([[WHITE, (255, 127, 127)], [(10, 20, 30), (0, 0, 0)]]))

    # A palette whose entry 0 is transparent (black in the palette: dropping the transparency shows black).
    for suffix in (".png", ".gif"):
        palette = Image.new("P", (2, 2))
        palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
        palette.putdata([0, 1, 1, 0])
        palette.save(a / f"palette_clear{suffix}", transparency=0)
        good(a / f"palette_clear{suffix}", rgb([[WHITE, (10, 20, 30)], [(10, 20, 30), WHITE]]))

    # 16-bit grey: rescaled 0..65535 -> 0..255 (clamping would give 255 for everything above 255).
    Image.fromarray(np.array([[0, 257], [32768, 65535]], dtype=np.uint16)).save(b / "grey16.png")
    good(b / "grey16.png", torch.tensor([[0, 1], [128, 255]], dtype=torch.uint8).expand(3, 2, 2).contiguous())

    # EXIF orientation 6 ("rotate 90 degrees clockwise to view"): the blue stored top-left ends top-right.
    photo = Image.new("RGB", (2, 2), (255, 0, 0))
    photo.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(b / "exif_rotated.png", exif=exif)
    good(b / "exif_rotated.png", rgb([[(255, 0, 0), (0, 0, 255)], [(255, 0, 0), (255, 0, 0)]]))

    # 1x1: resized to 2x2, one colour stays that colour.
    Image.new("RGB", (1, 1), (7, 8, 9)).save(b / "one_pixel.png")
    good(b / "one_pixel.png", rgb([[(7, 8, 9)] * 2] * 2))

    # --- files that must be refused ---
    (a / "empty.png").write_bytes(b"")
    corpus.bad[str(a / "empty.png")] = ("the file is empty (0 bytes)",)
    (a / "truncated.png").write_bytes(truncated_bytes("PNG"))
    corpus.bad[str(a / "truncated.png")] = ("truncated",)
    (b / "truncated.jpg").write_bytes(truncated_bytes("JPEG"))
    corpus.bad[str(b / "truncated.jpg")] = ("truncated",)
    (b / "notes.jpg").write_text("these are my notes, not a photo\n")
    corpus.bad[str(b / "notes.jpg")] = ("not an image format Pillow recognises",)
    (b / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    corpus.bad[str(b / "noise.png")] = ("not an image format Pillow recognises",)
    (b / "huge.png").write_bytes(huge_png_bytes())
    corpus.bad[str(b / "huge.png")] = ("100000x100000 = 10000000000 pixels is over the limit of",
                                       "decompression bomb", "max_pixels=N", "VITKIT_MAX_IMAGE_PIXELS")
    Image.new("RGB", (100, 100), (40, 50, 60)).save(b / "bomb.png")
    corpus.bomb = str(b / "bomb.png")
    corpus.bad[corpus.bomb] = (f"100x100 = 10000 pixels is over the limit of {BOMB_LIMIT} pixels", "decompression bomb",
                               "max_pixels=N", "VITKIT_MAX_IMAGE_PIXELS")
    corpus.bomb_expected = rgb([[(40, 50, 60)] * 2] * 2)
    return corpus


def assert_reason(reason: str, words: tuple[str, ...], what: str) -> None:
    plain = reason.replace(",", "")
    missing = [word for word in words if word not in plain]
    assert not missing, f"{what}: the reason {reason!r} lacks {missing}"


def assert_decoded(image: torch.Tensor, expected: torch.Tensor, tolerance: int, what: str) -> None:
    assert image.dtype == torch.uint8 and image.shape == expected.shape, (what, image.shape)
    if tolerance == 0:
        assert torch.equal(image, expected), (what, image.tolist(), expected.tolist())
    else:
        assert (image.int() - expected.int()).abs().max() <= tolerance, (what, image.tolist(), expected.tolist())
