"""Pins sdrpn.roi: RoI map -> smoothed/thresholded components -> filtered boxes -> pixel crops and masks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from sdrpn.errors import SdrpnError
from sdrpn.roi import (
    Geometry,
    RoiRegions,
    RoiSettings,
    best_window,
    centre_of_mass,
    crop_token_mask,
    crop_tokens_in_boxes,
    expand_box_px,
    find_regions,
    grid_box_to_pixels,
    probability_grid,
    sigmoid,
    union_px,
    windows_px,
)

NO_SMOOTH = RoiSettings(sigma=0.0)


def grid(points, shape=(24, 24), value=1.0):
    a = np.zeros(shape)
    for r, c in points:
        a[r, c] = value
    return a


# --- sigmoid / probability_grid -------------------------------------------------------------


def test_sigmoid_values_and_no_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sigmoid(np.array([-1000.0, -2.0, 0.0, 2.0, 1000.0]))
    assert out[2] == 0.5
    assert out[0] == 0.0 and out[4] == 1.0
    assert out[3] == pytest.approx(1 / (1 + math.exp(-2)))
    assert out[1] + out[3] == pytest.approx(1.0)


def test_probability_grid_reshapes_in_raster_order():
    p = probability_grid(np.array([0.0, 100.0, -100.0, 0.0, 0.0, 0.0]), 2, 3)
    assert p.shape == (2, 3)
    assert p[0, 1] == pytest.approx(1.0) and p[0, 2] == pytest.approx(0.0)
    assert probability_grid(np.zeros((2, 3)), 2, 3).shape == (2, 3)


@pytest.mark.parametrize(
    "logits, h, w",
    [(np.zeros(575), 24, 24), (np.zeros((3, 2)), 2, 3), (np.zeros((2, 2, 2)), 2, 4), (np.zeros(4), 0, 4)],
)
def test_probability_grid_shape_errors(logits, h, w):
    with pytest.raises(SdrpnError):
        probability_grid(logits, h, w)


def test_probability_grid_error_names_the_counts():
    with pytest.raises(SdrpnError, match="575.*576"):
        probability_grid(np.zeros(575), 24, 24)


# --- smoothing and threshold ----------------------------------------------------------------


def test_smoothing_on_spreads_a_peak_with_a_3x3_sigma1_kernel():
    peak = grid([(2, 2)], shape=(5, 5))
    smoothed = find_regions(peak).probability
    w0 = 1 / (1 + 2 * math.exp(-0.5))  # centre weight of the normalised 1-D kernel [-1, 0, 1]
    w1 = math.exp(-0.5) * w0
    assert smoothed[2, 2] == pytest.approx(w0 * w0)
    assert smoothed[2, 3] == pytest.approx(w0 * w1)
    assert smoothed[1, 1] == pytest.approx(w1 * w1)
    assert smoothed[0, 0] == 0.0  # radius = kernel // 2 = 1: nothing reaches two tokens away
    assert smoothed.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("settings", [RoiSettings(sigma=0.0), RoiSettings(kernel=1), RoiSettings(sigma=-1.0)])
def test_smoothing_off_leaves_map_unchanged(settings):
    peak = grid([(2, 2)], shape=(5, 5))
    np.testing.assert_array_equal(find_regions(peak, settings).probability, peak)


def test_threshold_is_strict():
    at_tau = np.zeros((24, 24))
    at_tau[5:8, 5:8] = 0.15
    assert find_regions(at_tau, NO_SMOOTH).empty
    above = np.where(at_tau > 0, 0.1500001, 0.0)
    assert find_regions(above, NO_SMOOTH).boxes == [(5, 5, 8, 8)]


# --- component filters ----------------------------------------------------------------------


def test_one_token_component_is_dropped():
    regions = find_regions(grid([(10, 10)]), NO_SMOOTH)
    assert regions.empty and not regions.mask.any()
    # with min_tokens=1 the same token survives (and is grown): the drop is the filter's doing
    kept = find_regions(grid([(10, 10)]), RoiSettings(sigma=0.0, min_tokens=1))
    assert kept.boxes == [(9, 9, 12, 12)]


def test_two_token_component_is_grown_to_3x3():
    regions = find_regions(grid([(5, 5), (5, 6)]), NO_SMOOTH)
    assert regions.boxes == [(4, 4, 7, 7)]
    assert regions.mask.sum() == 9 and regions.mask[4:7, 4:7].all()


@pytest.mark.parametrize(
    "points, box",
    [([(0, 0), (0, 1)], (0, 0, 2, 2)), ([(23, 22), (23, 23)], (22, 21, 24, 24))],
)
def test_grown_box_is_clipped_at_grid_corners(points, box):
    regions = find_regions(grid(points), NO_SMOOTH)
    assert regions.boxes == [box]
    r0, c0, r1, c1 = box
    assert regions.mask.sum() == (r1 - r0) * (c1 - c0)


def test_component_of_grow_below_tokens_is_not_grown():
    line = [(10, 10), (10, 11), (10, 12), (10, 13)]
    regions = find_regions(grid(line), NO_SMOOTH)
    assert regions.boxes == [(10, 10, 11, 14)]
    assert regions.mask.sum() == 4


def test_too_large_components_are_dropped_at_15_of_24():
    big = np.zeros((24, 24))
    big[2:18, 2:18] = 1.0  # 16 x 16
    assert find_regions(big, NO_SMOOTH).empty
    ok = np.zeros((24, 24))
    ok[2:17, 2:17] = 1.0  # 15 x 15 is the largest kept
    assert find_regions(ok, NO_SMOOTH).boxes == [(2, 2, 17, 17)]
    thin = np.zeros((24, 24))
    thin[3, 1:17] = 1.0  # one row, 16 wide: width alone exceeds the limit
    assert find_regions(thin, NO_SMOOTH).empty
    assert find_regions(thin.T, NO_SMOOTH).empty  # 16 tall, one column: height alone


def test_eight_connectivity_joins_diagonal_neighbours():
    diagonal = find_regions(grid([(3, 3), (4, 4)]), NO_SMOOTH)
    assert diagonal.boxes == [(2, 2, 5, 5)]  # one 2-token component, grown; 4-conn would drop both
    chain = find_regions(grid([(3, 3), (4, 4), (5, 5), (6, 6)]), NO_SMOOTH)
    assert chain.boxes == [(3, 3, 7, 7)] and chain.mask.sum() == 4


def test_empty_map_gives_empty_regions():
    regions = find_regions(np.full((24, 24), 0.1))
    assert regions.empty and regions.boxes == [] and regions.union_box is None
    assert regions.mask.shape == (24, 24) and not regions.mask.any()


def test_full_map_is_one_component_dropped_as_too_big():
    regions = find_regions(np.ones((24, 24)))
    np.testing.assert_allclose(regions.probability, 1.0)  # border mode keeps a uniform map uniform
    assert regions.empty and not regions.mask.any()


def test_union_box_spans_all_kept_components():
    a = np.zeros((24, 24))
    a[2:5, 3:7] = 1.0
    a[15:20, 10:12] = 1.0
    a[0, 23] = 1.0  # 1 token: dropped, so not in the union
    regions = find_regions(a, NO_SMOOTH)
    assert sorted(regions.boxes) == [(2, 3, 5, 7), (15, 10, 20, 12)]
    assert regions.union_box == (2, 3, 20, 12)
    assert not regions.empty


@pytest.mark.parametrize("bad", [np.zeros(24), np.zeros((2, 2, 2)), np.array([[np.nan, 0.0]])])
def test_find_regions_rejects_bad_maps(bad):
    with pytest.raises(SdrpnError):
        find_regions(bad)


# --- geometry -------------------------------------------------------------------------------


def test_pad_to_square_geometry():
    g = Geometry.pad_to_square(200, 100, 24, 24)
    assert (g.canvas_width, g.canvas_height, g.offset_x, g.offset_y) == (200, 200, 0.0, 50.0)
    t = Geometry.pad_to_square(100, 300, 24, 24)
    assert (t.canvas_width, t.offset_x, t.offset_y) == (300, 100.0, 0.0)


def test_grid_box_to_pixels_on_padded_non_square_image():
    g = Geometry.pad_to_square(200, 100, 24, 24)
    assert grid_box_to_pixels((0, 0, 24, 24), g) == (0, 0, 200, 100)  # padding is cut away
    assert grid_box_to_pixels((6, 0, 18, 24), g) == (0, 0, 200, 100)  # exactly the image rows
    assert grid_box_to_pixels((0, 0, 12, 12), g) == (0, 0, 100, 50)  # half padding, half image
    assert grid_box_to_pixels((6, 3, 9, 6), g) == (25, 0, 50, 25)  # edges exactly on pixels
    assert grid_box_to_pixels((7, 1, 8, 2), g) == (8, 8, 17, 17)  # rounded outwards


@pytest.mark.parametrize("box", [(0, 0, 3, 24), (21, 0, 24, 24)])
def test_grid_box_over_padding_strip_clips_into_image(box):
    g = Geometry.pad_to_square(200, 100, 24, 24)
    x0, y0, x1, y1 = grid_box_to_pixels(box, g)
    assert (x0, x1) == (0, 200)
    assert 0 <= y0 < y1 <= 100 and y1 - y0 == 1


def test_grid_box_to_pixels_identity_non_square_grid():
    g = Geometry.identity(300, 150, 12, 24)
    assert (g.cell_width, g.cell_height) == (12.5, 12.5)
    assert grid_box_to_pixels((0, 0, 12, 24), g) == (0, 0, 300, 150)
    assert grid_box_to_pixels((0, 0, 6, 12), g) == (0, 0, 150, 75)
    assert grid_box_to_pixels((11, 23, 12, 24), g) == (287, 137, 300, 150)


@pytest.mark.parametrize("box", [(0, 0, 0, 5), (0, 0, 25, 24), (-1, 0, 3, 3)])
def test_grid_box_to_pixels_rejects_bad_boxes(box):
    with pytest.raises(SdrpnError):
        grid_box_to_pixels(box, Geometry.identity(240, 240, 24, 24))


def test_geometry_validation():
    with pytest.raises(SdrpnError):
        Geometry.identity(0, 10, 24, 24)
    with pytest.raises(SdrpnError):
        Geometry.identity(10, 10, 0, 24)


# --- crop_token_mask ------------------------------------------------------------------------


def test_crop_token_mask_left_half():
    g = Geometry.identity(240, 240, 24, 24)  # 10 px cells
    mask = np.zeros((24, 24), dtype=bool)
    mask[6:18, 6:12] = True  # left half of the crop below
    out = crop_token_mask(mask, g, (60, 60, 180, 180), Geometry.identity(120, 120, 12, 12))
    expected = np.zeros((12, 12), dtype=bool)
    expected[:, :6] = True
    np.testing.assert_array_equal(out, expected)


def test_crop_token_mask_resized_crop_undoes_the_ratio():
    g = Geometry.identity(240, 240, 24, 24)
    mask = np.zeros((24, 24), dtype=bool)
    mask[6:18, 6:12] = True
    # the same crop, but its geometry describes it resized to 336 x 336 before encoding
    out = crop_token_mask(mask, g, (60, 60, 180, 180), Geometry.identity(336, 336, 24, 24))
    assert out.shape == (24, 24)
    assert out[:, :12].all() and not out[:, 12:].any()


def test_crop_token_mask_padding_cells_are_false():
    g = Geometry.identity(240, 240, 24, 24)
    crop_box = (0, 0, 240, 120)  # top half of the image: a 2:1 crop padded to square
    crop_geometry = Geometry.pad_to_square(240, 120, 12, 12)  # 20 px cells, 60 px pad top/bottom
    everything = crop_token_mask(np.ones((24, 24), dtype=bool), g, crop_box, crop_geometry)
    expected = np.zeros((12, 12), dtype=bool)
    expected[3:9, :] = True
    np.testing.assert_array_equal(everything, expected)
    top = np.zeros((24, 24), dtype=bool)
    top[:2, :] = True  # y < 20 px: only the first image row of crop tokens (centre y = 10)
    out = crop_token_mask(top, g, crop_box, crop_geometry)
    assert out[3].all() and out.sum() == 12


def test_crop_token_mask_rejects_mismatched_inputs():
    g = Geometry.identity(240, 240, 24, 24)
    cg = Geometry.identity(120, 120, 12, 12)
    with pytest.raises(SdrpnError):
        crop_token_mask(np.ones((12, 12), dtype=bool), g, (0, 0, 120, 120), cg)
    with pytest.raises(SdrpnError):
        crop_token_mask(np.ones((24, 24), dtype=bool), g, (0, 0, 300, 120), cg)


# --- windows: sub-token centred crops ----------------------------------------------------------


def test_centre_of_mass_is_sub_token_and_uses_the_neighbours_below_threshold():
    prob = np.zeros((7, 7))
    prob[3, 3] = 0.9  # the region
    prob[3, 4] = 0.3  # below tau, but says the object leans right
    row, col = centre_of_mass(prob, (3, 3, 4, 4))
    assert row == pytest.approx(3.5)
    assert col == pytest.approx((3.5 * 0.9 + 4.5 * 0.3) / 1.2)
    prob[3, 6] = 5.0  # two tokens away: not the region's neighbour, ignored
    assert centre_of_mass(prob, (3, 3, 4, 4)) == pytest.approx((row, col))


def test_centre_of_mass_of_an_empty_region_is_its_box_centre():
    assert centre_of_mass(np.zeros((7, 7)), (1, 2, 3, 5)) == (2.0, 3.5)


def test_windows_are_squares_of_the_given_tokens_centred_on_the_mass():
    g = Geometry.identity(700, 700, 7, 7)  # 100 px cells
    prob = np.zeros((7, 7))
    prob[2, 2], prob[2, 3] = 1.0, 1.0  # mass centred on the border between the two cells: x = 300
    regions = RoiRegions(probability=prob, mask=prob > 0.5, boxes=[(2, 2, 3, 4)])
    (box,) = windows_px(regions, g, 1.0)
    x0, y0, x1, y1 = box
    assert (x1 - x0, y1 - y0) == (100, 100)
    assert abs((x0 + x1) / 2 - 300) <= 1 and abs((y0 + y1) / 2 - 250) <= 1
    # the token box would have put the mass at the crop's centre only by luck; the window always does
    assert grid_box_to_pixels((2, 2, 3, 4), g) == (200, 200, 400, 300)


def test_windows_are_shifted_inside_the_image_and_follow_the_padding():
    g = Geometry.pad_to_square(700, 350, 7, 7)  # 100 px cells, 175 px of padding above and below
    prob = np.zeros((7, 7))
    prob[2, 0] = 1.0  # top-left image corner: cell centre x = 50, y = 250 - 175 = 75
    regions = RoiRegions(probability=prob, mask=prob > 0.5, boxes=[(2, 0, 3, 1)])
    (box,) = windows_px(regions, g, 1.5)
    assert box == (0, 0, 150, 150)
    assert union_px([box, (400, 100, 500, 200)]) == (0, 0, 500, 200)


def test_crop_tokens_in_boxes_keeps_only_tokens_inside_a_window():
    g = Geometry.identity(240, 240, 24, 24)
    cg = Geometry.identity(120, 120, 12, 12)  # the crop (60..180) at 10 px per token
    out = crop_tokens_in_boxes([(60, 60, 120, 180)], g, (60, 60, 180, 180), cg)
    expected = np.zeros((12, 12), dtype=bool)
    expected[:, :6] = True
    np.testing.assert_array_equal(out, expected)
    assert crop_tokens_in_boxes([(60, 60, 180, 180)], g, (60, 60, 180, 180), cg).all()


def test_settings_reject_a_negative_window():
    with pytest.raises(SdrpnError, match="window"):
        RoiSettings(window=-1.0)


# --- best_window ----------------------------------------------------------------------------


@pytest.mark.parametrize("frac, side", [(0.25, 6), (0.375, 9), (0.5, 12), (0.75, 18)])
@pytest.mark.parametrize("spot", [(17, 5), (12, 12), (0, 23), (23, 0)])
def test_best_window_contains_planted_spot_at_each_scale(frac, side, spot):
    a = np.full((24, 24), 0.01)
    a[spot] = 10.0
    r0, c0, r1, c1 = best_window(a, window_fracs=(frac,))
    assert (r1 - r0, c1 - c0) == (side, side)
    assert 0 <= r0 and 0 <= c0 and r1 <= 24 and c1 <= 24
    assert r0 <= spot[0] < r1 and c0 <= spot[1] < c1


def test_best_window_centres_the_spot_instead_of_a_corner():
    r0, c0, r1, c1 = best_window(grid([(12, 12)]), window_fracs=(0.25,))
    assert r0 in (9, 10) and c0 in (9, 10) and (r1 - r0, c1 - c0) == (6, 6)


def test_best_window_picks_the_scale_that_fits_the_blob():
    a = np.zeros((24, 24))
    a[4:13, 10:19] = 1.0  # a 9 x 9 blob: 0.375 * 24
    assert best_window(a) == (4, 10, 13, 19)
    b = np.zeros((24, 24))
    b[14:20, 1:7] = 1.0  # 6 x 6
    assert best_window(b) == (14, 1, 20, 7)
    c = np.zeros((24, 24))
    c[9:15, 9:15] = 1.0  # centred 6 x 6: bigger centred windows hold the same mass but pay for area
    assert best_window(c) == (9, 9, 15, 15)


def test_best_window_stride_and_non_square_map():
    a = np.zeros((12, 24))
    a[6:9, 18:21] = 1.0
    r0, c0, r1, c1 = best_window(a, window_fracs=(0.25,), stride=2)  # side round(0.25 * 12) = 3
    assert (r1 - r0, c1 - c0) == (3, 3) and r0 % 2 == 0 and c0 % 2 == 0
    assert r1 <= 12 and c1 <= 24


def test_best_window_all_zero_is_centred_largest_window():
    assert best_window(np.zeros((24, 24))) == (3, 3, 21, 21)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attention_map": -np.ones((4, 4))},
        {"attention_map": np.ones((4, 4)), "window_fracs": (0.0,)},
        {"attention_map": np.ones((4, 4)), "stride": 0},
        {"attention_map": np.ones(4)},
    ],
)
def test_best_window_rejects_bad_input(kwargs):
    with pytest.raises(SdrpnError):
        best_window(**kwargs)


# --- expand_box_px --------------------------------------------------------------------------


def test_expand_box_px_grows_tiny_box_about_its_centre():
    assert expand_box_px((100, 100, 110, 104), (400, 300), min_side=64) == (73, 70, 137, 134)


def test_expand_box_px_shifts_inside_the_image():
    assert expand_box_px((0, 290, 4, 300), (400, 300), min_side=64) == (0, 236, 64, 300)
    assert expand_box_px((10, 10, 20, 20), (40, 30), min_side=64) == (0, 0, 40, 30)


def test_expand_box_px_scale_and_large_boxes_untouched():
    assert expand_box_px((100, 100, 200, 150), (400, 300), min_side=10) == (100, 100, 200, 150)
    assert expand_box_px((100, 100, 200, 150), (400, 300), min_side=10, scale=2.0) == (50, 75, 250, 175)


def test_expand_box_px_rejects_bad_input():
    with pytest.raises(SdrpnError):
        expand_box_px((10, 10, 10, 20), (100, 100), min_side=8)
    with pytest.raises(SdrpnError):
        expand_box_px((10, 10, 20, 20), (100, 100), min_side=8, scale=0.0)


# --- settings and imports -------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_settings_reject_tau_outside_open_unit_interval(tau):
    with pytest.raises(SdrpnError, match=r"^tau must be in \(0, 1\), got"):
        RoiSettings(tau=tau)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel": 4},
        {"min_tokens": 0},
        {"grow_to": 0},
        {"grow_below": -1},
        {"max_side_frac": 0.0},
        {"max_side_frac": 1.5},
        {"sigma": float("inf")},
    ],
)
def test_settings_reject_other_bad_values(kwargs):
    with pytest.raises(SdrpnError) as info:
        RoiSettings(**kwargs)
    assert "\n" not in str(info.value)


def test_default_settings_are_the_released_ones():
    s = RoiSettings()
    assert (s.sigma, s.kernel, s.tau, s.min_tokens, s.grow_below, s.grow_to) == (1.0, 3, 0.15, 2, 4, 3)
    assert s.max_side_frac * 24 == 15


def test_roi_does_not_import_torch():
    import sdrpn.roi

    src = str(Path(sdrpn.roi.__file__).resolve().parents[1])
    code = "import sys, sdrpn.roi; sys.exit(1 if 'torch' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": src}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_image_cells_excludes_pure_padding():
    from sdrpn.roi import image_cells

    wide = image_cells(Geometry.pad_to_square(160, 60, 4, 4))  # image rows 50..110 of a 160 canvas
    assert wide.tolist() == [[False] * 4, [True] * 4, [True] * 4, [False] * 4]
    assert image_cells(Geometry.identity(30, 20, 3, 5)).all()


# --- the released stage-1 rule (get_bbox_from_noisy_map), worked by hand ---------------------------------

RELEASED_NO_BLUR = RoiSettings(tau=0.5, sigma=0, max_side_frac=1.0, max_tokens=225, grow_rule="released")


def test_released_rule_grows_small_components_with_its_integer_arithmetic():
    grid = np.zeros((24, 24))
    grid[5, 5:7] = 1.0  # 2 tokens: x 5..7, centre 6, width max(3, 7 - 5 + 1) = 3 -> int(4.5) .. int(7.5) = 4 .. 7
    assert find_regions(grid, RELEASED_NO_BLUR).boxes == [(4, 4, 7, 7)]  # rows: centre 5.5, int(4.0) .. int(7.0)
    grid = np.zeros((24, 24))
    grid[20:23, 23] = 1.0  # 3 tokens on the last column: the high end is clipped at index 23, never 24
    assert find_regions(grid, RELEASED_NO_BLUR).boxes == [(19, 22, 23, 23)]
    grid = np.zeros((24, 24))
    grid[10:12, 22:24] = 1.0  # 4 tokens: not grown
    assert find_regions(grid, RELEASED_NO_BLUR).boxes == [(10, 22, 12, 24)]


def test_released_rule_drops_components_of_more_than_225_tokens_whatever_their_sides():
    grid = np.zeros((24, 24))
    grid[0:15, 0:15] = 1.0  # 225 tokens: kept
    assert find_regions(grid, RELEASED_NO_BLUR).boxes == [(0, 0, 15, 15)]
    grid[15, 0] = 1.0  # 226: dropped
    assert find_regions(grid, RELEASED_NO_BLUR).boxes == []
    line = np.zeros((24, 24))
    line[3, :] = 1.0  # 24 tokens wide: a side over 15 is no reason to drop it any more
    assert find_regions(line, RELEASED_NO_BLUR).boxes == [(3, 0, 4, 24)]
    assert RoiSettings.released(tau=0.1) == RoiSettings(
        tau=0.1, max_side_frac=1.0, max_tokens=225, grow_rule="released", crop_rule="released"
    )
    with pytest.raises(SdrpnError, match="grow_rule"):
        RoiSettings(grow_rule="sideways")


def test_vicrop_window_follows_the_official_search_on_the_canvas():
    """A 672-px canvas of 24 x 24 tokens (28 px each), windows of 336 x {1, ..., 2} px: one hot token at (5, 5).
    Every size's first maximum (column-major) is its top-left window, whose neighbours tie with it: the scores
    tie at 0 and the first size, 336 px = 12 tokens, wins; centred on its block, it is the canvas's top-left."""
    from sdrpn.roi import vicrop_window

    grid = np.zeros((24, 24))
    grid[5, 5] = 1.0
    square = Geometry.pad_to_square(672, 672, 24, 24)
    assert vicrop_window(grid, square, 336) == ((0, 0, 12, 12), (0, 0, 336, 336))
    wide = Geometry.pad_to_square(672, 336, 24, 24)  # 168 px of padding above: the canvas is undone
    assert vicrop_window(grid, wide, 336) == ((0, 0, 12, 12), (0, 0, 336, 168))
    small = Geometry.pad_to_square(336, 336, 24, 24)  # the first window already covers the grid: the whole image
    assert vicrop_window(grid, small, 336) == ((0, 0, 24, 24), (0, 0, 336, 336))
    grid = np.zeros((24, 24))
    grid[18:21, 16:19] = 1.0  # a 3 x 3 blob far from the corner: the window sits around it
    (r0, c0, r1, c1), (x0, y0, x1, y1) = vicrop_window(grid, square, 336)
    assert r0 <= 18 and r1 >= 21 and c0 <= 16 and c1 >= 19
    assert x1 - x0 == y1 - y0 and x0 <= 16 * 28 and x1 >= 19 * 28
