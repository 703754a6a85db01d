"""Pins `load_image`: every PIL mode becomes sensible RGB, and every bad file is a one-line SdrpnError."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrpn.errors import SdrpnError
from sdrpn.images import load_image


def _save(img: Image.Image, path: Path, **params: object) -> Path:
    img.save(path, **params)
    return path


def _error(source: object, **kwargs: object) -> str:
    with pytest.raises(SdrpnError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def _rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# --- modes -------------------------------------------------------------------------------------------


def test_rgb_png_round_trips(tmp_path: Path) -> None:
    pixels = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) * 7
    out = load_image(_save(Image.fromarray(pixels, "RGB"), tmp_path / "a.png"))
    assert out.size == (3, 4)
    assert np.array_equal(_rgb(out), pixels)


def test_accepts_str_path_and_pil_image(tmp_path: Path) -> None:
    path = _save(Image.new("L", (5, 2), 77), tmp_path / "g.png")
    assert _rgb(load_image(str(path)))[0, 0].tolist() == [77, 77, 77]
    assert _rgb(load_image(Image.new("L", (5, 2), 9)))[1, 4].tolist() == [9, 9, 9]


def test_grayscale_is_replicated(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("L", (2, 2), 200), tmp_path / "g.png"))
    assert _rgb(out)[1, 1].tolist() == [200, 200, 200]


def test_one_bit(tmp_path: Path) -> None:
    img = Image.new("1", (4, 1), 0)
    img.putpixel((2, 0), 1)
    out = _rgb(load_image(_save(img, tmp_path / "b.png")))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [255, 255, 255]


def test_rgba_transparent_pixel_is_white_not_black(tmp_path: Path) -> None:
    img = Image.new("RGBA", (3, 1), (10, 20, 30, 0))  # fully transparent, hidden colour dark
    img.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    img.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    out = _rgb(load_image(_save(img, tmp_path / "t.png")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert all(abs(v - 127) <= 1 for v in out[0, 2].tolist())


def test_la_transparent_is_white(tmp_path: Path) -> None:
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (50, 255))
    out = _rgb(load_image(_save(img, tmp_path / "la.png")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [50, 50, 50]


def test_palette_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 128, 255] + [0, 0, 0] * 255)
    out = _rgb(load_image(_save(img, tmp_path / "p.png")))
    assert out[0, 0].tolist() == [0, 128, 255]


def test_palette_transparency_is_white(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    img.putpixel((1, 0), 1)
    path = _save(img, tmp_path / "p.gif", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info.get("transparency") == 0
    out = _rgb(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 255, 0]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    red, green, blue = _rgb(load_image(path))[4, 4].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_png_scales_full_range(tmp_path: Path) -> None:
    pixels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(pixels), tmp_path / "d.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I;16")
    out = _rgb(load_image(path))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_16_bit_big_endian_mode() -> None:
    img = Image.frombytes("I;16B", (2, 1), np.array([65535, 257], dtype=">u2").tobytes())
    assert _rgb(load_image(img))[0, :, 0].tolist() == [255, 1]


def test_32_bit_int_holding_16_bit_values(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), mode="I")
    out = _rgb(load_image(_save(img, tmp_path / "i.tiff")))
    assert out[0, :, 0].tolist() == [0, 4, 255]  # 1000 / 65535 * 255 = 3.9, not clipped to 255


def test_32_bit_int_holding_8_bit_values_is_not_darkened() -> None:
    img = Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32), mode="I")
    assert _rgb(load_image(img))[0, :, 0].tolist() == [0, 128, 255]


def test_32_bit_int_with_negatives_is_stretched() -> None:
    img = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32), mode="I")
    assert _rgb(load_image(img))[0, :, 0].tolist() == [0, 128, 255]


def test_float_unit_range(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    out = _rgb(load_image(_save(img, tmp_path / "f.tiff")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_float_nan_and_large_values() -> None:
    img = Image.fromarray(np.array([[np.nan, 1e6, 2e6]], dtype=np.float32), mode="F")
    assert _rgb(load_image(img))[0, :, 0].tolist() == [0, 128, 255]


def test_constant_out_of_range_image_does_not_divide_by_zero() -> None:
    img = Image.fromarray(np.full((2, 2), -5, dtype=np.int32), mode="I")
    assert _rgb(load_image(img))[0, 0].tolist() == [128, 128, 128]


def test_in_memory_rgb_is_copied_not_aliased() -> None:
    src = Image.new("RGB", (2, 2), (1, 2, 3))
    out = load_image(src)
    out.putpixel((0, 0), (9, 9, 9))
    assert src.getpixel((0, 0)) == (1, 2, 3)


# --- EXIF orientation ----------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    red_top = _rgb(out)[5, 10]  # after a 90 degree CW turn the red left half is on top
    assert red_top[0] > 200 and red_top[2] < 60


def test_corrupt_exif_is_ignored_silently(tmp_path: Path) -> None:
    path = _save(
        Image.new("RGB", (4, 2), (7, 7, 7)),
        tmp_path / "e.jpg",
        exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff\x12\x01",  # IFD cut short
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (4, 2)


# --- sizes ---------------------------------------------------------------------------------------------


def test_one_pixel_image_is_accepted_as_is(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("RGB", (1, 1), (4, 5, 6)), tmp_path / "1.png"))
    assert out.size == (1, 1)
    assert _rgb(out)[0, 0].tolist() == [4, 5, 6]


def test_extreme_aspect_ratio_is_rejected(tmp_path: Path) -> None:
    path = _save(Image.new("L", (20000, 300)), tmp_path / "strip.png")
    message = _error(path)
    assert "strip.png" in message and "aspect ratio 66.7 exceeds 50" in message


def test_aspect_ratio_limit_is_inclusive_and_configurable(tmp_path: Path) -> None:
    path = _save(Image.new("L", (50, 1)), tmp_path / "s.png")
    assert load_image(path).size == (50, 1)
    assert "aspect ratio 50.0 exceeds 10" in _error(path, max_aspect=10)
    assert load_image(Image.new("L", (1, 200)), max_aspect=200).size == (1, 200)


def test_too_many_pixels_is_rejected_before_decoding(tmp_path: Path) -> None:
    path = _save(Image.new("L", (100, 100)), tmp_path / "big.png")
    message = _error(path, max_pixels=9999)
    assert "big.png" in message and "max_pixels=9999" in message
    assert load_image(path, max_pixels=10000).size == (100, 100)


def test_pil_bomb_warning_does_not_escape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("L", (100, 100)), tmp_path / "w.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 px: PIL warns, below its error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (100, 100)
        assert "max_pixels=5000" in _error(path, max_pixels=5000)


def test_pil_bomb_error_becomes_sdrpn_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("L", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2x limit: PIL raises
    message = _error(path)
    assert "bomb.png" in message and "MAX_IMAGE_PIXELS" in message


# --- bad files -----------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.png")
    assert "nope.png" in message and "file not found" in message


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    message = _error(tmp_path / "dir.png")
    assert "dir.png" in message and "directory" in message


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello\nworld\n")
    message = _error(path)
    assert message == f"image {str(path)!r}: not an image file (cannot identify image file)"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty.jpg" in _error(path)


def test_truncated_png_fails_at_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = _save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "f.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    message = _error(cut)
    assert "cut.png" in message and "truncated" in message


def test_truncated_jpeg_fails_at_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    full = _save(Image.fromarray(pixels), tmp_path / "f.jpg", quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:1000])
    assert "cut.jpg" in _error(cut)


def test_corrupt_pixel_data_after_valid_header_fails_at_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    full = _save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "f.png")
    data = bytearray(full.read_bytes())
    start = data.index(b"IDAT") + 6  # keep the zlib header, smash the deflate stream
    data[start : start + 200] = b"\xff" * 200
    bad = tmp_path / "smashed.png"
    bad.write_bytes(bytes(data))
    with Image.open(bad) as header_only:
        assert header_only.size == (64, 64)  # opening alone would not notice
    message = _error(bad)
    assert "smashed.png" in message and "corrupt" in message


def test_header_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert "garbage.png" in _error(bad)


def test_newline_in_file_name_keeps_message_one_line(tmp_path: Path) -> None:
    message = _error(tmp_path / "two\nlines.png")
    assert "lines.png" in message


def test_empty_in_memory_image() -> None:
    assert "empty image" in _error(Image.new("RGB", (0, 0)))
