"""Load any image a user points us at as a plain 8-bit RGB `PIL.Image`, or fail with one clear line.

Training and evaluation read thousands of user-supplied files; one odd file (16-bit PNG, CMYK JPEG,
palette GIF with transparency, truncated download, a stray text file) must neither crash the run with
a PIL traceback nor silently feed the model a black or garbage image.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdrpn.errors import SdrpnError

_HIGH_DEPTH_MODES = {"I", "F"}  # and every "I;16*" variant, matched by prefix
FRAMES_WARNING = "sdrpn_warning"  # key in the returned image's `info`: what the caller should be told


def load_image(
    source: str | os.PathLike[str] | Image.Image | np.ndarray | bytes,
    *,
    max_pixels: int = 40_000_000,
    max_aspect: float = 50.0,
) -> Image.Image:
    """Return `source` as a fully loaded, EXIF-oriented RGB image.

    Behaviour, chosen so that every accepted image means what a viewer would show:

    - transparency (RGBA, LA, P with a transparent colour, ...) is composited on *white*, as image
      viewers and web pages show it; converting straight to RGB would expose arbitrary hidden colours
      (often black);
    - 16-bit ``I;16*`` images are scaled by the full 16-bit range (65535 -> 255); 32-bit ``I`` and
      float ``F`` images are scaled by the smallest of the ranges [0, 1] (F only), [0, 255],
      [0, 65535] that holds their pixels, else min-max stretched; nothing is clipped;
    - CMYK, YCbCr, LAB, HSV, 1-bit, grayscale and palette images are converted by PIL;
    - a 1x1 image is returned as is (the model's processor resizes it); images with more than
      `max_pixels` pixels, or whose long side is more than `max_aspect` times the short side, are
      rejected: they are decompression bombs or strips the vision encoder cannot see anything in.

    The size checks run on the header, before decoding. PIL's global ``Image.MAX_IMAGE_PIXELS`` guard
    is replaced by `max_pixels`: its warning is silenced, and if PIL still refuses a huge image (above
    twice its limit) that becomes an `SdrpnError` too. A malformed EXIF block costs only the rotation.
    (PIL's warnings are silenced with `warnings.catch_warnings`, which is not thread-safe before
    Python 3.14: load images from processes, e.g. DataLoader workers, rather than threads.)

    Raises:
        SdrpnError: one line, "image '<source>': <reason>", for a missing, unreadable, non-image,
            truncated, oversized or too elongated source; PIL exceptions never escape.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<in-memory image>"
        with _quiet_pil():
            return _to_rgb_checked(source, name, max_pixels, max_aspect)
    if isinstance(source, np.ndarray):
        return load_image(_from_array(source), max_pixels=max_pixels, max_aspect=max_aspect)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(source), max_pixels, max_aspect)
    if not isinstance(source, (str, os.PathLike)):
        raise SdrpnError(
            f"an image must be a path, a PIL image, a numpy array (H, W, 3) of uint8 or the bytes of an image "
            f"file, got {type(source).__name__}"
        )
    name = os.fspath(source)
    if not str(name).strip():
        raise SdrpnError("image path is empty")
    _check_regular_file(name)
    try:
        with _quiet_pil(), Image.open(Path(name)) as img:
            _check_size(img, name, max_pixels, max_aspect)
            img.load()
            return _to_rgb_checked(img, name, max_pixels, max_aspect)
    except SdrpnError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors, ...
        raise SdrpnError(_message(name, _reason(exc))) from exc


def _check_regular_file(name: str) -> None:
    """Open only regular files: a FIFO or a device would block or stream forever."""
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        raise SdrpnError(_message(name, "file not found")) from None
    except OSError as exc:
        raise SdrpnError(_message(name, _reason(exc))) from None
    if stat.S_ISDIR(mode):
        raise SdrpnError(_message(name, "is a directory, not an image file"))
    if not stat.S_ISREG(mode):
        raise SdrpnError(_message(name, "not a regular file (a pipe, socket or device is never opened)"))


def _from_array(pixels: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 3) or (H, W, 4) uint8 pixels -> a PIL image; anything else is refused, not guessed."""
    shape = pixels.shape
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and shape[2] in (3, 4))):
        raise SdrpnError(f"image array must be (H, W), (H, W, 3) or (H, W, 4) of uint8, got {shape} of {pixels.dtype}")
    if min(shape[:2]) < 1:
        raise SdrpnError(f"image array is empty ({shape})")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _from_bytes(data: bytes, max_pixels: int, max_aspect: float) -> Image.Image:
    """The bytes of an image file (PNG, JPEG, ...), as read from a file or a network response."""
    name = f"<{len(data)} bytes>"
    try:
        with _quiet_pil(), Image.open(io.BytesIO(data)) as img:
            _check_size(img, name, max_pixels, max_aspect)
            img.load()
            return _to_rgb_checked(img, name, max_pixels, max_aspect)
    except SdrpnError:
        raise
    except Exception as exc:
        raise SdrpnError(_message(name, _reason(exc))) from exc


@contextlib.contextmanager
def _quiet_pil() -> Iterator[None]:
    """Silence PIL's warnings: the bomb warning is replaced by `max_pixels`, and the "Corrupt EXIF
    data" kind would repeat once per odd file in a dataset; neither changes the pixels we return."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
        yield


def _to_rgb_checked(img: Image.Image, name: str, max_pixels: int, max_aspect: float) -> Image.Image:
    """Orient, check and convert; a decoding failure of an in-memory image is reported the same way."""
    _check_size(img, name, max_pixels, max_aspect)
    frames = int(getattr(img, "n_frames", 1) or 1)
    try:
        img.load()
        img = _exif_transpose(img)
        rgb = _to_rgb(img)
    except Exception as exc:
        raise SdrpnError(_message(name, _reason(exc))) from exc
    rgb.load()
    if frames > 1:  # animated GIF, multi-page TIFF: only the first frame is seen, and the caller is told
        rgb.info[FRAMES_WARNING] = f"image {_one_line(name)!r} has {frames} frames; only the first is used"
    return rgb


def _check_size(img: Image.Image, name: str, max_pixels: int, max_aspect: float) -> None:
    """Reject bombs and degenerate strips from the header size, before any pixel is decoded."""
    width, height = img.size
    if width < 1 or height < 1:
        raise SdrpnError(_message(name, f"empty image ({width}x{height} pixels)"))
    if width * height > max_pixels:
        raise SdrpnError(_message(name, f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"))
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise SdrpnError(
            _message(
                name,
                f"aspect ratio {aspect:.1f} exceeds {max_aspect:g} ({width}x{height} pixels); "
                "crop or pad it, or raise max_aspect",
            )
        )


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block only costs the rotation, not the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - PIL's EXIF parser raises many types; the pixels are still fine
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without darkening, clipping or exposing hidden colours."""
    mode = img.mode
    if mode.startswith("I;16") or mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if img.has_transparency_data:  # alpha band, or a transparent colour/palette entry in img.info
        return _on_white(img)
    return img.convert("RGB") if mode != "RGB" else img.copy()


def _on_white(img: Image.Image) -> Image.Image:
    """Composite on white: what viewers show for transparent pixels."""
    if img.mode == "La":  # premultiplied alpha: PIL converts it to RGBA only via LA
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-depth pixels into 0..255 by the range they were stored in (see `load_image`)."""
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and mode.startswith("I;16"):
        full = 65535.0
    elif low >= 0.0 and high <= 1.0 and mode == "F":
        full = 1.0
    elif low >= 0.0 and high <= 255.0:
        full = 255.0
    elif low >= 0.0 and high <= 65535.0:
        full = 65535.0
    elif high > low:  # negative or beyond 16 bit: no known storage range, so stretch min..max
        values, full = values - low, high - low
    else:  # constant image outside every range: mid-grey carries as much information as anything
        values, full = np.full_like(values, 0.5), 1.0
    return np.rint(values / full * 255.0).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    """Turn an exception from opening/decoding into a short, user-facing reason."""
    detail = _one_line(str(exc))
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (cannot identify image file)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels, refused by PIL's Image.MAX_IMAGE_PIXELS guard ({detail})"
    if isinstance(exc, OSError) and "truncated" in detail:
        return f"truncated image file ({detail})"
    return f"corrupt or unsupported image ({type(exc).__name__}: {detail})"


def _message(name: str, reason: str) -> str:
    """The single-line error format: the file first, so logs can be grepped by name."""
    return f"image {_one_line(name)!r}: {_one_line(reason)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its longer side."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
