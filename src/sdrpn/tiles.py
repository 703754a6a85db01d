"""ViCrop's high-resolution variant (its official `rel_att_high`): split the image into tiles, compute a map for
every tile, stitch the tiles' maps into one map over the whole image.

The split is the official one (`utils.py`: `high_res_split_threshold`): rows = ceil(H / 1024), columns =
int(rows * W / H), tiles of ceil(W / columns) x ceil(H / rows) px, row-major. Three flaws of the official code are
not copied:

- a portrait image gets int(rows * W / H) = 0 columns there; here at least 1;
- tiles of the last row/column may reach past the image, and the official crop pads them black; here every tile
  is clipped to the image, and a tile wholly outside it (very wide images) is left out;
- the official `np.block` lays each tile's map over the whole tile, although the processor did not show the tile
  as it is (LLaVA's centre crop there; sdrpn pads to a square); here each tile cell is placed where its Geometry
  says it lies on the tile, so cells of padding cover nothing.

Stitching resamples by area: the stitched grid is uniform over the whole unpadded image, its cells about the size
of the first tile's, and each of its cells is the area-weighted mean of the tile cells it overlaps. Tiles of
unequal size (a clipped last row/column, a differently padded tile) thus join without gaps or seams. One tile
(the whole image) needs no stitching: its map stays on its own grid, so such an image gets the plain map.
"""

from __future__ import annotations

import math

import numpy as np

from sdrpn.errors import SdrpnError
from sdrpn.roi import Geometry, PixelBox

TILE_SIDE = 1024  # the official `res_threshold`: no tile is taller than this


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SdrpnError(f"image {name} must be a positive integer, got {value!r}")


def tile_counts(width: int, height: int) -> tuple[int, int]:
    """(columns, rows) of the official split, with at least one column (the official code gives a portrait image
    none)."""
    _check_size(width, height)
    rows = math.ceil(height / TILE_SIDE)
    return max(1, int(rows * width / height)), rows


def tile_boxes(width: int, height: int) -> list[PixelBox]:
    """The tiles as (x0, y0, x1, y1) pixel boxes, row-major, clipped to the image; together they cover it once."""
    columns, rows = tile_counts(width, height)
    tile_width, tile_height = math.ceil(width / columns), math.ceil(height / rows)
    return [
        (x, y, min(x + tile_width, width), min(y + tile_height, height))
        for y in range(0, rows * tile_height, tile_height)
        for x in range(0, columns * tile_width, tile_width)
        if x < width and y < height
    ]


def stitched_geometry(width: int, height: int, shape: tuple[int, int]) -> Geometry:
    """How a stitched map of `shape` (rows, columns) lies on the image: uniform cells over the whole of it."""
    return Geometry.identity(width, height, *shape)


def _stitched_shape(width: int, height: int, first_tile: Geometry) -> tuple[int, int]:
    """(rows, columns) of the stitched grid: cells about as large, in image pixels, as the first tile's (a whole
    tile: the clipped ones come last)."""
    return max(1, round(height / first_tile.cell_height)), max(1, round(width / first_tile.cell_width))


def _tile_cell_spans(count: int, cell: float, offset: float, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Where a tile's cells lie along one axis, in image pixels, clipped to the tile (padding cells: empty)."""
    edges = np.clip(np.arange(count + 1) * cell - offset, 0, length) + start
    return edges[:-1], edges[1:]


def _overlaps(edges: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(cells, spans): the length of each cell [edges[i], edges[i + 1]) inside each span [starts[j], ends[j])."""
    return np.clip(np.minimum(edges[1:, None], ends[None]) - np.maximum(edges[:-1, None], starts[None]), 0, None)


def stitch_maps(
    maps: list[np.ndarray], geometries: list[Geometry], boxes: list[PixelBox], width: int, height: int
) -> np.ndarray:
    """The tiles' maps (each on its tile's grid, `geometries` saying how) as one map over the whole image, on the
    grid `stitched_geometry(width, height, result.shape)`; one tile: its own map, on its own grid."""
    _check_size(width, height)
    if not len(maps) == len(geometries) == len(boxes) >= 1:
        raise SdrpnError(f"got {len(maps)} tile maps, {len(geometries)} geometries and {len(boxes)} tile boxes")
    for tile_map, geometry, (x0, y0, x1, y1) in zip(maps, geometries, boxes):
        if np.shape(tile_map) != (geometry.grid_height, geometry.grid_width):
            raise SdrpnError(
                f"a tile map has shape {np.shape(tile_map)}, its grid is {geometry.grid_height} x {geometry.grid_width}"
            )
        if (geometry.image_width, geometry.image_height) != (x1 - x0, y1 - y0) or not (
            0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
        ):
            raise SdrpnError(f"tile box {(x0, y0, x1, y1)} does not match its geometry or the {width} x {height} image")
    if sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes) != width * height:
        raise SdrpnError(f"the tile boxes do not cover the {width} x {height} image once")
    if len(maps) == 1:
        return np.asarray(maps[0], dtype=np.float64)
    rows, columns = _stitched_shape(width, height, geometries[0])
    row_edges, column_edges = np.linspace(0, height, rows + 1), np.linspace(0, width, columns + 1)
    stitched = np.zeros((rows, columns))
    for tile_map, geometry, (x0, y0, x1, y1) in zip(maps, geometries, boxes):
        across = _tile_cell_spans(geometry.grid_width, geometry.cell_width, geometry.offset_x, x0, x1 - x0)
        down = _tile_cell_spans(geometry.grid_height, geometry.cell_height, geometry.offset_y, y0, y1 - y0)
        stitched += _overlaps(row_edges, *down) @ np.asarray(tile_map, np.float64) @ _overlaps(column_edges, *across).T
    return stitched / (np.diff(row_edges)[:, None] * np.diff(column_edges)[None])
