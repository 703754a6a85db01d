"""Property-based tests of sdrpn.roi: any map shape and magnitude, settings at and beyond their bounds.

Invariants: valid input never crashes and gives boxes inside the grid / image, non-empty; invalid input
raises SdrpnError with a one-line message; masks stay within the allowed cells; results are deterministic
and do not change when a map is scaled by a power of two (so maps near 1e308 behave like ordinary ones).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sdrpn.errors import SdrpnError
from sdrpn.roi import (
    Geometry,
    RoiSettings,
    best_window,
    centre_of_mass,
    crop_token_mask,
    crop_tokens_in_boxes,
    expand_box_px,
    find_regions,
    grid_box_to_pixels,
    image_cells,
    probability_grid,
    sigmoid,
    union_px,
    windows_px,
)

# No example database: nothing is written into the repository (.hypothesis/).
FAST = settings(max_examples=150, deadline=None, database=None)

MAX_FLOAT = float(np.finfo(np.float64).max)
TINY = 5e-324

# --- strategies ------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 10), st.integers(1, 10))
magnitudes = st.sampled_from([1.0, 0.0, TINY, 1e-300, 1e-12, 0.5, 3.0, 1e12, 1e300, MAX_FLOAT])


@st.composite
def maps(draw, shape=None, low=0.0):
    """Non-negative (low=0) or signed finite maps of any magnitude, from all zero to near the float limit."""
    shape = draw(shape if shape is not None else shapes)
    kind = draw(st.sampled_from(["unit", "scaled", "raw", "sparse"]))
    if kind == "raw":  # every element drawn on its own, over the whole float range
        elements = st.floats(low if low == 0.0 else -MAX_FLOAT, MAX_FLOAT, allow_nan=False, allow_infinity=False)
        return draw(hnp.arrays(np.float64, shape, elements=elements))
    base = draw(hnp.arrays(np.float64, shape, elements=st.floats(low, 1.0)))
    if kind == "sparse":  # a few hot tokens on a zero map: the typical RoI map
        base = np.where(draw(hnp.arrays(np.bool_, shape)), base, 0.0)
    if kind == "unit":
        return base
    return base * draw(magnitudes)


def power_of_two_scaled(a: np.ndarray, exponent: int) -> np.ndarray | None:
    """a * 2**exponent if that is exact (no overflow, no precision lost to subnormals), else None."""
    with np.errstate(over="ignore", under="ignore"):
        scaled = np.ldexp(a, exponent)
    if not np.all(np.isfinite(scaled)) or not np.array_equal(np.ldexp(scaled, -exponent), a):
        return None
    return scaled


valid_settings = st.builds(
    RoiSettings,
    sigma=st.one_of(st.floats(-2.0, 5.0), st.sampled_from([0.0, TINY, 1e-20, 0.02, 1e300, -MAX_FLOAT, MAX_FLOAT])),
    kernel=st.one_of(st.integers(-3, 1), st.integers(1, 7).map(lambda k: 2 * k + 1), st.just(1001)),
    tau=st.one_of(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True), st.sampled_from([TINY, 1 - 2**-53])),
    min_tokens=st.one_of(st.integers(1, 6), st.just(10**30)),
    grow_below=st.one_of(st.integers(0, 10), st.just(10**30)),
    grow_to=st.one_of(st.integers(1, 12), st.just(10**30)),
    max_side_frac=st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([TINY, 1.0])),
    window=st.one_of(st.floats(0.0, 50.0), st.sampled_from([0.0, TINY, 1e300, MAX_FLOAT])),
)

NON_NUMBERS = [None, "1", "abc", [1], {}, True, False, np.bool_(True), complex(1, 1)]
NON_FINITE = [math.nan, math.inf, -math.inf]
# field -> values that must be rejected (beyond the bounds, or of a wrong type)
INVALID_SETTINGS = {
    "sigma": NON_NUMBERS + NON_FINITE,
    "kernel": NON_NUMBERS + NON_FINITE + [2, 4, 1002, 1003, 10**9 + 1, 3.5, 2.0],
    "tau": NON_NUMBERS + NON_FINITE + [0.0, 1.0, -TINY, 1.5, 10**400],
    "min_tokens": NON_NUMBERS + NON_FINITE + [0, -1, 1.5],
    "grow_below": NON_NUMBERS + NON_FINITE + [-1, 0.5],
    "grow_to": NON_NUMBERS + NON_FINITE + [0, -3, 2.5],
    "max_side_frac": NON_NUMBERS + NON_FINITE + [0.0, -0.1, 1.0000001],
    "window": NON_NUMBERS + NON_FINITE + [-TINY, -1.0],
}


@st.composite
def geometries(draw):
    """Pad-to-square and identity geometries of realistic images, and raw ones with extreme floats."""
    kind = draw(st.sampled_from(["pad", "identity", "raw"]))
    grid = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    if kind != "raw":
        width, height = draw(st.integers(1, 3000)), draw(st.integers(1, 3000))
        make = Geometry.pad_to_square if kind == "pad" else Geometry.identity
        return make(width, height, *grid)
    finite = st.floats(allow_nan=False, allow_infinity=False)
    positive = st.floats(min_value=TINY, allow_nan=False, allow_infinity=False)
    sizes = st.one_of(st.integers(1, 5000), st.just(2**31 - 1))
    try:
        return Geometry(draw(sizes), draw(sizes), draw(positive), draw(positive), draw(finite), draw(finite), *grid)
    except SdrpnError as error:  # only for canvases/offsets at the float limit, or cells that underflow
        message = str(error)
        assert "out of the float range" in message or "too small" in message, message
        assume(False)


def grid_boxes(height: int, width: int):
    rows = st.tuples(st.integers(0, height - 1), st.integers(1, height)).filter(lambda r: r[0] < r[1])
    cols = st.tuples(st.integers(0, width - 1), st.integers(1, width)).filter(lambda c: c[0] < c[1])
    return st.builds(lambda r, c: (r[0], c[0], r[1], c[1]), rows, cols)


def assert_one_line_error(call, *args, **kwargs):
    with pytest.raises(SdrpnError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message


def assert_regions_valid(regions, shape, settings, allowed=None):
    height, width = shape
    assert regions.probability.shape == shape and np.all(np.isfinite(regions.probability))
    assert regions.mask.shape == shape and regions.mask.dtype == np.bool_
    in_boxes = np.zeros(shape, dtype=bool)
    for box in regions.boxes:
        assert all(type(v) is int for v in box)
        r0, c0, r1, c1 = box
        assert 0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width
        limit = settings.max_side_frac + 1e-6
        assert r1 - r0 <= limit * height and c1 - c0 <= limit * width
        assert regions.mask[r0:r1, c0:c1].any()  # every box holds some of the mask
        in_boxes[r0:r1, c0:c1] = True
        if allowed is not None:  # first and last row / column of a box hold allowed cells
            cells = allowed[r0:r1, c0:c1]
            assert cells[0].any() and cells[-1].any() and cells[:, 0].any() and cells[:, -1].any()
    assert not (regions.mask & ~in_boxes).any()
    if allowed is not None:
        assert not (regions.mask & ~allowed).any()


# --- settings and geometry validation --------------------------------------------------------


@FAST
@given(valid_settings)
def test_valid_settings_are_accepted_and_normalised(s):
    assert type(s.kernel) is int and type(s.min_tokens) is int
    assert type(s.grow_below) is int and type(s.grow_to) is int


@pytest.mark.parametrize("field", sorted(INVALID_SETTINGS))
def test_invalid_settings_raise_one_line_sdrpn_errors(field):
    for value in INVALID_SETTINGS[field]:
        with pytest.raises(SdrpnError) as info:
            RoiSettings(**{field: value})
        message = str(info.value)
        assert "\n" not in message and message.startswith(field), (value, message)


def test_integral_floats_and_numpy_numbers_are_accepted_as_before():
    s = RoiSettings(kernel=5.0, min_tokens=np.int64(3), tau=np.float32(0.25), grow_to=np.int32(4))
    assert (s.kernel, s.min_tokens, s.grow_to) == (5, 3, 4) and type(s.tau) is float
    assert RoiSettings(kernel=3.0) == RoiSettings()
    find_regions(np.eye(5), s)  # a float kernel used to reach scipy as a float radius


@FAST
@given(geometries())
def test_geometry_derived_grids_are_consistent(g):
    cells = image_cells(g)
    assert cells.shape == (g.grid_height, g.grid_width) and cells.dtype == np.bool_
    assert math.isfinite(g.cell_width) and g.cell_width > 0 and math.isfinite(g.cell_height) and g.cell_height > 0


GEOMETRY_FIELDS = ["image_width", "image_height", "canvas_width", "canvas_height", "offset_x", "offset_y"]
GEOMETRY_FIELDS += ["grid_height", "grid_width"]


@pytest.mark.parametrize("field", GEOMETRY_FIELDS)
def test_invalid_geometry_raises_sdrpn_error(field):
    base = dict(image_width=200, image_height=100, canvas_width=200.0, canvas_height=200.0)
    base.update(offset_x=0.0, offset_y=50.0, grid_height=24, grid_width=24)
    bad = NON_NUMBERS + NON_FINITE + [10**400, -(10**400)]
    if field in ("image_width", "image_height", "grid_height", "grid_width"):
        bad += [0, -1, 2.5, 2**31]
    elif field.startswith("canvas"):
        bad += [0.0, -1.0]
    for value in bad:
        with pytest.raises(SdrpnError) as info:
            Geometry(**{**base, field: value})
        assert "\n" not in str(info.value)


def test_geometry_rejects_out_of_range_extent_and_underflowing_cells():
    with pytest.raises(SdrpnError, match="float range"):
        Geometry(10, 10, MAX_FLOAT, 10.0, -MAX_FLOAT, 0.0, 4, 4)
    with pytest.raises(SdrpnError, match="too small"):
        Geometry(10, 10, TINY, 10.0, 0.0, 0.0, 4, 4)


# --- find_regions ----------------------------------------------------------------------------


@FAST
@given(maps(), valid_settings)
def test_find_regions_never_crashes_and_boxes_are_inside(prob, s):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even an overflow warning
        regions = find_regions(prob, s)
    assert_regions_valid(regions, prob.shape, s)
    again = find_regions(prob, s)  # deterministic
    assert again.boxes == regions.boxes and np.array_equal(again.mask, regions.mask)
    assert np.array_equal(again.probability, regions.probability)


@FAST
@given(maps(low=-1.0), valid_settings)
def test_find_regions_on_signed_maps_of_any_magnitude(prob, s):
    assert_regions_valid(find_regions(prob, s), prob.shape, s)


@FAST
@given(st.data(), valid_settings)
def test_allowed_mask_bounds_the_regions(data, s):
    prob = data.draw(maps())
    allowed = data.draw(hnp.arrays(np.bool_, prob.shape))
    regions = find_regions(prob, s, allowed=allowed)
    assert_regions_valid(regions, prob.shape, s, allowed)
    # smoothing sees the whole map: the probability does not depend on `allowed`
    np.testing.assert_array_equal(regions.probability, find_regions(prob, s).probability)


@FAST
@given(maps(), valid_settings)
def test_allowed_everywhere_is_the_default(prob, s):
    default = find_regions(prob, s)
    everywhere = find_regions(prob, s, allowed=np.ones(prob.shape, dtype=bool))
    assert default.boxes == everywhere.boxes and np.array_equal(default.mask, everywhere.mask)


@FAST
@given(st.data(), st.integers(1, 400), st.integers(1, 400), st.integers(2, 12), valid_settings)
def test_regions_never_touch_padding(data, width, height, side, s):
    """What Zoom.regions does: padding cells are zeroed, then find_regions(allowed=image_cells(geometry))."""
    g = Geometry.pad_to_square(width, height, side, side)
    cells = image_cells(g)
    prob = np.where(cells, data.draw(maps(st.just((side, side)))), 0.0)
    regions = find_regions(prob, s, allowed=cells)
    assert_regions_valid(regions, prob.shape, s, cells)
    for r0, c0, r1, c1 in regions.boxes:  # image cells form a rectangle: every cell of a box shows image
        assert cells[r0:r1, c0:c1].all()
        x0, y0, x1, y1 = grid_box_to_pixels((r0, c0, r1, c1), g)
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_default_settings_no_longer_put_padding_into_a_grown_region():
    g = Geometry.pad_to_square(160, 60, 24, 24)  # image rows 7..16 of 24
    cells = image_cells(g)
    prob = np.zeros((24, 24))
    prob[7, 3] = prob[7, 4] = 0.9  # two hot tokens on the first image row: grown to a 3 x 3 box
    prob = np.where(cells, prob, 0.0)
    assert find_regions(prob).boxes == [(6, 3, 9, 5)]  # the old behaviour reaches into padding row 6
    regions = find_regions(prob, allowed=cells)
    assert regions.boxes == [(7, 3, 9, 5)]
    assert not (regions.mask & ~cells).any() and regions.mask.sum() == 4
    edge = np.zeros((24, 24))
    edge[7, 3] = edge[7, 5] = 1.0  # smoothing alone lifts padding row 6 over tau
    assert (find_regions(np.where(cells, edge, 0.0)).mask & ~cells).any()
    assert not (find_regions(np.where(cells, edge, 0.0), allowed=cells).mask & ~cells).any()


@pytest.mark.parametrize("allowed", [np.ones((3, 3)), np.ones((4, 4), dtype=bool), [[1, 0]], "all"])
def test_allowed_must_be_a_bool_mask_of_the_map_shape(allowed):
    with pytest.raises(SdrpnError, match="allowed"):
        find_regions(np.zeros((3, 3)), allowed=allowed)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((0, 3)), np.zeros((3, 0)), np.zeros(0), np.zeros((2, 2, 2)), np.array([["a", "b"]]), [[1.0], [1.0, 2.0]]]
    + [np.full((2, 2), v) for v in NON_FINITE]
    + [np.ones((2, 2), dtype=complex), None, "map"],
)
def test_find_regions_rejects_bad_maps(bad):
    assert_one_line_error(find_regions, bad)


@pytest.mark.parametrize("bad", [None, "defaults", {"tau": 0.5}])
def test_find_regions_rejects_bad_settings(bad):
    assert_one_line_error(find_regions, np.zeros((3, 3)), bad)


# --- maps of any magnitude ---------------------------------------------------------------------


@FAST
@given(maps(), st.integers(-1100, 1100), st.data())
def test_best_window_is_inside_and_scale_free(a, exponent, data):
    fracs = data.draw(st.lists(st.floats(0.0, 1.0, exclude_min=True), min_size=1, max_size=4))
    stride = data.draw(st.one_of(st.integers(1, 4), st.just(10**30)))
    r0, c0, r1, c1 = box = best_window(a, tuple(fracs), stride)
    h, w = a.shape
    assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w and r1 - r0 == c1 - c0
    if np.any(a > 0):  # windows start on the stride (an all-zero map gets the largest window, centred)
        assert r0 % stride == 0 and c0 % stride == 0
    scaled = power_of_two_scaled(a, exponent)
    if scaled is not None:  # exact scaling changes nothing (sums of values near 1e308 do not overflow)
        assert best_window(scaled, tuple(fracs), stride) == box


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_fracs": ()},
        {"window_fracs": 0.5},
        {"window_fracs": "0.5"},
        {"window_fracs": (math.nan,)},
        {"window_fracs": (1.5,)},
        {"window_fracs": (None,)},
        {"stride": 1.5},
        {"stride": "2"},
        {"stride": None},
        {"stride": math.inf},
        {"stride": 0},
    ],
)
def test_best_window_rejects_bad_arguments(kwargs):
    assert_one_line_error(best_window, np.ones((4, 4)), **kwargs)


def test_best_window_near_the_float_limit_matches_the_ordinary_map():
    a = np.zeros((24, 24))
    a[4:13, 10:19] = 1.0
    assert best_window(a * MAX_FLOAT) == best_window(a) == (4, 10, 13, 19)
    assert best_window(np.full((6, 6), MAX_FLOAT)) == best_window(np.ones((6, 6)))


@FAST
@given(st.data(), st.integers(-1100, 1100))
def test_centre_of_mass_is_in_the_grown_box_and_scale_free(data, exponent):
    prob = data.draw(maps())
    h, w = prob.shape
    r0, c0, r1, c1 = box = data.draw(grid_boxes(h, w))
    row, col = centre_of_mass(prob, box)
    assert max(r0 - 1, 0) <= row <= min(r1 + 1, h) and max(c0 - 1, 0) <= col <= min(c1 + 1, w)
    scaled = power_of_two_scaled(prob, exponent)
    if scaled is not None:
        assert centre_of_mass(scaled, box) == (row, col)


@FAST
@given(st.data())
def test_centre_of_mass_of_signed_maps_is_finite(data):
    prob = data.draw(maps(low=-1.0))
    box = data.draw(grid_boxes(*prob.shape))
    assert all(math.isfinite(v) for v in centre_of_mass(prob, box))


@pytest.mark.parametrize("box", [(0, 0, 0, 1), (0, 0, 5, 1), (-1, 0, 1, 1), (0, 0, 1), "abcd", None, (0.5, 0, 1, 1)])
def test_centre_of_mass_rejects_bad_boxes(box):
    assert_one_line_error(centre_of_mass, np.ones((4, 4)), box)


@FAST
@given(st.data(), geometries(), valid_settings)
def test_windows_are_inside_the_image_with_the_asked_side(data, g, s):
    shape = (g.grid_height, g.grid_width)
    prob = data.draw(maps(st.just(shape)))
    regions = find_regions(prob, s)
    side = data.draw(st.one_of(st.floats(0.0, 30.0), st.sampled_from([TINY, 1e300, MAX_FLOAT])))
    windows = windows_px(regions, g, side)
    assert len(windows) == len(regions.boxes)
    side_px = side * max(g.cell_width, g.cell_height)
    for x0, y0, x1, y1 in windows:
        assert all(type(v) is int for v in (x0, y0, x1, y1))
        assert 0 <= x0 < x1 <= g.image_width and 0 <= y0 < y1 <= g.image_height
        for extent, limit in ((x1 - x0, g.image_width), (y1 - y0, g.image_height)):
            assert extent == (limit if side_px >= limit else min(max(math.ceil(side_px), 1), limit))
    if windows:
        ux0, uy0, ux1, uy1 = union_px(windows)
        assert all(ux0 <= x0 and uy0 <= y0 and x1 <= ux1 and y1 <= uy1 for x0, y0, x1, y1 in windows)


@pytest.mark.parametrize("side", [math.nan, math.inf, -1.0, None, "2"])
def test_windows_reject_bad_sides(side):
    g = Geometry.identity(70, 70, 7, 7)
    regions = find_regions(np.zeros((7, 7)))
    assert_one_line_error(windows_px, regions, g, side)


def test_windows_reject_a_map_of_another_grid():
    regions = find_regions(np.zeros((6, 6)))
    assert_one_line_error(windows_px, regions, Geometry.identity(70, 70, 7, 7), 1.0)


# --- pixels ----------------------------------------------------------------------------------


@FAST
@given(st.data(), geometries())
def test_grid_boxes_map_to_non_empty_pixel_boxes_inside_the_image(data, g):
    box = data.draw(grid_boxes(g.grid_height, g.grid_width))
    x0, y0, x1, y1 = px = grid_box_to_pixels(box, g)
    assert all(type(v) is int for v in px)
    assert 0 <= x0 < x1 <= g.image_width and 0 <= y0 < y1 <= g.image_height


@pytest.mark.parametrize("box", [(0, 0, 1), (0.5, 0, 1, 1), (math.nan, 0, 1, 1), ("0", 0, 1, 1), None, (1, 1, 1, 1)])
def test_grid_box_to_pixels_rejects_bad_boxes(box):
    assert_one_line_error(grid_box_to_pixels, box, Geometry.identity(40, 40, 4, 4))


finite_coordinates = st.one_of(st.integers(-(10**6), 10**6), st.floats(-MAX_FLOAT, MAX_FLOAT))


@FAST
@given(
    finite_coordinates,
    finite_coordinates,
    st.floats(TINY, MAX_FLOAT),
    st.floats(TINY, MAX_FLOAT),
    st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
    st.one_of(st.integers(0, 6000), st.just(10**40)),
    st.one_of(st.just(1.0), st.floats(TINY, MAX_FLOAT)),
)
def test_expand_box_px_is_inside_and_non_empty(x0, y0, width, height, size, min_side, scale):
    x1, y1 = x0 + width, y0 + height
    assume(math.isfinite(x1) and math.isfinite(y1) and x1 > x0 and y1 > y0)
    nx0, ny0, nx1, ny1 = out = expand_box_px((x0, y0, x1, y1), size, min_side=min_side, scale=scale)
    assert all(type(v) is int for v in out)
    assert 0 <= nx0 < nx1 <= size[0] and 0 <= ny0 < ny1 <= size[1]
    assert nx1 - nx0 >= min(min_side, size[0]) and ny1 - ny0 >= min(min_side, size[1])


@pytest.mark.parametrize(
    "args, kwargs",
    [
        (((0, 0, 1, 1), (10, 10)), {"min_side": math.nan}),
        (((0, 0, 1, 1), (10, 10)), {"min_side": 2.5}),
        (((0, 0, 1, 1), (10, 10)), {"min_side": -1}),
        (((0, 0, 1, 1), (10, 10)), {"min_side": 1, "scale": math.inf}),
        (((0, 0, 1, 1), (10, 10)), {"min_side": 1, "scale": "2"}),
        (((0, 0, math.inf, 1), (10, 10)), {"min_side": 1}),
        (((0, 0, 1, 1), (10, math.nan)), {"min_side": 1}),
        (((0, 0, 1, 1), (10,)), {"min_side": 1}),
        (((0, 0, 1, 1), None), {"min_side": 1}),
        ((None, (10, 10)), {"min_side": 1}),
    ],
)
def test_expand_box_px_rejects_bad_input(args, kwargs):
    assert_one_line_error(expand_box_px, *args, **kwargs)


def test_union_px_rejects_no_boxes_and_bad_boxes():
    assert_one_line_error(union_px, [])
    assert_one_line_error(union_px, [(0, 0, 1)])
    assert_one_line_error(union_px, None)


@FAST
@given(st.data(), geometries(), geometries())
def test_crop_token_masks_have_the_crop_grid_and_skip_its_padding(data, g, cg):
    x0 = data.draw(st.integers(0, g.image_width - 1))
    y0 = data.draw(st.integers(0, g.image_height - 1))
    crop = (x0, y0, data.draw(st.integers(x0 + 1, g.image_width)), data.draw(st.integers(y0 + 1, g.image_height)))
    mask = data.draw(hnp.arrays(np.bool_, (g.grid_height, g.grid_width)))
    keep = crop_token_mask(mask, g, crop, cg)
    assert keep.shape == (cg.grid_height, cg.grid_width) and keep.dtype == np.bool_
    everything = crop_token_mask(np.ones_like(mask), g, crop, cg)
    assert not (keep & ~everything).any()  # padding of the crop is never kept
    inside = crop_tokens_in_boxes([crop], g, crop, cg)
    assert inside.shape == keep.shape and not (inside & ~everything).any()


# --- logits ----------------------------------------------------------------------------------


@FAST
@given(hnp.arrays(np.float64, shapes, elements=st.floats(allow_nan=False)))
def test_probability_grid_is_a_probability_for_any_logits(logits):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = probability_grid(logits.ravel(), *logits.shape)
    assert p.shape == logits.shape and np.all((p >= 0) & (p <= 1))
    np.testing.assert_array_equal(p, sigmoid(logits))


@pytest.mark.parametrize(
    "logits, h, w",
    [(np.array([math.nan, 0.0]), 1, 2), (np.zeros(2), 1.5, 2), (np.zeros(2), "1", 2), (np.zeros(2), None, 2)]
    + [(np.zeros(2), 1, math.inf), (np.array(["a", "b"]), 1, 2)],
)
def test_probability_grid_rejects_bad_input(logits, h, w):
    assert_one_line_error(probability_grid, logits, h, w)
