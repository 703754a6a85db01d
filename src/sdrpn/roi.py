"""Turn an RoI map into crops: SD-RPN's stage-1 post-processing (paper section 3.4).

Everything here works on small (H, W) token grids with numpy and scipy.ndimage, so it runs and
is tested without torch or a model. Boxes on the token grid are ``(row0, col0, row1, col1)``
half-open; boxes in pixels are ``(x0, y0, x1, y1)`` half-open, in ORIGINAL image pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sdrpn.errors import SdrpnError

GridBox = tuple[int, int, int, int]
PixelBox = tuple[int, int, int, int]

_EPS = 1e-6  # absorbs float noise when a token edge lands exactly on a pixel edge


@dataclass(frozen=True)
class Geometry:
    """How an original image maps onto the model's token grid (the grid covers a canvas).

    The canvas is in ORIGINAL pixel units, so padding (e.g. LLaVA's pad-to-square) is just an
    offset and resizing is just the grid's cell size; no resize factor has to be carried around.
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
            if int(value) != value or value < 1:
                raise SdrpnError(f"Geometry.{name} must be a positive integer, got {value!r}")
        if not (self.canvas_width > 0 and self.canvas_height > 0):
            raise SdrpnError(f"Geometry canvas must be positive, got {self.canvas_width!r} x {self.canvas_height!r}")

    @classmethod
    def pad_to_square(cls, width: int, height: int, grid_height: int, grid_width: int) -> Geometry:
        """Image centred on a max(w, h) square (LLaVA-1.5, and Qwen2.5-VL as the paper runs it)."""
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


@dataclass(frozen=True)
class RoiSettings:
    """Post-processing knobs; defaults are the released LLaVA-1.5 settings (24 x 24 grid)."""

    sigma: float = 1.0
    kernel: int = 3
    tau: float = 0.15
    min_tokens: int = 2
    grow_below: int = 4
    grow_to: int = 3
    max_side_frac: float = 15 / 24
    window: float = 0.0  # > 0: crop a square of this many tokens centred on each region's mass (see windows_px)

    def __post_init__(self) -> None:
        if not (0 < self.tau < 1):
            raise SdrpnError(f"tau must be in (0, 1), got {self.tau!r}")
        if not math.isfinite(self.sigma):
            raise SdrpnError(f"sigma must be finite (<= 0 disables smoothing), got {self.sigma!r}")
        if int(self.kernel) != self.kernel or (self.kernel > 1 and self.kernel % 2 == 0):
            raise SdrpnError(f"kernel must be an odd integer (<= 1 disables smoothing), got {self.kernel!r}")
        if int(self.min_tokens) != self.min_tokens or self.min_tokens < 1:
            raise SdrpnError(f"min_tokens must be an integer >= 1, got {self.min_tokens!r}")
        if int(self.grow_below) != self.grow_below or self.grow_below < 0:
            raise SdrpnError(f"grow_below must be an integer >= 0, got {self.grow_below!r}")
        if int(self.grow_to) != self.grow_to or self.grow_to < 1:
            raise SdrpnError(f"grow_to must be an integer >= 1, got {self.grow_to!r}")
        if not (0 < self.max_side_frac <= 1):
            raise SdrpnError(f"max_side_frac must be in (0, 1], got {self.max_side_frac!r}")
        if not (math.isfinite(self.window) and self.window >= 0):
            raise SdrpnError(f"window must be >= 0 tokens (0 = crop the region's token box), got {self.window!r}")


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


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (no overflow warnings for large |logits|)."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def probability_grid(logits: np.ndarray, grid_height: int, grid_width: int) -> np.ndarray:
    """RPN logits, flat (N,) in raster order or already (H, W), -> (H, W) probabilities."""
    x = np.asarray(logits)
    if grid_height < 1 or grid_width < 1:
        raise SdrpnError(f"grid must be at least 1 x 1, got {grid_height} x {grid_width}")
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
    return sigmoid(x)


def _check_map(array: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise SdrpnError(f"{what} must be a non-empty 2-D (H, W) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise SdrpnError(f"{what} contains NaN or infinite values")
    return a


def _grow_box(box: GridBox, side: int, grid_h: int, grid_w: int) -> GridBox:
    """Grow a box to at least side x side about its centre, then clip (not shift) to the grid."""
    r0, c0, r1, c1 = box

    def grow(lo: int, hi: int, limit: int) -> tuple[int, int]:
        if hi - lo >= side:
            return lo, hi
        new_lo = math.floor((lo + hi) / 2 - side / 2)  # odd surplus goes to the low side
        return max(new_lo, 0), min(new_lo + side, limit)

    r0, r1 = grow(r0, r1, grid_h)
    c0, c1 = grow(c0, c1, grid_w)
    return (r0, c0, r1, c1)


def find_regions(probability_map: np.ndarray, settings: RoiSettings = RoiSettings()) -> RoiRegions:
    """Smooth -> threshold (strict >) -> 8-connected components -> filters (Eq. 6-7).

    Filters run in the released order: drop components under ``min_tokens`` (isolated noisy
    tokens), grow components under ``grow_below`` tokens to a ``grow_to`` square (a crop of one or
    two tokens carries no context), drop components whose box is taller or wider than
    ``max_side_frac`` of the grid (a crop that big gains no resolution).
    """
    prob = _check_map(probability_map, "probability map")
    if settings.sigma > 0 and settings.kernel > 1:
        # 'mirror' is OpenCV's default border, and keeps a uniform map uniform at the edges.
        prob = ndimage.gaussian_filter(prob, settings.sigma, mode="mirror", radius=settings.kernel // 2)
    grid_h, grid_w = prob.shape
    labels, count = ndimage.label(prob > settings.tau, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    mask = np.zeros(prob.shape, dtype=bool)
    boxes: list[GridBox] = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        if sizes[index] < settings.min_tokens:
            continue
        box = (slices[0].start, slices[1].start, slices[0].stop, slices[1].stop)
        grown = sizes[index] < settings.grow_below
        if grown:
            box = _grow_box(box, settings.grow_to, grid_h, grid_w)
        r0, c0, r1, c1 = box
        limit = settings.max_side_frac + _EPS
        if r1 - r0 > limit * grid_h or c1 - c0 > limit * grid_w:
            continue
        if grown:
            mask[r0:r1, c0:c1] = True
        else:
            mask |= labels == index
        boxes.append((int(r0), int(c0), int(r1), int(c1)))
    return RoiRegions(probability=prob, mask=mask, boxes=boxes)


def _check_grid_box(box: GridBox, geometry: Geometry) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = (int(v) for v in box)
    if not (0 <= r0 < r1 <= geometry.grid_height and 0 <= c0 < c1 <= geometry.grid_width):
        raise SdrpnError(
            f"grid box {tuple(box)} is empty or outside the {geometry.grid_height} x {geometry.grid_width} grid"
        )
    return r0, c0, r1, c1


def _span_to_pixels(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Outward-rounded pixel span clipped to [0, limit], never empty (a box on padding -> 1 px)."""
    p0 = min(max(math.floor(lo + _EPS), 0), limit - 1)
    p1 = min(max(math.ceil(hi - _EPS), p0 + 1), limit)
    return p0, p1


def grid_box_to_pixels(box: GridBox, geometry: Geometry) -> PixelBox:
    """Token box -> (x0, y0, x1, y1) in original-image pixels: undo the resize and the pad."""
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
    x0, y0, x1, y1 = (int(v) for v in crop_box_px)
    if not (0 <= x0 < x1 <= geometry.image_width and 0 <= y0 < y1 <= geometry.image_height):
        raise SdrpnError(
            f"crop box {tuple(crop_box_px)} is empty or outside the "
            f"{geometry.image_width} x {geometry.image_height} image"
        )
    cg = crop_geometry
    u = (np.arange(cg.grid_width) + 0.5) * cg.cell_width - cg.offset_x  # crop-image pixels
    v = (np.arange(cg.grid_height) + 0.5) * cg.cell_height - cg.offset_y
    on_image = (v >= 0)[:, None] & (v < cg.image_height)[:, None] & (u >= 0) & (u < cg.image_width)
    x = np.broadcast_to(x0 + u * ((x1 - x0) / cg.image_width), on_image.shape)
    y = np.broadcast_to((y0 + v * ((y1 - y0) / cg.image_height))[:, None], on_image.shape)
    return on_image, x, y


def crop_token_mask(mask: np.ndarray, geometry: Geometry, crop_box_px: PixelBox, crop_geometry: Geometry) -> np.ndarray:
    """Which of the crop's tokens to keep for masked upscaling (the B o E_v(x) of Eq. 8): those whose
    centre falls on an original grid cell that is in ``mask``. Padding of the crop is never kept."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (geometry.grid_height, geometry.grid_width):
        raise SdrpnError(f"mask has shape {mask.shape}, expected ({geometry.grid_height}, {geometry.grid_width})")
    on_image, x, y = _crop_token_centres(geometry, crop_box_px, crop_geometry)
    cols = np.clip(np.floor((x + geometry.offset_x) / geometry.cell_width), 0, geometry.grid_width - 1)
    rows = np.clip(np.floor((y + geometry.offset_y) / geometry.cell_height), 0, geometry.grid_height - 1)
    return on_image & mask[rows.astype(int), cols.astype(int)]


def crop_tokens_in_boxes(
    boxes_px: list[PixelBox], geometry: Geometry, crop_box_px: PixelBox, crop_geometry: Geometry
) -> np.ndarray:
    """Masked upscaling for pixel regions (windows): keep the crop's tokens whose centre is in a box."""
    on_image, x, y = _crop_token_centres(geometry, crop_box_px, crop_geometry)
    inside = np.zeros(on_image.shape, dtype=bool)
    for bx0, by0, bx1, by1 in boxes_px:
        inside |= (x >= bx0) & (x < bx1) & (y >= by0) & (y < by1)
    return on_image & inside


def centre_of_mass(probability: np.ndarray, box: GridBox) -> tuple[float, float]:
    """(row, col) of a region's probability mass in grid units (cell centres at +0.5), sub-token precise.

    The mass is taken over the region's box grown by one token on each side: the neighbours below the
    threshold say on which side of the hot token the object lies. A region without mass -> box centre.
    """
    prob = _check_map(probability, "probability map")
    r0, c0, r1, c1 = box
    r0, c0 = max(r0 - 1, 0), max(c0 - 1, 0)
    r1, c1 = min(r1 + 1, prob.shape[0]), min(c1 + 1, prob.shape[1])
    weights = prob[r0:r1, c0:c1]
    total = weights.sum()
    if total <= 0:
        return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rows, cols = np.mgrid[r0:r1, c0:c1] + 0.5
    return float((rows * weights).sum() / total), float((cols * weights).sum() / total)


def windows_px(regions: RoiRegions, geometry: Geometry, side_tokens: float) -> list[PixelBox]:
    """A square of ``side_tokens`` tokens per region, centred on its mass, in original pixels.

    Why: on a coarse grid (a token as large as the detail) a region's token box puts the detail anywhere
    in the crop, often at its edge; a window centred on the mass keeps it near the crop's centre at
    the scale of one token. Windows are shifted (not cut) to lie inside the image.
    """
    side_px = side_tokens * max(geometry.cell_width, geometry.cell_height)
    size = (geometry.image_width, geometry.image_height)
    windows = []
    for box in regions.boxes:
        row, col = centre_of_mass(regions.probability, box)
        x, y = col * geometry.cell_width - geometry.offset_x, row * geometry.cell_height - geometry.offset_y
        x = min(max(x, 0.0), size[0] - 1.0)
        y = min(max(y, 0.0), size[1] - 1.0)
        seed_px = (math.floor(x), math.floor(y), math.floor(x) + 1, math.floor(y) + 1)
        windows.append(expand_box_px(seed_px, size, min_side=math.ceil(side_px)))
    return windows


def union_px(boxes: list[PixelBox]) -> PixelBox:
    """The smallest pixel box holding all boxes (the masked-upscaling crop of windows)."""
    x0s, y0s, x1s, y1s = zip(*boxes)
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
    if not window_fracs or any(not (0 < f <= 1) for f in window_fracs):
        raise SdrpnError(f"window_fracs must be non-empty, each in (0, 1], got {tuple(window_fracs)}")
    if int(stride) != stride or stride < 1:
        raise SdrpnError(f"stride must be an integer >= 1, got {stride!r}")
    h, w = a.shape
    sides = sorted({min(max(1, round(f * min(h, w))), min(h, w)) for f in window_fracs})
    total = a.sum()
    if total <= 0:
        k = sides[-1]
        r0, c0 = (h - k) // 2, (w - k) // 2
        return (r0, c0, r0 + k, c0 + k)
    integral = np.pad(np.cumsum(np.cumsum(a, axis=0), axis=1), ((1, 0), (1, 0)))
    rows, cols = np.indices(a.shape)
    centre = ((rows * a).sum() / total, (cols * a).sum() / total)
    candidates = []  # (score, -distance to centre of mass, side, r0, c0)
    for k in sides:
        sums = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
        scores = (sums / total - k * k / (h * w))[::stride, ::stride]
        top = scores.max()
        for i, j in np.argwhere(scores >= top - 1e-12):
            r0, c0 = int(i) * stride, int(j) * stride
            dist = math.hypot(r0 + (k - 1) / 2 - centre[0], c0 + (k - 1) / 2 - centre[1])
            candidates.append((round(float(top), 12), -dist, k, r0, c0))
    _, _, k, r0, c0 = max(candidates, key=lambda c: c[:3])
    return (r0, c0, r0 + k, c0 + k)


def expand_box_px(box_px: PixelBox, image_size: tuple[int, int], min_side: int, scale: float = 1.0) -> PixelBox:
    """Scale a pixel box about its centre, grow it to >= min_side per side, shift it inside the image.

    ``image_size`` is (width, height). Crops of a few pixels upscale into noise, hence the floor;
    a side never exceeds the image's.
    """
    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1:
        raise SdrpnError(f"image size must be positive, got {tuple(image_size)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise SdrpnError(f"scale must be positive, got {scale!r}")
    if min_side < 0:
        raise SdrpnError(f"min_side must be >= 0, got {min_side!r}")
    x0, y0, x1, y1 = box_px
    if not (x1 > x0 and y1 > y0):
        raise SdrpnError(f"pixel box {tuple(box_px)} is empty")

    def fit(lo: float, hi: float, limit: int) -> tuple[int, int]:
        side = min(max(math.ceil((hi - lo) * scale - _EPS), min_side, 1), limit)
        start = round((lo + hi) / 2 - side / 2)
        start = min(max(start, 0), limit - side)
        return start, start + side

    nx0, nx1 = fit(x0, x1, width)
    ny0, ny1 = fit(y0, y1, height)
    return (nx0, ny0, nx1, ny1)


def image_cells(geometry: Geometry) -> np.ndarray:
    """(H, W) bool: grid cells that show some of the image, not only pad-to-square padding.

    Regions are chosen among these only, so a crop never lands on padding."""
    rows = np.arange(geometry.grid_height + 1) * geometry.cell_height - geometry.offset_y
    cols = np.arange(geometry.grid_width + 1) * geometry.cell_width - geometry.offset_x
    row_in = (rows[1:] > 0) & (rows[:-1] < geometry.image_height)
    col_in = (cols[1:] > 0) & (cols[:-1] < geometry.image_width)
    return row_in[:, None] & col_in[None, :]
