"""Pictures of where the model looked: the image, its RoI heat map and the boxes, at the image's size, and
optionally a strip of what it read there (each box cropped from the original image, enlarged)."""

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


def with_crops(picture: Image.Image, image: Image.Image, boxes: list[PixelBox], gap: int = 4) -> Image.Image:
    """The picture with a strip on its right: each box's crop of ``image``, stacked and enlarged to the strip's
    width, so the detail the second stage reads can be seen, not only where it was."""
    if not boxes:
        return picture
    side = picture.height // len(boxes) - gap
    strip = Image.new("RGB", (picture.width + gap + side, picture.height), (255, 255, 255))
    strip.paste(picture, (0, 0))
    source = image.convert("RGB")
    for index, box in enumerate(boxes):
        crop = source.crop(box)
        scale = side / max(crop.size)
        size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
        crop = crop.resize(size, Image.NEAREST if scale >= 1 else Image.BICUBIC)  # enlarged pixels stay sharp
        strip.paste(crop, (picture.width + gap, index * (side + gap)))
    return strip


def save_overlay(
    path: str | Path, image: Image.Image, probability, geometry, boxes, *, show_crops: bool = False
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = draw_overlay(image, probability, geometry, boxes)
    if show_crops:
        picture = with_crops(picture, image, boxes)
    picture.save(path, format="PNG")
    return path
