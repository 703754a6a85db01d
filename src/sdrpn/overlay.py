"""Pictures of where the model looked: the image, its RoI heat map and the boxes, at the image's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from sdrpn.roi import Geometry, PixelBox


def heatmap_on_image(probability: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The grid map resampled onto the original image's pixels (undoing pad and resize)."""
    xs = (np.arange(geometry.image_width) + 0.5 + geometry.offset_x) / geometry.cell_width
    ys = (np.arange(geometry.image_height) + 0.5 + geometry.offset_y) / geometry.cell_height
    cols = np.clip(xs.astype(int), 0, geometry.grid_width - 1)
    rows = np.clip(ys.astype(int), 0, geometry.grid_height - 1)
    return probability[np.ix_(rows, cols)]


def draw_overlay(
    image: Image.Image,
    probability: np.ndarray | None,
    geometry: Geometry | None,
    boxes: list[PixelBox],
    *,
    alpha: float = 0.45,
    colour: tuple[int, int, int] = (0, 255, 0),
) -> Image.Image:
    """Blend the heat map (if any) over the image and outline each box."""
    picture = image.convert("RGB")
    if probability is not None and geometry is not None:
        heat = heatmap_on_image(np.clip(probability, 0, 1), geometry)
        coloured = (colormaps["inferno"](heat)[..., :3] * 255).astype(np.uint8)
        picture = Image.blend(picture, Image.fromarray(coloured), alpha)
    draw = ImageDraw.Draw(picture)
    width = max(1, round(min(picture.size) / 150))
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width)
    return picture


def save_overlay(path: str | Path, image: Image.Image, probability, geometry, boxes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, probability, geometry, boxes).save(path, format="PNG")
    return path
