"""Pins `sdrpn ask`: every method answers as JSON and writes an image-sized PNG overlay; bad input exits 2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn.cli import main
from sdrpn.models import load_model
from sdrpn.rpn import RegionProposalNetwork
from tests.conftest import random_images

QUESTION = "what colour is the object ?"
IMAGE_SIZE = (90, 60)  # not square: the overlay must undo LLaVA's pad-to-square


@pytest.fixture(scope="module")
def rpn_dir(model_dir, tmp_path_factory):
    """A fresh RPN bound to the saved tiny model (its fingerprint and weights digest), q scaled up so
    that its random map is peaked enough for a mid threshold to keep part of it."""
    adapter = load_model(str(model_dir))
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(adapter, 2, 3)
    with torch.no_grad():
        rpn.q_proj.weight.mul_(100.0)
    return rpn.save(tmp_path_factory.mktemp("rpn"))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ask") / "photo.png"
    random_images(1, seed=19, size=IMAGE_SIZE)[0].save(path)
    return path


def _ask(model_dir, image, *extra: str) -> list[str]:
    return [
        "ask",
        "--model",
        str(model_dir),
        "--image",
        str(image),
        "--question",
        QUESTION,
        "--max-new-tokens",
        "4",
        *extra,
    ]


# For this image (seed 19) and RPN, tau 0.69 keeps one 2 x 2 block of the smoothed map (margin 0.03).
@pytest.mark.parametrize("method", ["sdrpn", "base", "raw-attention", "vicrop"])
def test_ask_json_and_overlay(model_dir, rpn_dir, image_path, tmp_path, capsys, method):
    overlay = tmp_path / "out" / f"{method}.png"
    argv = _ask(
        model_dir,
        image_path,
        "--rpn",
        str(rpn_dir),
        "--method",
        method,
        "--tau",
        "0.69",
        "--save-overlay",
        str(overlay),
        "--json",
    )
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert {"answer", "method", "boxes", "roi_map", "timings", "extra_tokens", "overlay"} <= set(result)
    assert result["method"] == method
    assert isinstance(result["answer"], str)
    assert result["overlay"] == str(overlay)
    assert set(result["timings"]) == {"roi", "encode_crops", "generate", "total", "batch_size"}
    assert all(v >= 0 for v in result["timings"].values())
    width, height = IMAGE_SIZE
    for x0, y0, x1, y1 in result["boxes"]:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    if method == "base":
        assert result["roi_map"] is None and result["boxes"] == [] and result["extra_tokens"] == 0
    else:
        roi_map = np.array(result["roi_map"])
        assert roi_map.shape == tuple(result["grid"]) and np.all((roi_map >= 0) & (roi_map <= 1))
    if method in ("sdrpn", "vicrop"):
        assert result["boxes"], f"{method} proposed no box: the overlay's box drawing is not exercised"
        assert result["extra_tokens"] > 0

    original = Image.open(image_path).convert("RGB")
    with Image.open(overlay) as picture:
        assert picture.format == "PNG"
        assert picture.size == original.size
        drawn = np.asarray(picture.convert("RGB"))
    if method == "base":  # no map, no boxes: the overlay is the image itself
        assert np.array_equal(drawn, np.asarray(original))
    else:
        assert not np.array_equal(drawn, np.asarray(original))
    for x0, y0, x1, y1 in result["boxes"]:
        assert tuple(drawn[y0, x0]) == (0, 255, 0)
        assert tuple(drawn[y1 - 1, x1 - 1]) == (0, 255, 0)


def test_ask_plain_output(model_dir, image_path, capsys):
    assert main(_ask(model_dir, image_path)) == 0  # no RPN: the base model
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) <= 1
    assert "method base" in err and "extra visual tokens 0" in err


def _one_line_error(capsys, *expected: str) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sdrpn ask: error: ")
    for text in expected:
        assert text in lines[0]
    return lines[0]


def test_missing_image_exits_2(model_dir, tmp_path, capsys):
    assert main(_ask(model_dir, tmp_path / "nope.png")) == 2
    _one_line_error(capsys, "nope.png", "file not found")


def test_non_image_file_exits_2(model_dir, tmp_path, capsys):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am text\nwith two lines\n")
    assert main(_ask(model_dir, path)) == 2
    _one_line_error(capsys, "notes.jpg", "not an image")


def test_corrupt_image_exits_2(model_dir, image_path, tmp_path, capsys):
    data = image_path.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    assert main(_ask(model_dir, path)) == 2
    _one_line_error(capsys, "truncated.png")


def test_directory_as_image_exits_2(model_dir, tmp_path, capsys):
    assert main(_ask(model_dir, tmp_path)) == 2
    _one_line_error(capsys, "directory")


def test_window_crops_squares_of_that_many_tokens(model_dir, rpn_dir, image_path, family, capsys):
    argv = _ask(model_dir, image_path, "--rpn", str(rpn_dir), "--tau", "0.69", "--window", "1.5", "--json")
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["boxes"], "no region: the window is not exercised"
    rows, cols = result["grid"]
    if family == "llava":  # the grid covers the padded square
        cell = max(IMAGE_SIZE) / cols
    else:  # the grid covers the image
        cell = max(IMAGE_SIZE[0] / cols, IMAGE_SIZE[1] / rows)
    side = math.ceil(1.5 * cell)
    for x0, y0, x1, y1 in result["boxes"]:
        assert (x1 - x0, y1 - y0) == (min(side, IMAGE_SIZE[0]), min(side, IMAGE_SIZE[1]))


def test_negative_window_exits_2(model_dir, rpn_dir, image_path, capsys):
    assert main(_ask(model_dir, image_path, "--rpn", str(rpn_dir), "--window", "-2")) == 2
    _one_line_error(capsys, "window", "-2")


def test_tau_out_of_range_exits_2(model_dir, rpn_dir, image_path, tmp_path, capsys):
    overlay = tmp_path / "never.png"
    assert main(_ask(model_dir, image_path, "--rpn", str(rpn_dir), "--tau", "1.5", "--save-overlay", str(overlay))) == 2
    _one_line_error(capsys, "tau", "1.5")
    assert not overlay.exists()


def test_sdrpn_without_rpn_exits_2(model_dir, image_path, capsys):
    assert main(_ask(model_dir, image_path, "--method", "sdrpn")) == 2
    _one_line_error(capsys, "--rpn")


def test_bad_rpn_folder_exits_2(model_dir, image_path, tmp_path, capsys):
    assert main(_ask(model_dir, image_path, "--rpn", str(tmp_path))) == 2
    _one_line_error(capsys, "not an RPN checkpoint")


def test_overlay_heat_lies_on_its_grid_cell():
    """A 90 x 60 image is padded to a 90 x 90 canvas (15 px above): grid cell (1, 2) of the 4 x 4 grid
    spans canvas x 45..67.5, y 22.5..45, i.e. image x 45..67.5, y 7.5..30; pixels whose centre is inside."""
    from sdrpn.overlay import draw_overlay, heatmap_on_image
    from sdrpn.roi import Geometry

    geometry = Geometry.pad_to_square(90, 60, 4, 4)
    probability = np.zeros((4, 4))
    probability[1, 2] = 1.0
    heat = heatmap_on_image(probability, geometry)
    assert heat.shape == (60, 90)
    ys, xs = np.nonzero(heat)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (45, 66, 7, 29)
    assert heat.sum() == (66 - 45 + 1) * (29 - 7 + 1)
    image = Image.new("RGB", (90, 60), (0, 0, 0))
    picture = np.asarray(draw_overlay(image, probability, geometry, []))
    assert picture.shape == (60, 90, 3)
    assert picture[20, 50].sum() > picture[40, 50].sum()  # the hot cell is brighter than a cold one


def test_overlay_crop_strip_shows_each_region_enlarged(tmp_path):
    """Two boxes: the strip to the right holds both crops, stacked, each enlarged to the strip's width."""
    from sdrpn.overlay import save_overlay

    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 0, 0), (10, 10, 30, 30))
    image.paste((0, 0, 255), (150, 60, 170, 80))
    path = save_overlay(tmp_path / "o.png", image, None, None, [(10, 10, 30, 30), (150, 60, 170, 80)], show_crops=True)
    picture = np.asarray(Image.open(path))
    side = 100 // 2 - 4
    assert picture.shape == (100, 200 + 4 + side, 3)
    assert tuple(picture[side // 2, 204 + side // 2]) == (255, 0, 0)
    assert tuple(picture[side + 4 + side // 2, 204 + side // 2]) == (0, 0, 255)
    plain = np.asarray(Image.open(save_overlay(tmp_path / "p.png", image, None, None, [(10, 10, 30, 30)])))
    assert plain.shape == (100, 200, 3)


@pytest.mark.parametrize("flag, prune", [((), True), (("--no-prune",), False)])
def test_no_prune_reaches_the_zoom(model_dir, image_path, capsys, monkeypatch, flag, prune):
    import sdrpn.infer

    seen = {}
    real_load = sdrpn.infer.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(sdrpn.infer, "load", spy)
    assert main([*_ask(model_dir, image_path), *flag]) == 0
    assert seen["prune"] is prune
