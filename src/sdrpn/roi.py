"""Turn an RoI map into crops: SD-RPN's stage-1 post-processing (paper section 3.4).

Everything here works on small (H, W) token grids with numpy and scipy.ndimage, so it runs and
is tested without torch or a model. Boxes on the token grid are ``(row0, col0, row1, col1)``
half-open; boxes in pixels are ``(x0, y0, x1, y1)`` half-open, in ORIGINAL image pixels.

Inputs are validated where they enter (settings, geometry, the public functions' arguments): a wrong
type, NaN or infinity, or a value out of range raises SdrpnError. Maps of any finite magnitude (up to
the float64 limit) are handled: a huge or tiny map is scaled by a power of two before sums and
smoothing, which is exact, so ordinary maps give the same bits as without it.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sdrpn.errors import SdrpnError

GridBox = tuple[int, int, int, int]
PixelBox = tuple[int, int, int, int]

_EPS = 1e-6  # absorbs float noise when a token edge lands exactly on a pixel edge
_MAX_SIZE = 2**31 - 1  # largest image side / grid side a Geometry accepts
_MAX_KERNEL = 1001  # largest smoothing kernel (tokens): a wider one only costs time on a token grid
# Maps whose largest |value| lies outside this range are scaled by a power of two before sums (exact,
# and never done for ordinary maps, so their results stay bit-identical).
_SCALE_LOW, _SCALE_HIGH = 2.0**-512, 2.0**512
_FLAT_SIGMA = 1e200  # any sigma this large gives the same (flat) kernel: its square is inf


def _as_int(value: object) -> int | None:
    """`value` as a Python int if it is an integral number (int, numpy int, anything with __index__ such as
    a 0-d integer tensor, or a float like 3.0), else None. Bools are not numbers here."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        try:
            number = float(value)
        except (OverflowError, TypeError, ValueError):
            return None
        return int(number) if math.isfinite(number) and number.is_integer() else None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None


def _as_real(value: object) -> float | None:
    """`value` as a float if it is a real number (NaN and +-inf included: callers check), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int or Fraction beyond the float range
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        return None


def _scaled(a: np.ndarray) -> np.ndarray:
    """`a` times a power of two bringing max |a| near 1 when it is huge or tiny, else `a` itself.

    Scaling by a power of two is exact, so ratios of sums come out as for the unscaled map, without
    the overflow to inf of sums of values near 1e308."""
    peak = float(np.max(np.abs(a))) if a.size else 0.0
    if peak == 0.0 or _SCALE_LOW <= peak <= _SCALE_HIGH:
        return a
    return np.ldexp(a, -math.frexp(peak)[1])


def _box4(box: object, what: str, integral: bool) -> tuple:
    """A box as 4 Python ints (integral=True) or 4 finite floats, else SdrpnError."""
    try:
        values = tuple(box)  # type: ignore[arg-type]
    except TypeError:
        values = ()
    convert = _as_int if integral else _as_real
    out = tuple(convert(v) for v in values)
    if len(out) != 4 or any(v is None or not math.isfinite(v) for v in out):
        kind = "integers" if integral else "finite numbers"
        raise SdrpnError(f"{what} must be 4 {kind}, got {box!r}")
    return out


def _clamp(value: float, low: float, high: float) -> float:
    """min(max(value, low), high) that also sends NaN to `low`."""
    return min(max(value, low), high) if value == value else low


def _check_geometry(geometry: object, what: str = "geometry") -> Geometry:
    if not isinstance(geometry, Geometry):
        raise SdrpnError(f"{what} must be a Geometry, got {type(geometry).__name__}")
    return geometry


@dataclass(frozen=True)
class Geometry:
    """How an original image maps onto the model's token grid (the grid covers a canvas).

    The canvas is in ORIGINAL pixel units, so padding (e.g. LLaVA's pad-to-square) is just an
    offset and resizing is just the grid's cell size; no resize factor has to be carried around.
    Sizes are integers in [1, 2**31 - 1]; canvas and offsets are finite numbers (canvas > 0) whose
    pixel coordinates stay inside the float range.
    """

    image_width: int
    image_height: int
    canvas_width: float
    canvas_height: float
    offset_x: float
    offset_y: float
    grid_height: int
    grid_width: int

    def __post_init__(self) -> None:
        for name in ("image_width", "image_height", "grid_height", "grid_width"):
            value = getattr(self, name)
            number = _as_int(value)
            if number is None or not 1 <= number <= _MAX_SIZE:
                raise SdrpnError(f"Geometry.{name} must be a positive integer (at most {_MAX_SIZE}), got {value!r}")
            if type(value) is not int:
                object.__setattr__(self, name, number)
        for name in ("canvas_width", "canvas_height", "offset_x", "offset_y"):
            value = getattr(self, name)
            number = _as_real(value)
            if number is None or not math.isfinite(number):
                raise SdrpnError(f"Geometry.{name} must be a finite number, got {value!r}")
            if type(value) not in (int, float):
                object.__setattr__(self, name, number)
        if not (self.canvas_width > 0 and self.canvas_height > 0):
            raise SdrpnError(f"Geometry canvas must be positive, got {self.canvas_width!r} x {self.canvas_height!r}")
        if not (self.cell_width > 0 and self.cell_height > 0):
            raise SdrpnError(
                f"Geometry canvas {self.canvas_width!r} x {self.canvas_height!r} is too small for a "
                f"{self.grid_height} x {self.grid_width} grid"
            )
        extent = (abs(self.canvas_width) + abs(self.offset_x), abs(self.canvas_height) + abs(self.offset_y))
        if not all(math.isfinite(v) for v in extent):
            raise SdrpnError(
                f"Geometry canvas {self.canvas_width!r} x {self.canvas_height!r} with offset "
                f"({self.offset_x!r}, {self.offset_y!r}) is out of the float range"
            )

    @classmethod
    def pad_to_square(cls, width: int, height: int, grid_height: int, grid_width: int) -> Geometry:
        """Image centred on a max(w, h) square (LLaVA-1.5, and Qwen2.5-VL as the paper runs it)."""
        for name, value in (("width", width), ("height", height)):
            if _as_int(value) is None:
                raise SdrpnError(f"image {name} must be a positive integer, got {value!r}")
        side = max(width, height)
        return cls(width, height, side, side, (side - width) / 2, (side - height) / 2, grid_height, grid_width)

    @classmethod
    def identity(cls, width: int, height: int, grid_height: int, grid_width: int) -> Geometry:
        """The grid covers the image exactly (plain resize, non-square grids allowed)."""
        return cls(width, height, width, height, 0.0, 0.0, grid_height, grid_width)

    @property
    def cell_width(self) -> float:
        return self.canvas_width / self.grid_width

    @property
    def cell_height(self) -> float:
        return self.canvas_height / self.grid_height


GROW_RULES = ("centred", "released")
CROP_RULES = ("sdrpn", "released")


@dataclass(frozen=True)
class RoiSettings:
    """Post-processing knobs. The defaults are sdrpn's own rule for 24 x 24 grids; `RoiSettings.released()` and
    `RoiSettings.released_qwen()` are the released code's, which the families take by default.

    Integer knobs take ints (or integral floats such as 3.0, stored as ints); every knob must be a
    finite number in its range, else SdrpnError. ``kernel`` is at most 1001 tokens."""

    sigma: float = 1.0
    kernel: int = 3
    tau: float = 0.15
    min_tokens: int = 2
    grow_below: int = 4
    grow_to: int = 3
    max_side_frac: float = 15 / 24
    window: float = 0.0  # > 0: crop a square of this many tokens centred on each region's mass (see windows_px)
    max_tokens: int = 0  # > 0: drop components of more tokens than this (the released rule: 225 on 24 x 24)
    grow_rule: str = "centred"  # "centred" (sdrpn) or "released" (the released code's integer arithmetic)
    crop_rule: str = "sdrpn"  # stage 2: "sdrpn" (padded crops, component masks) or "released" (see Zoom.crop_tokens)
    components: bool = True  # False: no components, one region around every cell above tau (released Qwen2.5-VL)
    zero_corner_above: int = 0  # > 0: on grids of more tokens, zero the released top-left strip (Qwen2.5-VL: 768)
    # > 0: when a crop is made for an image of more visual tokens than this, stage 2 drops the image's own tokens
    # whose question score (the RPN head's sigmoid(max over the tokens after the image of q.k)) is <= prune_score
    # (the released Qwen2.5-VL code: 1024 and 0.01)
    prune_above: int = 0
    prune_score: float = 0.01

    @classmethod
    def released(cls, tau: float = 0.15) -> RoiSettings:
        """The released LLaVA-1.5 stage-1 rule (`get_bbox_from_noisy_map`): blur (kernel 3, sigma 1), `> tau`,
        8-connected components, 1-token components dropped, those under 4 tokens grown to >= 3 x 3 with the
        released integer arithmetic (a grown box may not reach the last row or column), components of more
        than 225 tokens dropped, no limit on a box's side; and its stage 2 (`crop_rule="released"`)."""
        return cls(tau=tau, max_side_frac=1.0, max_tokens=225, grow_rule="released", crop_rule="released")

    @classmethod
    def released_qwen(cls, tau: float = 0.1) -> RoiSettings:
        """The released Qwen2.5-VL rule (`qwen_src/mm_utils.py`): on grids of more than 768 tokens the top-left
        strip is zeroed (first quarter of column 0 and of row 0), blur, `> tau`, no components: one crop around
        every cell above tau, its tokens kept where the mask resized bilinearly is above 0.5; and when a crop is
        made for an image of more than 1024 visual tokens, the image's own tokens that no token of the question
        looks at (question score <= 0.01) are dropped from stage 2."""
        return cls(
            tau=tau,
            max_side_frac=1.0,
            crop_rule="released",
            components=False,
            zero_corner_above=768,
            prune_above=1024,
            prune_score=0.01,
        )

    def __post_init__(self) -> None:
        tau = self._real("tau")
        if tau is None or not 0 < tau < 1:
            raise SdrpnError(f"tau must be in (0, 1), got {self.tau!r}")
        sigma = self._real("sigma")
        if sigma is None or not math.isfinite(sigma):
            raise SdrpnError(f"sigma must be finite (<= 0 disables smoothing), got {self.sigma!r}")
        kernel = self._integer("kernel")
        if kernel is None or (kernel > 1 and kernel % 2 == 0) or kernel > _MAX_KERNEL:
            raise SdrpnError(
                f"kernel must be an odd integer up to {_MAX_KERNEL} (<= 1 disables smoothing), got {self.kernel!r}"
            )
        min_tokens = self._integer("min_tokens")
        if min_tokens is None or min_tokens < 1:
            raise SdrpnError(f"min_tokens must be an integer >= 1, got {self.min_tokens!r}")
        grow_below = self._integer("grow_below")
        if grow_below is None or grow_below < 0:
            raise SdrpnError(f"grow_below must be an integer >= 0, got {self.grow_below!r}")
        grow_to = self._integer("grow_to")
        if grow_to is None or grow_to < 1:
            raise SdrpnError(f"grow_to must be an integer >= 1, got {self.grow_to!r}")
        max_side_frac = self._real("max_side_frac")
        if max_side_frac is None or not 0 < max_side_frac <= 1:
            raise SdrpnError(f"max_side_frac must be in (0, 1], got {self.max_side_frac!r}")
        window = self._real("window")
        if window is None or not (math.isfinite(window) and window >= 0):
            raise SdrpnError(f"window must be >= 0 tokens (0 = crop the region's token box), got {self.window!r}")
        max_tokens = self._integer("max_tokens")
        if max_tokens is None or max_tokens < 0:
            raise SdrpnError(f"max_tokens must be an integer >= 0 (0 = no limit), got {self.max_tokens!r}")
        if self.grow_rule not in GROW_RULES:
            raise SdrpnError(f"grow_rule must be one of {GROW_RULES}, got {self.grow_rule!r}")
        if self.crop_rule not in CROP_RULES:
            raise SdrpnError(f"crop_rule must be one of {CROP_RULES}, got {self.crop_rule!r}")
        if not isinstance(self.components, bool):
            raise SdrpnError(f"components must be True or False, got {self.components!r}")
        corner = self._integer("zero_corner_above")
        if corner is None or corner < 0:
            raise SdrpnError(f"zero_corner_above must be an integer >= 0, got {self.zero_corner_above!r}")
        prune_above = self._integer("prune_above")
        if prune_above is None or prune_above < 0:
            raise SdrpnError(f"prune_above must be an integer >= 0 (0 = never prune), got {self.prune_above!r}")
        prune_score = self._real("prune_score")
        if prune_score is None or not 0 <= prune_score < 1:
            raise SdrpnError(f"prune_score must be in [0, 1), got {self.prune_score!r}")

    def _integer(self, name: str) -> int | None:
        """The field as an int (stored back as a Python int if it was e.g. 3.0 or a numpy int), or None."""
        value = getattr(self, name)
        number = _as_int(value)
        if number is not None and type(value) is not int:
            object.__setattr__(self, name, number)
        return number

    def _real(self, name: str) -> float | None:
        """The field as a float (stored back as one unless it is an int or float already), or None."""
        value = getattr(self, name)
        number = _as_real(value)
        if number is not None and type(value) not in (int, float):
            object.__setattr__(self, name, number)
        return number


@dataclass
class RoiRegions:
    """What stage 2 needs: 0 boxes -> answer as the base model; 1 -> box crop; 2+ -> masked crop."""

    probability: np.ndarray
    mask: np.ndarray
    boxes: list[GridBox]

    @property
    def union_box(self) -> GridBox | None:
        """The box around all kept components (b_all of Eq. 8), or None when there are none."""
        if not self.boxes:
            return None
        rows0, cols0, rows1, cols1 = zip(*self.boxes)
        return (min(rows0), min(cols0), max(rows1), max(cols1))

    @property
    def empty(self) -> bool:
        return not self.boxes


def _numeric_array(values: object, what: str) -> np.ndarray:
    """`values` as a float64 array (no copy if it is one already); SdrpnError for non-numeric input."""
    try:
        raw = np.asarray(values)
    except (TypeError, ValueError):  # e.g. ragged nested lists
        raise SdrpnError(f"{what} must be a rectangular numeric array") from None
    if raw.dtype.kind not in "biuf":
        raise SdrpnError(f"{what} must be a real numeric array, got dtype {raw.dtype}")
    return np.asarray(raw, dtype=np.float64)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (no overflow warnings for large |logits|)."""
    x = _numeric_array(logits, "logits")
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def probability_grid(logits: np.ndarray, grid_height: int, grid_width: int) -> np.ndarray:
    """RPN logits, flat (N,) in raster order or already (H, W), -> (H, W) probabilities.

    Logits may be +-inf (probability 1 or 0) but not NaN."""
    x = _numeric_array(logits, "RoI logits")
    height, width = _as_int(grid_height), _as_int(grid_width)
    if height is None or width is None or not (1 <= height <= _MAX_SIZE and 1 <= width <= _MAX_SIZE):
        raise SdrpnError(f"grid must be at least 1 x 1 (integers), got {grid_height!r} x {grid_width!r}")
    grid_height, grid_width = height, width
    if x.ndim == 1:
        if x.size != grid_height * grid_width:
            raise SdrpnError(
                f"got {x.size} RoI logits, expected {grid_height} x {grid_width} = {grid_height * grid_width}"
            )
        x = x.reshape(grid_height, grid_width)
    elif x.ndim == 2:
        if x.shape != (grid_height, grid_width):
            raise SdrpnError(f"RoI logits have shape {x.shape}, expected ({grid_height}, {grid_width})")
    else:
        raise SdrpnError(f"RoI logits must be 1-D or 2-D, got shape {x.shape}")
    if np.isnan(x).any():
        raise SdrpnError("RoI logits contain NaN")
    return sigmoid(x)


def _check_map(array: np.ndarray, what: str) -> np.ndarray:
    a = _numeric_array(array, what)
    if a.ndim != 2 or a.size == 0:
        raise SdrpnError(f"{what} must be a non-empty 2-D (H, W) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise SdrpnError(f"{what} contains NaN or infinite values")
    return a


def _check_allowed(allowed: object, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(allowed)
    if mask.dtype != np.bool_ or mask.shape != shape:
        raise SdrpnError(f"allowed must be a bool array of the map's shape {shape}, got {mask.dtype} {mask.shape}")
    return mask


def _grow_box(box: GridBox, side: int, limits: GridBox) -> GridBox:
    """Grow a box to at least side x side about its centre, then clip (not shift) to `limits`
    (a box, usually the whole grid)."""
    r0, c0, r1, c1 = box

    def grow(lo: int, hi: int, limit_lo: int, limit_hi: int) -> tuple[int, int]:
        if hi - lo >= side:
            return lo, hi
        new_lo = (lo + hi - side) // 2  # floor((lo + hi) / 2 - side / 2): odd surplus goes to the low side
        return max(new_lo, limit_lo), min(new_lo + side, limit_hi)

    r0, r1 = grow(r0, r1, limits[0], limits[2])
    c0, c1 = grow(c0, c1, limits[1], limits[3])
    return (r0, c0, r1, c1)


def _grow_box_released(box: GridBox, side: int, limits: GridBox) -> GridBox:
    """The released code's growth: side max(side, extent + 1) about the box centre, truncated with int(), the
    low end clipped at 0 and the high end at the last index (so a grown box never takes the last row or
    column). A box it would leave empty keeps one token."""
    r0, c0, r1, c1 = box

    def grow(lo: int, hi: int, limit_lo: int, limit_hi: int) -> tuple[int, int]:
        centre, extent = (lo + hi) / 2, max(side, hi - lo + 1)
        new_lo, new_hi = max(limit_lo, int(centre - extent / 2)), min(limit_hi - 1, int(centre + extent / 2))
        return new_lo, max(new_hi, new_lo + 1)

    r0, r1 = grow(r0, r1, limits[0], limits[2])
    c0, c1 = grow(c0, c1, limits[1], limits[3])
    return (r0, c0, r1, c1)


def _smooth(prob: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Gaussian smoothing ('mirror' is OpenCV's default border, and keeps a uniform map uniform at the edges).

    A normalised Gaussian average never leaves the map's range; when values near the float limit make the
    filter overflow anyway, it runs on the map scaled by a power of two and is clipped to that range."""
    # From sigma ~1.3e154 on, sigma**2 is inf and the kernel is flat; scipy would overflow on 4 * sigma.
    sigma = min(sigma, _FLAT_SIGMA)
    out = ndimage.gaussian_filter(prob, sigma, mode="mirror", radius=radius)
    if np.all(np.isfinite(out)):
        return out
    exponent = math.frexp(float(np.max(np.abs(prob))))[1]
    scaled = np.ldexp(prob, -exponent)
    out = ndimage.gaussian_filter(scaled, sigma, mode="mirror", radius=radius)
    return np.ldexp(np.clip(out, scaled.min(), scaled.max()), exponent)


def find_regions(
    probability_map: np.ndarray, settings: RoiSettings = RoiSettings(), *, allowed: np.ndarray | None = None
) -> RoiRegions:
    """Smooth -> threshold (strict >) -> 8-connected components -> filters (Eq. 6-7).

    Filters run in the released order: drop components under ``min_tokens`` (isolated noisy
    tokens), grow components under ``grow_below`` tokens to a ``grow_to`` square (a crop of one or
    two tokens carries no context), drop components whose box is taller or wider than
    ``max_side_frac`` of the grid (a crop that big gains no resolution).

    ``allowed`` (bool, the map's shape; None = every cell) names the cells that may be part of a
    region, e.g. ``image_cells(geometry)`` to keep pad-to-square padding out: only allowed cells are
    thresholded (after smoothing, which still sees the whole map), and a grown box is cut to the
    bounding box of its allowed cells, so the mask is a subset of ``allowed`` and no box reaches into
    rows or columns that hold no allowed cell. ``probability`` is the smoothed map of all cells.
    """
    if not isinstance(settings, RoiSettings):
        raise SdrpnError(f"settings must be RoiSettings, got {type(settings).__name__}")
    prob = _check_map(probability_map, "probability map")
    allowed_mask = None if allowed is None else _check_allowed(allowed, prob.shape)
    if settings.sigma > 0 and settings.kernel > 1:
        prob = _smooth(prob, settings.sigma, settings.kernel // 2)
    grid_h, grid_w = prob.shape
    above = prob > settings.tau
    if allowed_mask is not None:
        above &= allowed_mask
    labels, count = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    mask = np.zeros(prob.shape, dtype=bool)
    boxes: list[GridBox] = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        size = int(sizes[index])
        if size < settings.min_tokens:
            continue
        if settings.max_tokens and size > settings.max_tokens:
            continue
        box = (slices[0].start, slices[1].start, slices[0].stop, slices[1].stop)
        grown = size < settings.grow_below
        if grown:
            grow = _grow_box_released if settings.grow_rule == "released" else _grow_box
            r0, c0, r1, c1 = grow(box, settings.grow_to, (0, 0, grid_h, grid_w))
            if allowed_mask is not None:  # cut to the allowed cells' bounding box within the grown box
                rows = np.flatnonzero(allowed_mask[r0:r1, c0:c1].any(axis=1))
                cols = np.flatnonzero(allowed_mask[r0:r1, c0:c1].any(axis=0))
                r0, r1, c0, c1 = r0 + rows[0], r0 + rows[-1] + 1, c0 + cols[0], c0 + cols[-1] + 1
            box = (r0, c0, r1, c1)
        r0, c0, r1, c1 = box
        limit = settings.max_side_frac + _EPS
        if r1 - r0 > limit * grid_h or c1 - c0 > limit * grid_w:
            continue
        if grown and allowed_mask is None:
            mask[r0:r1, c0:c1] = True
        elif grown:
            mask[r0:r1, c0:c1] |= allowed_mask[r0:r1, c0:c1]
        else:
            mask |= labels == index
        boxes.append((int(r0), int(c0), int(r1), int(c1)))
    return RoiRegions(probability=prob, mask=mask, boxes=boxes)


def _check_grid_box(box: GridBox, geometry: Geometry) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = _box4(box, "grid box", integral=True)
    if not (0 <= r0 < r1 <= geometry.grid_height and 0 <= c0 < c1 <= geometry.grid_width):
        raise SdrpnError(
            f"grid box {tuple(box)} is empty or outside the {geometry.grid_height} x {geometry.grid_width} grid"
        )
    return r0, c0, r1, c1


def _span_to_pixels(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Outward-rounded pixel span clipped to [0, limit], never empty (a box on padding -> 1 px)."""
    lo, hi = _clamp(lo, -1.0, limit + 1.0), _clamp(hi, -1.0, limit + 1.0)  # same result, and floor() of inf can't be
    p0 = min(max(math.floor(lo + _EPS), 0), limit - 1)
    p1 = min(max(math.ceil(hi - _EPS), p0 + 1), limit)
    return p0, p1


def grid_box_to_pixels(box: GridBox, geometry: Geometry) -> PixelBox:
    """Token box -> (x0, y0, x1, y1) in original-image pixels: undo the resize and the pad."""
    geometry = _check_geometry(geometry)
    r0, c0, r1, c1 = _check_grid_box(box, geometry)
    x0, x1 = _span_to_pixels(
        c0 * geometry.cell_width - geometry.offset_x, c1 * geometry.cell_width - geometry.offset_x, geometry.image_width
    )
    y0, y1 = _span_to_pixels(
        r0 * geometry.cell_height - geometry.offset_y,
        r1 * geometry.cell_height - geometry.offset_y,
        geometry.image_height,
    )
    return (x0, y0, x1, y1)


def _crop_token_centres(geometry: Geometry, crop_box_px: PixelBox, crop_geometry: Geometry):
    """Where each crop token's cell centre lies in the ORIGINAL image: (on_image, x, y), all (h, w).

    The centre is mapped to the crop image, then to the original image (crop_geometry's image may be
    the crop resized: the ratio to the box is undone). Centres on the crop's padding are not on_image.
    """
    geometry = _check_geometry(geometry)
    cg = _check_geometry(crop_geometry, "crop geometry")
    x0, y0, x1, y1 = _box4(crop_box_px, "crop box", integral=True)
    if not (0 <= x0 < x1 <= geometry.image_width and 0 <= y0 < y1 <= geometry.image_height):
        raise SdrpnError(
            f"crop box {tuple(crop_box_px)} is empty or outside the "
            f"{geometry.image_width} x {geometry.image_height} image"
        )
    with np.errstate(over="ignore"):  # a far-off padding offset may push centres to +-inf: still not on the image
        u = (np.arange(cg.grid_width) + 0.5) * cg.cell_width - cg.offset_x  # crop-image pixels
        v = (np.arange(cg.grid_height) + 0.5) * cg.cell_height - cg.offset_y
        on_image = (v >= 0)[:, None] & (v < cg.image_height)[:, None] & (u >= 0) & (u < cg.image_width)
        x = np.broadcast_to(x0 + u * ((x1 - x0) / cg.image_width), on_image.shape)
        y = np.broadcast_to((y0 + v * ((y1 - y0) / cg.image_height))[:, None], on_image.shape)
    return on_image, x, y


def crop_token_mask(mask: np.ndarray, geometry: Geometry, crop_box_px: PixelBox, crop_geometry: Geometry) -> np.ndarray:
    """Which of the crop's tokens to keep for masked upscaling (the B o E_v(x) of Eq. 8): those whose
    centre falls on an original grid cell that is in ``mask``. Padding of the crop is never kept."""
    geometry = _check_geometry(geometry)
    try:
        mask = np.asarray(mask, dtype=bool)
    except (TypeError, ValueError):
        raise SdrpnError("mask must be a bool (H, W) array") from None
    if mask.shape != (geometry.grid_height, geometry.grid_width):
        raise SdrpnError(f"mask has shape {mask.shape}, expected ({geometry.grid_height}, {geometry.grid_width})")
    on_image, x, y = _crop_token_centres(geometry, crop_box_px, crop_geometry)
    with np.errstate(over="ignore", invalid="ignore"):
        cols = np.clip(np.floor((x + geometry.offset_x) / geometry.cell_width), 0, geometry.grid_width - 1)
        rows = np.clip(np.floor((y + geometry.offset_y) / geometry.cell_height), 0, geometry.grid_height - 1)
    return on_image & mask[rows.astype(int), cols.astype(int)]


def crop_tokens_in_boxes(
    boxes_px: list[PixelBox], geometry: Geometry, crop_box_px: PixelBox, crop_geometry: Geometry
) -> np.ndarray:
    """Masked upscaling for pixel regions (windows): keep the crop's tokens whose centre is in a box."""
    boxes = [_box4(box, "pixel box", integral=False) for box in _sequence(boxes_px, "boxes_px")]
    on_image, x, y = _crop_token_centres(geometry, crop_box_px, crop_geometry)
    inside = np.zeros(on_image.shape, dtype=bool)
    for bx0, by0, bx1, by1 in boxes:
        inside |= (x >= bx0) & (x < bx1) & (y >= by0) & (y < by1)
    return on_image & inside


def _sequence(values: object, what: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise SdrpnError(f"{what} must be a list, got {type(values).__name__}")
    return list(values)


def centre_of_mass(probability: np.ndarray, box: GridBox) -> tuple[float, float]:
    """(row, col) of a region's probability mass in grid units (cell centres at +0.5), sub-token precise.

    The mass is taken over the region's box grown by one token on each side: the neighbours below the
    threshold say on which side of the hot token the object lies. A region without mass -> box centre
    (also when negative values leave no meaningful centre). The box must be non-empty and on the grid.
    """
    prob = _check_map(probability, "probability map")
    r0, c0, r1, c1 = _box4(box, "grid box", integral=True)
    if not (0 <= r0 < r1 <= prob.shape[0] and 0 <= c0 < c1 <= prob.shape[1]):
        raise SdrpnError(f"grid box {tuple(box)} is empty or outside the {prob.shape[0]} x {prob.shape[1]} map")
    centre = ((r0 + r1) / 2, (c0 + c1) / 2)
    g0, h0 = max(r0 - 1, 0), max(c0 - 1, 0)
    g1, h1 = min(r1 + 1, prob.shape[0]), min(c1 + 1, prob.shape[1])
    weights = _scaled(prob[g0:g1, h0:h1])
    total = weights.sum()
    if total <= 0:
        return centre
    rows, cols = np.mgrid[g0:g1, h0:h1] + 0.5
    with np.errstate(over="ignore"):
        row, col = float((rows * weights).sum() / total), float((cols * weights).sum() / total)
    if not (math.isfinite(row) and math.isfinite(col)):  # only reachable with negative weights
        return centre
    return row, col


def windows_px(regions: RoiRegions, geometry: Geometry, side_tokens: float) -> list[PixelBox]:
    """A square of ``side_tokens`` tokens per region, centred on its mass, in original pixels.

    Why: on a coarse grid (a token as large as the detail) a region's token box puts the detail anywhere
    in the crop, often at its edge; a window centred on the mass keeps it near the crop's centre at
    the scale of one token. Windows are shifted (not cut) to lie inside the image.
    """
    geometry = _check_geometry(geometry)
    side = _as_real(side_tokens)
    if side is None or not (math.isfinite(side) and side >= 0):
        raise SdrpnError(f"window side must be a finite number of tokens >= 0, got {side_tokens!r}")
    probability = _check_map(regions.probability, "regions' probability map")
    if probability.shape != (geometry.grid_height, geometry.grid_width):
        raise SdrpnError(
            f"regions' probability map has shape {probability.shape}, "
            f"expected ({geometry.grid_height}, {geometry.grid_width})"
        )
    size = (geometry.image_width, geometry.image_height)
    side_px = side * max(geometry.cell_width, geometry.cell_height)
    # A side beyond the image is cut to the image's anyway (expand_box_px): cap it before ceil() can overflow.
    min_side = math.ceil(side_px) if side_px < max(size) else max(size)
    windows = []
    for box in regions.boxes:
        row, col = centre_of_mass(probability, box)
        x, y = col * geometry.cell_width - geometry.offset_x, row * geometry.cell_height - geometry.offset_y
        x = _clamp(x, 0.0, size[0] - 1.0)
        y = _clamp(y, 0.0, size[1] - 1.0)
        seed_px = (math.floor(x), math.floor(y), math.floor(x) + 1, math.floor(y) + 1)
        windows.append(expand_box_px(seed_px, size, min_side=min_side))
    return windows


def union_px(boxes: list[PixelBox]) -> PixelBox:
    """The smallest pixel box holding all boxes (the masked-upscaling crop of windows); at least one box."""
    boxes = _sequence(boxes, "boxes")
    for box in boxes:
        _box4(box, "pixel box", integral=False)
    if not boxes:
        raise SdrpnError("union_px needs at least one box")
    x0s, y0s, x1s, y1s = zip(*(tuple(box) for box in boxes))
    return (min(x0s), min(y0s), max(x1s), max(y1s))


def best_window(
    attention_map: np.ndarray,
    window_fracs: tuple[float, ...] = (0.25, 0.375, 0.5, 0.75),
    stride: int = 1,
) -> GridBox:
    """ViCrop-style multi-scale sliding window: the square that gains most attention over uniform.

    Score = mass inside / total mass - window area / grid area, so a larger window must earn its
    extra area. Ties (e.g. one hot token inside many windows) go to the window whose centre is
    nearest the map's centre of mass, then to the larger window, so the hot spot ends up centred
    rather than in a corner. An all-zero map has no preference: the largest window, centred.
    """
    a = _check_map(attention_map, "attention map")
    if np.any(a < 0):
        raise SdrpnError("attention map must be non-negative")
    try:
        fracs = tuple(window_fracs)
    except TypeError:
        fracs = ()
    reals = [_as_real(f) for f in fracs]
    if not reals or any(f is None or not 0 < f <= 1 for f in reals):
        raise SdrpnError(f"window_fracs must be non-empty, each in (0, 1], got {window_fracs!r}")
    step = _as_int(stride)
    if step is None or step < 1:
        raise SdrpnError(f"stride must be an integer >= 1, got {stride!r}")
    h, w = a.shape
    sides = sorted({min(max(1, round(f * min(h, w))), min(h, w)) for f in reals})
    a = _scaled(a)  # exact power-of-two scaling: sums of values near 1e308 must not overflow
    total = a.sum()
    if total <= 0:
        k = sides[-1]
        r0, c0 = (h - k) // 2, (w - k) // 2
        return (r0, c0, r0 + k, c0 + k)
    integral = np.pad(np.cumsum(np.cumsum(a, axis=0), axis=1), ((1, 0), (1, 0)))
    rows, cols = np.indices(a.shape)
    centre = ((rows * a).sum() / total, (cols * a).sum() / total)
    view = min(step, max(h, w))  # a stride beyond the map keeps only the first window, as this one does
    candidates = []  # (score, -distance to centre of mass, side, r0, c0)
    for k in sides:
        sums = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
        scores = (sums / total - k * k / (h * w))[::view, ::view]
        top = scores.max()
        for i, j in np.argwhere(scores >= top - 1e-12):
            r0, c0 = int(i) * step, int(j) * step
            dist = math.hypot(r0 + (k - 1) / 2 - centre[0], c0 + (k - 1) / 2 - centre[1])
            candidates.append((round(float(top), 12), -dist, k, r0, c0))
    _, _, k, r0, c0 = max(candidates, key=lambda c: c[:3])
    return (r0, c0, r0 + k, c0 + k)


def expand_box_px(box_px: PixelBox, image_size: tuple[int, int], min_side: int, scale: float = 1.0) -> PixelBox:
    """Scale a pixel box about its centre, grow it to >= min_side per side, shift it inside the image.

    ``image_size`` is (width, height). Crops of a few pixels upscale into noise, hence the floor;
    a side never exceeds the image's.
    """
    try:
        sizes = tuple(_as_int(v) for v in image_size)
    except TypeError:
        sizes = ()
    if len(sizes) != 2 or any(v is None or v < 1 for v in sizes):
        raise SdrpnError(f"image size must be 2 positive integers, got {image_size!r}")
    width, height = sizes
    factor = _as_real(scale)
    if factor is None or not (factor > 0 and math.isfinite(factor)):
        raise SdrpnError(f"scale must be positive, got {scale!r}")
    floor_side = _as_int(min_side)
    if floor_side is None or floor_side < 0:
        raise SdrpnError(f"min_side must be an integer >= 0, got {min_side!r}")
    x0, y0, x1, y1 = _box4(box_px, "pixel box", integral=False)
    if not (x1 > x0 and y1 > y0):
        raise SdrpnError(f"pixel box {tuple(box_px)} is empty")

    def fit(lo: float, hi: float, limit: int) -> tuple[int, int]:
        span = (hi - lo) * factor - _EPS  # may overflow to inf for a huge box or scale: then the side is the limit
        side = min(max(math.ceil(span) if span < limit else limit, floor_side, 1), limit)
        start = round(lo / 2 + hi / 2 - side / 2)  # halves first: lo + hi may overflow
        start = min(max(start, 0), limit - side)
        return start, start + side

    nx0, nx1 = fit(x0, x1, width)
    ny0, ny1 = fit(y0, y1, height)
    return (nx0, ny0, nx1, ny1)


def image_cells(geometry: Geometry) -> np.ndarray:
    """(H, W) bool: grid cells that show some of the image, not only pad-to-square padding.

    Regions are chosen among these only (``find_regions(..., allowed=image_cells(geometry))``), so a
    crop never lands on padding."""
    geometry = _check_geometry(geometry)
    with np.errstate(over="ignore"):  # the far edge of a canvas at the float limit may round to inf: still correct
        rows = np.arange(geometry.grid_height + 1) * geometry.cell_height - geometry.offset_y
        cols = np.arange(geometry.grid_width + 1) * geometry.cell_width - geometry.offset_x
    row_in = (rows[1:] > 0) & (rows[:-1] < geometry.image_height)
    col_in = (cols[1:] > 0) & (cols[:-1] < geometry.image_width)
    return row_in[:, None] & col_in[None, :]


VICROP_RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


def vicrop_window(
    attention_map: np.ndarray, geometry: Geometry, base_px: float, ratios: tuple[float, ...] = VICROP_RATIOS
) -> tuple[GridBox, PixelBox]:
    """ViCrop's adaptive window (its official `bbox_from_att_image_adaptive`), on the grid's canvas.

    For each size ``base_px * ratio`` (in whole tokens of the canvas) the window position with the largest
    attention sum is found (the first in column-major order, as its loops run); its score is that sum minus the
    mean of the sums one token left, right, up and down, per token of the window; the best-scoring size wins.
    The window of that size is centred on the chosen block, clamped inside the canvas, and returned as its token
    box and as original-image pixels (the official code maps the map onto the whole image, which is wrong for
    a padded non-square image; here the canvas is undone). Windows as large as the grid give the whole image."""
    a = _check_map(attention_map, "attention map")
    if a.shape != (geometry.grid_height, geometry.grid_width):
        raise SdrpnError(
            f"attention map has shape {a.shape}, expected the grid {geometry.grid_height} x {geometry.grid_width}"
        )
    if not (math.isfinite(base_px) and base_px > 0):
        raise SdrpnError(f"base_px must be a positive number of pixels, got {base_px!r}")
    rows, cols = a.shape
    cell_w, cell_h = geometry.cell_width, geometry.cell_height
    whole = ((0, 0, rows, cols), (0, 0, geometry.image_width, geometry.image_height))
    integral = np.pad(np.cumsum(np.cumsum(a / max(float(a.max()), 1e-300), axis=0), axis=1), ((1, 0), (1, 0)))
    candidates = []  # (score, ratio, x, y, bw, bh)
    for ratio in ratios:
        bw = min(int(base_px * ratio / cell_w), cols)
        bh = min(int(base_px * ratio / cell_h), rows)
        if cols - bw < 1 and rows - bh < 1:
            if ratio == ratios[0]:
                return whole
            continue
        bw, bh = max(bw, 1), max(bh, 1)
        sums = integral[bh:, bw:] - integral[:-bh, bw:] - integral[bh:, :-bw] + integral[:-bh, :-bw]  # (y, x)
        x, y = divmod(int(np.argmax(sums.T)), sums.shape[0])  # column-major: the official loops' first maximum
        best = sums[y, x]
        neighbours = [sums[y, x + dx] for dx in (-1, 1) if 0 <= x + dx < sums.shape[1]]
        neighbours += [sums[y + dy, x] for dy in (-1, 1) if 0 <= y + dy < sums.shape[0]]
        score = (best - float(np.mean(neighbours))) / (bw * bh) if neighbours else -math.inf
        candidates.append((score, ratio, x, y, bw, bh))
    if not candidates:
        return whole
    _, ratio, x, y, bw, bh = candidates[int(np.argmax([c[0] for c in candidates]))]
    size = base_px * ratio
    half = size // 2
    centre_x = int(x * cell_w + cell_w * bw / 2)
    centre_y = int(y * cell_h + cell_h * bh / 2)
    centre_x = min(max(centre_x, half), geometry.canvas_width - half)
    centre_y = min(max(centre_y, half), geometry.canvas_height - half)
    x0, x1 = max(0.0, centre_x - half), min(geometry.canvas_width, centre_x + half)
    y0, y1 = max(0.0, centre_y - half), min(geometry.canvas_height, centre_y + half)
    px0, px1 = _span_to_pixels(x0 - geometry.offset_x, x1 - geometry.offset_x, geometry.image_width)
    py0, py1 = _span_to_pixels(y0 - geometry.offset_y, y1 - geometry.offset_y, geometry.image_height)
    return (y, x, y + bh, x + bw), (px0, py0, px1, py1)
