"""ViCrop's high-resolution variant: the official split (minus its flaws), area stitching, and `vicrop` with
`vicrop_high_res` end to end on tiny LLaVA and Qwen2.5-VL models, from Python and from the command line."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from sdrpn.cli import main
from sdrpn.errors import SdrpnError
from sdrpn.infer import InferSettings, Zoom, _relative_attention, load
from sdrpn.models import wrap_model
from sdrpn.roi import Geometry, vicrop_window
from sdrpn.tiles import stitch_maps, stitched_geometry, tile_boxes, tile_counts
from tests.conftest import QUESTIONS, build_tiny, random_images

# --- the split ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "counts"),
    [
        ((2100, 900), (2, 1)),  # landscape: int(1 * 2100 / 900) = 2 columns
        ((900, 2100), (1, 3)),  # portrait: ceil(2100 / 1024) = 3 rows, int(3 * 900 / 2100) = 1 column
        ((500, 2000), (1, 2)),  # portrait: int(2 * 500 / 2000) = 0 columns officially; at least 1 here
        ((1024, 1024), (1, 1)),  # square at the threshold: one tile
        ((1025, 1025), (2, 2)),  # square just above it
        ((50, 30), (1, 1)),  # tiny
        ((300, 100), (3, 1)),  # tiny but wide: the official rule splits it too
    ],
)
def test_tile_counts_follow_the_official_split(size, counts):
    assert tile_counts(*size) == counts


def test_tiles_are_clipped_to_the_image():
    assert tile_boxes(2101, 900) == [(0, 0, 1051, 900), (1051, 0, 2101, 900)]  # the official 2nd tile: 1051 px wide
    assert tile_boxes(900, 2050) == [(0, 0, 900, 684), (0, 684, 900, 1368), (0, 1368, 900, 2050)]


def test_a_tile_wholly_outside_the_image_is_left_out():
    boxes = tile_boxes(999, 20)  # 49 columns of ceil(999 / 49) = 21 px: the 49th would start at 1008
    assert len(boxes) == 48
    assert boxes[-1] == (987, 0, 999, 20)


@pytest.mark.parametrize("size", [(999, 20), (2101, 900), (900, 2050), (1500, 1100), (7, 5), (1, 1)])
def test_tiles_cover_the_image_once(size):
    width, height = size
    covered = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in tile_boxes(width, height):
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10.5, 10), (True, 10)])
def test_bad_image_size_is_refused(size):
    with pytest.raises(SdrpnError, match="image (width|height) must be a positive integer"):
        tile_counts(*size)


# --- stitching ----------------------------------------------------------------------------------


def test_tiles_of_unequal_cells_stitch_side_by_side():
    left = np.array([[1.0, 2.0], [3.0, 4.0]])  # 1 px cells: the stitched grid's
    right = np.array([[5.0]])  # one 2 x 2 px cell
    geometries = [Geometry.identity(2, 2, 2, 2), Geometry.identity(2, 2, 1, 1)]
    stitched = stitch_maps([left, right], geometries, [(0, 0, 2, 2), (2, 0, 4, 2)], 4, 2)
    np.testing.assert_array_equal(stitched, [[1, 2, 5, 5], [3, 4, 5, 5]])


def test_padding_cells_of_a_tile_cover_nothing():
    padded = np.array([[100.0] * 4, [1, 2, 3, 4], [5, 6, 7, 8], [100.0] * 4])  # rows 0 and 3: padding
    geometries = [Geometry.pad_to_square(4, 2, 4, 4), Geometry.identity(4, 2, 1, 2)]
    stitched = stitch_maps([padded, np.array([[10.0, 20.0]])], geometries, [(0, 0, 4, 2), (4, 0, 8, 2)], 8, 2)
    np.testing.assert_array_equal(stitched, [[1, 2, 3, 4, 10, 10, 20, 20], [5, 6, 7, 8, 10, 10, 20, 20]])


def test_finer_tile_cells_are_averaged_by_area():
    geometries = [Geometry.identity(2, 2, 1, 1), Geometry.identity(2, 2, 2, 2)]  # 2 px cells, then 1 px cells
    stitched = stitch_maps(
        [np.array([[1.0]]), np.array([[1.0, 2.0], [3.0, 4.0]])], geometries, [(0, 0, 2, 2), (2, 0, 4, 2)], 4, 2
    )
    np.testing.assert_array_equal(stitched, [[1.0, 2.5]])


def test_a_stitched_cell_across_two_tiles_takes_both_by_area():
    geometries = [Geometry.identity(2, 1, 1, 1), Geometry.identity(1, 1, 1, 1)]
    stitched = stitch_maps([np.array([[1.0]]), np.array([[4.0]])], geometries, [(0, 0, 2, 1), (2, 0, 3, 1)], 3, 1)
    # 2 cells of 1.5 px: [0, 1.5) all in the first tile; [1.5, 3): 0.5 px of 1 and 1 px of 4
    np.testing.assert_allclose(stitched, [[1.0, (0.5 * 1 + 1 * 4) / 1.5]])


def test_one_tile_keeps_its_own_map_and_grid():
    tile_map = np.arange(16.0).reshape(4, 4)
    stitched = stitch_maps([tile_map], [Geometry.pad_to_square(6, 4, 4, 4)], [(0, 0, 6, 4)], 6, 4)
    np.testing.assert_array_equal(stitched, tile_map)


def test_the_window_lands_on_the_peak_of_the_right_tile():
    """2100 x 900 px: two 1050 x 900 tiles, each padded to a 1050 px square of 24 x 24 cells (43.75 px, 75 px of
    padding above and below). A peak at cell (12, 6) of the right tile lies at x in [1312.5, 1356.25), y in
    [450, 493.75) of the image; the padding rows hold even larger values, which must not count."""
    width, height = 2100, 900
    boxes = tile_boxes(width, height)
    geometries = [Geometry.pad_to_square(1050, 900, 24, 24)] * 2
    maps = [np.ones((24, 24)), np.ones((24, 24))]
    for tile_map in maps:
        tile_map[[0, 23]] = 1000.0  # wholly padding
    maps[1][12, 6] = 50.0
    stitched = stitch_maps(maps, geometries, boxes, width, height)
    geometry = stitched_geometry(width, height, stitched.shape)
    assert stitched.shape == (21, 48)  # round(900 / 43.75), round(2100 / 43.75)
    row, column = np.unravel_index(np.argmax(stitched), stitched.shape)
    assert column * geometry.cell_width <= 1334 < (column + 1) * geometry.cell_width
    assert row * geometry.cell_height <= 472 < (row + 1) * geometry.cell_height
    _, (x0, y0, x1, y1) = vicrop_window(stitched, geometry, 336)
    assert x0 <= 1334 < x1 and y0 <= 472 < y1
    assert 336 <= x1 - x0 <= 672 and 336 <= y1 - y0 <= 672  # 336 x {1..2} px of the original image


def test_stitching_refuses_tiles_that_do_not_fit():
    geometry = Geometry.identity(2, 2, 2, 2)
    with pytest.raises(SdrpnError, match="shape"):
        stitch_maps([np.ones((3, 3))], [geometry], [(0, 0, 2, 2)], 2, 2)
    with pytest.raises(SdrpnError, match="cover"):
        stitch_maps([np.ones((2, 2))], [geometry], [(0, 0, 2, 2)], 4, 2)
    with pytest.raises(SdrpnError, match="does not match"):
        stitch_maps([np.ones((2, 2))], [geometry], [(0, 0, 4, 2)], 4, 2)


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llava", "qwen"])
def adapter(request):
    return wrap_model(*build_tiny(request.param), f"tiny-{request.param}")


def prepared_sizes(monkeypatch, adapter) -> list[list[tuple[int, int]]]:
    """Record the image sizes of every prompt batch the adapter prepares (the vision tower's inputs)."""
    calls, original = [], adapter.prepare

    def prepare(images, conversations, **kwargs):
        calls.append([image.size for image in images])
        return original(images, conversations, **kwargs)

    monkeypatch.setattr(adapter, "prepare", prepare)
    return calls


def vicrop(adapter, high_res: bool = True) -> Zoom:
    return Zoom(adapter, settings=InferSettings(method="vicrop", vicrop_high_res=high_res, max_new_tokens=2))


@pytest.mark.parametrize("size", [(2100, 900), (900, 2100)])
def test_a_large_image_is_asked_tile_by_tile(adapter, monkeypatch, size):
    width, height = size
    image = random_images(1, seed=5, size=size)[0]
    prepared = prepared_sizes(monkeypatch, adapter)
    result = vicrop(adapter).ask(image, QUESTIONS[0])
    tiles = [(x1 - x0, y1 - y0) for x0, y0, x1, y1 in tile_boxes(width, height)]
    assert len(tiles) > 1 and tiles in prepared  # every tile went through the vision tower as its own image
    assert result.geometry == stitched_geometry(width, height, result.roi_map.shape)
    assert result.roi_map.max() == pytest.approx(1.0)
    ((x0, y0, x1, y1),) = result.boxes
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert result.extra_tokens > 0  # the window was fed


def test_the_stitched_map_is_made_of_each_tile_asked_alone(adapter):
    image = random_images(1, seed=6, size=(2100, 900))[0]
    zoom = vicrop(adapter)
    batch = adapter.prepare([image], [[QUESTIONS[1]]])
    boxes = tile_boxes(*image.size)
    ratios, geometries = [], []
    for box in boxes:
        alone = adapter.prepare([image.crop(box)], [[QUESTIONS[1]]])
        ratios.append(_relative_attention(zoom, alone)[0].float().numpy())
        geometries.append(alone.geometries[0])
    expected = stitch_maps(ratios, geometries, boxes, *image.size)
    np.testing.assert_allclose(zoom.roi_maps(batch, "vicrop")[0], expected / expected.max(), rtol=1e-4, atol=1e-6)


def test_an_image_of_one_tile_gets_the_plain_vicrop_window(adapter):
    small = random_images(1, seed=7, size=(100, 80))[0]
    assert len(tile_boxes(*small.size)) == 1
    plain = vicrop(adapter, high_res=False).ask(small, QUESTIONS[2])
    high = vicrop(adapter).ask(small, QUESTIONS[2])
    assert high.boxes == plain.boxes and high.geometry == plain.geometry
    np.testing.assert_array_equal(high.roi_map, plain.roi_map)
    # beside a large image in one batch: its map comes from its one tile, the image itself, on its own grid
    large = random_images(1, seed=8, size=(2100, 900))[0]
    mixed = vicrop(adapter).ask_batch([large, small], [QUESTIONS[0], QUESTIONS[2]])
    assert mixed[1].boxes == plain.boxes and mixed[1].geometry == plain.geometry
    np.testing.assert_allclose(mixed[1].roi_map, plain.roi_map, rtol=1e-4, atol=1e-6)


def test_high_res_must_be_a_bool():
    with pytest.raises(SdrpnError, match="vicrop_high_res must be True or False"):
        InferSettings(method="vicrop", vicrop_high_res="yes")


def test_load_passes_the_option(adapter):
    assert load(adapter, method="vicrop", vicrop_high_res=True).settings.vicrop_high_res is True
    assert load(adapter, method="vicrop").settings.vicrop_high_res is False


# --- command line ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_tiny("llava")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def large_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "wide.png"
    random_images(1, seed=9, size=(2100, 900))[0].save(path)
    return path


def test_ask_flag_stitches_and_overlays(llava_dir, large_image, tmp_path, capsys):
    overlay = tmp_path / "where.png"
    argv = ["ask", "--model", str(llava_dir), "--image", str(large_image), "--question", QUESTIONS[0]]
    argv += ["--method", "vicrop", "--vicrop-high-res", "--max-new-tokens", "2", "--json", "--save-overlay"]
    assert main([*argv, str(overlay)]) == 0
    result = json.loads(capsys.readouterr().out)
    # each 1050 x 900 tile padded to a 1050 px square of the tiny LLaVA's 4 x 4 cells (262.5 px): stitched,
    # round(900 / 262.5) x round(2100 / 262.5) cells
    assert result["grid"] == [3, 8]
    assert np.array(result["roi_map"]).shape == (3, 8)
    ((x0, y0, x1, y1),) = result["boxes"]
    assert 0 <= x0 < x1 <= 2100 and 0 <= y0 < y1 <= 900
    assert Image.open(overlay).size[1] == 900


def test_eval_flag_reaches_the_runs_zoom_and_is_recorded(llava_dir, large_image, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "data" / "jsonl"
    folder.mkdir(parents=True)
    (folder / "wide.png").write_bytes(large_image.read_bytes())
    record = {"id": "w", "image": "wide.png", "question": QUESTIONS[0], "answer": "red"}
    (folder / "bench.jsonl").write_text(json.dumps(record) + "\n")
    seen, original = [], Zoom.ask_batch

    def ask_batch(self, *args, **kwargs):
        seen.append(self.settings.vicrop_high_res)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Zoom, "ask_batch", ask_batch)
    out = tmp_path / "out"
    argv = ["eval", "--model", str(llava_dir), "--bench", "jsonl", "--data-root", str(tmp_path / "data")]
    argv += ["--method", "vicrop", "--out", str(out)]
    assert main([*argv, "--vicrop-high-res"]) == 0
    assert seen == [True]
    assert json.loads((out / "run.json").read_text())["vicrop_high_res"] is True
    assert main(argv) == 2  # the same folder without the option: another run
    assert "vicrop_high_res differ" in capsys.readouterr().err
    assert seen == [True]  # refused before answering


def test_the_flag_without_vicrop_exits_2(llava_dir, large_image, tmp_path, capsys):
    ask = ["ask", "--model", str(llava_dir), "--image", str(large_image), "--question", QUESTIONS[0]]
    assert main([*ask, "--method", "base", "--vicrop-high-res"]) == 2
    assert "--vicrop-high-res is an option of --method vicrop" in capsys.readouterr().err
    evaluate = ["eval", "--model", str(llava_dir), "--bench", "toy", "--method", "base", "--out", str(tmp_path)]
    assert main([*evaluate, "--vicrop-high-res"]) == 2
    assert "not among the methods" in capsys.readouterr().err


@pytest.mark.parametrize("high_res", [False, True])
@pytest.mark.parametrize("window_px", [None, 224])
def test_the_window_base_side_is_the_official_one(adapter, monkeypatch, high_res, window_px):
    """ViCrop's official code: 336 px windows for LLaVA-1.5 (its input side), 224 px for the Qwen2.5-VL checkpoints;
    other models (these tiny ones) their input side."""
    import sdrpn.infer

    bases, real = [], sdrpn.infer.vicrop_window
    monkeypatch.setattr(sdrpn.infer, "vicrop_window", lambda m, g, base: bases.append(base) or real(m, g, base))
    defaults = replace(adapter.defaults(), vicrop_window_px=window_px)
    monkeypatch.setattr(adapter, "defaults", lambda: defaults)
    image = random_images(1, seed=5, size=(2100, 900))[0]
    vicrop(adapter, high_res).predict_roi([image], [QUESTIONS[0]])
    batch = adapter.prepare([image], [[QUESTIONS[0]]])
    assert bases == [window_px or max(adapter.input_size(batch.geometries[0]))]


def test_the_qwen_checkpoints_take_the_official_224_px_window():
    from sdrpn.models.qwen2_5_vl import QWEN_CHECKPOINTS

    assert {known.defaults.vicrop_window_px for known in QWEN_CHECKPOINTS} == {224}
