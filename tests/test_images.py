"""`finextract.images.read_image`: orientation, bit depth, transparency, colour modes, huge files."""

from __future__ import annotations

import logging
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from finextract.images import ALPHA_BACKGROUND, MAX_PIXELS, read_image, read_images


def _colours(height: int, width: int) -> np.ndarray:
    """A lossless test pattern: every pixel a different colour."""
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 40 % 256, y * 60 % 256, (x + y) * 25 % 256], axis=2).astype(np.uint8)


@pytest.mark.parametrize(
    "orientation, rotate",
    [(1, lambda a: a), (3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)), (8, np.rot90)],
)
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    """EXIF Orientation (tag 0x0112): 3 = stored upside down, 6 = to be turned 90 degrees clockwise, 8 =
    counter-clockwise for display (the EXIF 2.3 definitions, written out with numpy here)."""
    stored = _colours(2, 4)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    Image.fromarray(stored).save(path, exif=exif)
    np.testing.assert_array_equal(read_image(path), rotate(stored))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "scan16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    image = read_image(path)
    expected = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=2))
    assert 120 < image.mean() < 135  # not "almost white", as a clip to 255 makes it


def _png_rgb16(path, pixels: np.ndarray) -> None:
    """A 48-bit (16 bits per channel) RGB PNG, which Pillow cannot write: the chunks by hand (PNG spec)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def test_16_bit_rgb_comes_out_as_its_8_bit_value(tmp_path):
    pixels = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 330).astype(np.uint16)
    path = tmp_path / "rgb48.png"
    _png_rgb16(path, pixels)
    image = read_image(path)
    assert np.abs(image.astype(int) - np.rint(pixels / 257)).max() <= 1  # 16 -> 8 bits: / 257, rounding


def test_transparency_is_composited_on_white_with_a_log_line(tmp_path, caplog):
    rgb = _colours(4, 4)
    alpha = np.array([[0, 64, 128, 255]] * 4, dtype=np.uint8)
    path = tmp_path / "cutout.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    with caplog.at_level(logging.INFO, logger="finextract.images"):
        image = read_image(path)
    a = alpha[..., None] / 255
    expected = a * rgb + (1 - a) * np.array(ALPHA_BACKGROUND)
    assert np.abs(image - expected).max() <= 1  # Pillow's alpha_composite rounds once
    assert "cutout.png: transparent pixels composited on white" in caplog.text
    opaque = tmp_path / "opaque.png"
    Image.fromarray(np.dstack([rgb, np.full((4, 4), 255, np.uint8)]), "RGBA").save(opaque)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finextract.images"):
        np.testing.assert_array_equal(read_image(opaque), rgb)
    assert "composited" not in caplog.text


def test_palette_cmyk_one_bit_and_grey_become_rgb(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)  # index 0 (red) transparent
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), [[ALPHA_BACKGROUND, (0, 0, 255)]])
    Image.new("CMYK", (1, 1), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    assert np.abs(read_image(tmp_path / "cyan.jpg").astype(int) - [0, 255, 255]).max() <= 3  # JPEG rounding
    bits = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    bits.save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_image(tmp_path / "bits.png"), [[(0, 0, 0), (255, 255, 255)]])
    Image.new("LA", (1, 1), (100, 255)).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), [[(100, 100, 100)]])


@pytest.mark.parametrize("name, size", [("big.jpg", (8000, 6000)), ("bomb.png", (9600, 9600))])
def test_huge_images_are_downscaled_while_decoding_without_a_warning(tmp_path, caplog, name, size):
    """48 MP JPEG: decoded at 1/2 scale by `draft`; 92 MP PNG (over Pillow's 89 MP bomb warning):
    decoded, then `reduce`d by 2. Both end at or under 40 MP with one log line and no warning."""
    path = tmp_path / name
    Image.new("L", size, 90).save(path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="finextract.images"):
        warnings.simplefilter("always")
        image = read_image(path)
    assert not [
        w for w in caught if "DecompressionBomb" in type(w.message).__name__ or "decompression" in str(w.message)
    ]
    assert image.shape == (size[1] // 2, size[0] // 2, 3) and image.shape[0] * image.shape[1] <= MAX_PIXELS
    assert np.abs(image.astype(int) - 90).max() <= 1
    assert f"{name}: {size[0]}x{size[1]}" in caplog.text and "downscaled to" in caplog.text


def test_unreadable_files_are_named_and_skipped(tmp_path, caplog):
    Image.fromarray(_colours(4, 4)).save(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="finextract.images"):
        images, paths = read_images(tmp_path)
    assert [p.name for p in paths] == ["good.png"] and len(images) == 1
    assert "skipped 2 unreadable" in caplog.text and "cut.png" in caplog.text and "notes.txt" in caplog.text
    with pytest.raises(ValueError, match=r"notes\.txt is not a readable image"):
        read_image(tmp_path / "notes.txt")
