"""Safe image decoding: every colour mode to known values, every kind of bad file to BadImageError."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_corpus import BOMB_LIMIT, huge_png_bytes, write_corpus
from vitkit.data import BadImageError, decode_image, load_image
from vitkit.data.decode import read_header


def pixels(tensor: torch.Tensor) -> list:
    return tensor.tolist()


def test_grey_png_is_exact(tmp_path):
    array = np.array([[0, 1, 2], [128, 254, 255]], dtype=np.uint8)
    Image.fromarray(array, "L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png", "L")
    assert image.dtype == torch.uint8 and image.shape == (1, 2, 3)
    assert np.array_equal(image[0].numpy(), array)
    assert torch.equal(load_image(tmp_path / "g.png", "RGB"), image.expand(3, -1, -1))


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".ppm"])
def test_rgb_lossless_formats_are_exact(tmp_path, suffix):
    array = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(array, "RGB").save(tmp_path / f"c{suffix}")
    image = load_image(tmp_path / f"c{suffix}")
    assert image.shape == (3, 5, 4) and np.array_equal(image.permute(1, 2, 0).numpy(), array)
    grey = load_image(tmp_path / f"c{suffix}", "L")  # ITU-R 601-2 luma, as Pillow computes it
    assert np.array_equal(grey[0].numpy(), np.asarray(Image.fromarray(array, "RGB").convert("L")))


def test_jpeg_decodes_close_to_the_original(tmp_path):
    Image.new("RGB", (16, 16), (200, 40, 90)).save(tmp_path / "c.jpg", quality=95)
    image = load_image(tmp_path / "c.jpg").int()
    assert image.shape == (3, 16, 16)
    assert (image - torch.tensor([200, 40, 90]).view(3, 1, 1)).abs().max() <= 3


def test_16_bit_grey_is_rescaled_not_clamped(tmp_path):
    array = np.array([[0, 257, 32768, 65535, 65278]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert pixels(load_image(tmp_path / "g16.png", "L")) == [[[0, 1, 128, 255, 254]]]
    assert pixels(load_image(tmp_path / "g16.png", "RGB")[:, 0, 3]) == [255, 255, 255]


def test_32_bit_integer_and_float_grey(tmp_path):
    Image.fromarray(np.array([[-5, 0, 32768, 65535, 70000]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    assert pixels(load_image(tmp_path / "i.tif", "L")) == [[[0, 0, 128, 255, 255]]]
    Image.fromarray(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert pixels(load_image(tmp_path / "f.tif", "L")) == [[[0, 0, 128, 255, 255]]]


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (255, 0, 0, 128), (10, 20, 30, 255)])  # transparent, half, opaque
    img.save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert pixels(image[:, 0, 0]) == [255, 255, 255]  # fully transparent -> the white background
    assert pixels(image[:, 0, 2]) == [10, 20, 30]
    assert image[0, 0, 1] == 255 and abs(int(image[1, 0, 1]) - 127) <= 1 and abs(int(image[2, 0, 1]) - 127) <= 1
    assert pixels(load_image(tmp_path / "a.png", "L")[0, 0, 0:1]) == [255]


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    Image.frombytes("LA", (2, 1), bytes([0, 0, 50, 255])).save(tmp_path / "la.png")
    assert pixels(load_image(tmp_path / "la.png", "L")) == [[[255, 50]]]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparent_entry(tmp_path, suffix):
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    img.save(tmp_path / f"p{suffix}", transparency=0)
    image = load_image(tmp_path / f"p{suffix}")
    assert pixels(image.permute(1, 2, 0)[0]) == [[255, 255, 255], [10, 20, 30], [200, 100, 0]]


def test_palette_without_transparency_and_bilevel(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([7, 8, 9, 250, 251, 252] + [0] * (256 * 3 - 6))
    img.putdata([1, 0])
    img.save(tmp_path / "p.png")
    assert pixels(load_image(tmp_path / "p.png").permute(1, 2, 0)[0]) == [[250, 251, 252], [7, 8, 9]]
    Image.frombytes("1", (8, 1), bytes([0b10100000])).save(tmp_path / "b.png")
    assert pixels(load_image(tmp_path / "b.png", "L"))[0][0][:3] == [255, 0, 255]


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (2, 2), (255, 0, 0, 0)).save(tmp_path / "c.tif")  # pure cyan
    assert pixels(load_image(tmp_path / "c.tif")[:, 0, 0]) == [0, 255, 255]
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "m.jpg", quality=100)  # magenta, as a CMYK JPEG
    image = load_image(tmp_path / "m.jpg").int()
    assert image.shape == (3, 8, 8) and (image[:, 4, 4] - torch.tensor([255, 0, 255])).abs().max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (3, 2), (255, 0, 0))
    img.putpixel((0, 0), (0, 0, 255))  # blue in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    img.save(tmp_path / "o.png", exif=exif)
    image = load_image(tmp_path / "o.png")
    assert image.shape == (3, 3, 2)
    assert pixels(image[:, 0, 1]) == [0, 0, 255]  # the corner ends at the top right
    assert read_header(tmp_path / "o.png") == ((2, 3), "RGB")  # headers give the stored size


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (7, 8, 9)).save(tmp_path / "one.png")
    assert pixels(load_image(tmp_path / "one.png")) == [[[7]], [[8]], [[9]]]


# --- bad files ------------------------------------------------------------------------------------

def make_bad_files(directory) -> dict:
    """{path: words the reason must contain} for a corpus of files that are not usable images."""
    directory.mkdir(exist_ok=True)
    noise = Image.effect_noise((64, 64), 60)
    noise.save(directory / "full.png")
    noise.convert("RGB").save(directory / "full.jpg", quality=90)
    png, jpg = (directory / "full.png").read_bytes(), (directory / "full.jpg").read_bytes()
    bad = {
        directory / "empty.png": "empty (0 bytes)",
        directory / "truncated.png": "truncated",
        directory / "truncated.jpg": "truncated",
        directory / "notes.jpg": "not an image format",
        directory / "random.png": "",
        directory / "headless.png": "",
    }
    (directory / "empty.png").write_bytes(b"")
    (directory / "truncated.png").write_bytes(png[: len(png) // 2])
    (directory / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (directory / "notes.jpg").write_text("these are my notes, not a photo\n")
    (directory / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (directory / "headless.png").write_bytes(png[:40])
    (directory / "full.png").unlink()
    (directory / "full.jpg").unlink()
    return bad


def test_every_bad_file_raises_bad_image_error_naming_it(tmp_path):
    for path, words in make_bad_files(tmp_path / "bad").items():
        with pytest.raises(BadImageError) as caught:
            load_image(path)
        error = caught.value
        assert isinstance(error, ValueError) and error.path == str(path)
        assert str(path) in str(error) and words in error.reason, (path, error.reason)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(BadImageError, match="is a directory"):
        load_image(tmp_path)


def test_bomb_over_max_pixels_is_refused_with_the_way_to_raise_the_limit(tmp_path, monkeypatch):
    Image.new("L", (100, 60)).save(tmp_path / "big.png")
    with pytest.raises(BadImageError) as caught:
        load_image(tmp_path / "big.png", max_pixels=5999)
    message = str(caught.value)
    assert str(tmp_path / "big.png") in message and "6,000 pixels" in message and "5,999" in message
    assert "max_pixels" in message and "VITKIT_MAX_IMAGE_PIXELS" in message
    assert load_image(tmp_path / "big.png", "L", max_pixels=6000).shape == (1, 60, 100)
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(BadImageError, match="over the limit of 5,000"):
        load_image(tmp_path / "big.png")
    with pytest.raises(BadImageError, match="over the limit of 5,000"):
        read_header(tmp_path / "big.png")
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="VITKIT_MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "big.png")


def test_default_limit_is_pillows_and_raising_it_leaves_pillow_unchanged(tmp_path, monkeypatch):
    monkeypatch.delenv("VITKIT_MAX_IMAGE_PIXELS", raising=False)
    Image.new("L", (100, 60)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow itself would refuse over 2,000
    with pytest.raises(BadImageError, match="VITKIT_MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", "L", max_pixels=10**6).shape == (1, 60, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_bad_image_error_survives_pickling():
    error = pickle.loads(pickle.dumps(BadImageError("/x/y.png", "truncated")))
    assert (error.path, error.reason, str(error)) == ("/x/y.png", "truncated", "cannot read image /x/y.png: truncated")


def test_unknown_mode_is_a_usage_error(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        load_image(tmp_path / "x.png", "CMYK")


def test_huge_dimensions_in_a_tiny_file_are_refused_before_decoding(tmp_path, monkeypatch):
    import struct
    import zlib

    monkeypatch.delenv("VITKIT_MAX_IMAGE_PIXELS", raising=False)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A 100,000 x 100,000 grey PNG header (10^10 pixels, 10 GB decoded) over 20 bytes of data.
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 20)) + chunk(b"IEND", b""))
    with pytest.raises(BadImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert str(path) in message and "VITKIT_MAX_IMAGE_PIXELS" in message
    assert re.search(r"10,?000,?000,?000 pixels", message), message


@pytest.mark.parametrize("max_pixels,limit_text", [(None, "89,478,485"), (5_000, "5,000"), (10**9, "1,000,000,000")],
                         ids=["pillow-default", "lowered", "raised-but-not-enough"])
def test_huge_dimensions_get_one_reason_whoever_refuses_them(tmp_path, monkeypatch, max_pixels, limit_text):
    # Pillow's own guard refuses at twice its limit before vitkit sees the size; the reason must not depend on it.
    monkeypatch.delenv("VITKIT_MAX_IMAGE_PIXELS", raising=False)
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png_bytes())
    expected = (f"100000x100000 = 10,000,000,000 pixels is over the limit of {limit_text} pixels (a guard against "
                "decompression bombs). If you trust this file, raise the limit with max_pixels=N or the environment "
                "variable VITKIT_MAX_IMAGE_PIXELS=N")
    for read in (load_image, read_header):
        with pytest.raises(BadImageError) as caught:
            read(path, max_pixels=max_pixels)
        assert (caught.value.path, caught.value.reason) == (str(path), expected), read.__name__
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's setting is left as it was


def test_bytes_decode_as_their_file_does(tmp_path):
    """decode_image(bytes) gives load_image(path)'s tensor for every awkward image of the corpus, and its reason for
    every bad file and bomb, naming the bytes as the caller called them."""
    corpus = write_corpus(tmp_path / "corpus")
    for path in corpus.good:
        for mode in ("RGB", "L"):
            assert torch.equal(decode_image(Path(path).read_bytes(), mode), load_image(path, mode)), (path, mode)
    bad = {**{str(p): w for p, w in make_bad_files(tmp_path / "bad").items()}, **corpus.bad}
    for path in bad:
        with pytest.raises(BadImageError) as from_file:
            load_image(path, max_pixels=BOMB_LIMIT)
        with pytest.raises(BadImageError) as from_bytes:
            decode_image(Path(path).read_bytes(), name="upload.png", max_pixels=BOMB_LIMIT)
        assert from_bytes.value.path == "upload.png"
        reason = from_file.value.reason.replace("(0 bytes)", "").replace("file", "data")
        assert from_bytes.value.reason.replace("(0 bytes)", "").replace("file", "data") == reason, path
