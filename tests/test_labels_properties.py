"""Property-based tests of sdrpn.labels: maps and norms of any shape (empty included), dtype and magnitude.

Invariants: valid input never crashes; labels are int64 in {-1, 0, 1} with the map's shape and follow eq. (2);
a batch gives what its samples give one by one; results do not change when a map is scaled by a power of two;
invalid settings or inputs raise SdrpnError with a one-line message.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sdrpn.errors import SdrpnError
from sdrpn.labels import assign_labels, label_stats, remove_sinks, remove_sinks_by_attention, sink_threshold

# No example database: nothing is written into the repository (.hypothesis/).
FAST = settings(max_examples=150, deadline=None, database=None)

MAX_FLOAT = float(np.finfo(np.float64).max)
TINY = 5e-324
NON_NUMBERS = [None, "0.2", [0.2], True, complex(0.2, 0)]
NON_FINITE = [math.nan, math.inf, -math.inf]

# --- strategies ------------------------------------------------------------------------------

grid_shapes = st.tuples(st.integers(0, 7), st.integers(0, 7))
batch_shapes = st.tuples(st.integers(0, 4), st.integers(0, 6), st.integers(0, 6))
magnitudes = st.sampled_from([1.0, 0.0, TINY, 1e-300, 1e-6, 10.0, 1e30, 1e300, MAX_FLOAT])


@st.composite
def arrays(draw, shape, non_finite=False, low=0.0):
    """float64 arrays of any magnitude: unit values scaled, sparse hot spots, or raw floats (+ NaN/inf if asked)."""
    kind = draw(st.sampled_from(["unit", "scaled", "sparse", "raw"]))
    if kind == "raw":
        elements = st.floats(low if low == 0.0 else None, allow_nan=False, allow_infinity=False)
        if non_finite:
            elements = st.one_of(elements, st.sampled_from(NON_FINITE))
        return draw(hnp.arrays(np.float64, shape, elements=elements))
    base = draw(hnp.arrays(np.float64, shape, elements=st.floats(low, 1.0)))
    if kind == "sparse":
        base = np.where(draw(hnp.arrays(np.bool_, shape)), base, 0.0)
    return base if kind == "unit" else base * draw(magnitudes)


@st.composite
def tensors(draw, shape, non_finite=False, low=0.0):
    """Tensors of the shape, float64 / float32 / float16 / int / bool."""
    a = draw(arrays(shape, non_finite=non_finite, low=low))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.int64, torch.bool]))
    if dtype in (torch.int64, torch.bool):
        a = np.nan_to_num(np.clip(a, -1e6, 1e6), nan=0.0)  # integers of a sane size
        return torch.from_numpy(a).round().to(dtype)
    with np.errstate(over="ignore"):
        return torch.from_numpy(a).to(dtype)  # float32 / float16 may turn huge values into inf


fractions = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, TINY, 1.0]))


@st.composite
def label_settings(draw):
    fg = draw(fractions)
    bg = draw(st.one_of(st.floats(0.0, fg), st.sampled_from([0.0, fg])))
    max_box_frac = draw(st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([TINY, 1.0])))
    return {"fg": fg, "bg": bg, "max_box_frac": max_box_frac}


def assert_one_line_error(call, *args, **kwargs):
    with pytest.raises(SdrpnError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message


def assert_follows_eq2(a: torch.Tensor, labels: torch.Tensor, fg: float, bg: float) -> None:
    """One sample: int64 in {-1, 0, 1}; dropped (all -1) or 1 exactly on a >= fg * a_max and 0 only on low tokens."""
    assert labels.dtype == torch.int64 and labels.shape == a.shape
    assert bool(((labels == -1) | (labels == 0) | (labels == 1)).all())
    if labels.numel() == 0 or bool((labels == -1).all()):
        return
    x = a if a.is_floating_point() else a.float()
    a_max = x.max()
    assert bool(a_max > 0)  # a map without positive mass is dropped
    assert torch.equal(labels == 1, x >= fg * a_max)
    assert bool((x[labels == 0] <= bg * a_max).all())


# --- assign_labels ---------------------------------------------------------------------------


@FAST
@given(st.data(), grid_shapes, label_settings())
def test_assign_labels_on_one_grid_follows_eq2(data, shape, kwargs):
    a = data.draw(tensors(shape, non_finite=True))
    labels = assign_labels(a, **kwargs)
    assert_follows_eq2(a, labels, kwargs["fg"], kwargs["bg"])
    assert torch.equal(labels, assign_labels(a, **kwargs))  # deterministic
    stats = label_stats(labels)
    assert stats["fg"] + stats["bg"] + stats["ignored"] == labels.numel()


@FAST
@given(st.data(), batch_shapes, label_settings())
def test_assign_labels_batch_equals_per_sample(data, shape, kwargs):
    batch = data.draw(tensors(shape, non_finite=True))
    labels = assign_labels(batch, **kwargs)
    assert labels.shape == batch.shape and labels.dtype == torch.int64
    for sample, sample_labels in zip(batch, labels):
        assert torch.equal(sample_labels, assign_labels(sample, **kwargs))
        assert_follows_eq2(sample, sample_labels, kwargs["fg"], kwargs["bg"])


@FAST
@given(st.data(), grid_shapes, label_settings(), st.integers(-1100, 1100))
def test_assign_labels_ignores_the_maps_scale(data, shape, kwargs, exponent):
    a = data.draw(arrays(shape))
    with np.errstate(over="ignore", under="ignore"):
        scaled = np.ldexp(a, exponent)
    exact = np.all(np.isfinite(scaled)) and np.array_equal(np.ldexp(scaled, -exponent), a)
    normal = 1e-300  # fg * a_max and bg * a_max must not be subnormal in either map (else they lose bits)
    peaks = [a.max(initial=0.0), scaled.max(initial=0.0)] if exact else []
    products_exact = all(f == 0 or p == 0 or f * p > normal for f in (kwargs["fg"], kwargs["bg"]) for p in peaks)
    if exact and products_exact and np.all(scaled[a > 0] > normal):
        expected = assign_labels(torch.from_numpy(a), **kwargs)
        assert torch.equal(assign_labels(torch.from_numpy(scaled), **kwargs), expected)


def test_assign_labels_near_the_float_limit_matches_the_ordinary_map():
    a = torch.zeros(6, 6, dtype=torch.float64)
    a[1, 1], a[3, 3], a[5, 0] = 1.0, 0.2, 0.1
    assert torch.equal(assign_labels(a * MAX_FLOAT), assign_labels(a))
    assert torch.equal(assign_labels(a * 2.0**-1000), assign_labels(a))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (0, 3, 3), (2, 0, 4), (3, 4, 0)])
def test_assign_labels_on_empty_maps_gives_empty_labels(shape):
    labels = assign_labels(torch.zeros(shape))
    assert labels.shape == shape and labels.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs",
    [{"fg": v} for v in NON_NUMBERS + NON_FINITE + [-TINY, 1.0000001]]
    + [{"bg": v} for v in NON_NUMBERS + NON_FINITE + [-TINY, 0.21]]
    + [{"max_box_frac": v} for v in NON_NUMBERS + NON_FINITE + [0.0, -1.0, 1.5]],
)
def test_assign_labels_rejects_bad_settings(kwargs):
    assert_one_line_error(assign_labels, torch.ones(3, 3), **kwargs)


@pytest.mark.parametrize(
    "roi_map",
    [np.ones((3, 3)), [[1.0]], None, torch.ones(4), torch.ones(1, 1, 2, 2), torch.ones(2, 2, dtype=torch.cfloat)],
)
def test_assign_labels_rejects_bad_maps(roi_map):
    assert_one_line_error(assign_labels, roi_map)


# --- sink removal ----------------------------------------------------------------------------


@FAST
@given(st.data(), st.integers(0, 30), st.one_of(st.floats(0.0, 20.0), st.sampled_from([0.0, 1e300, MAX_FLOAT])))
def test_sink_threshold_of_one_sample(data, count, mad_k):
    norms = data.draw(tensors((count,), non_finite=True))
    thr = sink_threshold(norms, mad_k)
    assert thr.ndim == 0 and thr.is_floating_point()
    values = norms.double()[~norms.double().isnan()]
    if values.numel() == 0:  # empty or all-NaN: no threshold, nothing flagged
        assert bool(thr.isnan())
    elif not bool(thr.isnan()):
        assert bool(thr >= values.to(thr.dtype).median())  # the lower median is never a sink


@FAST
@given(st.data(), batch_shapes, st.floats(0.0, 20.0))
def test_remove_sinks_batch_equals_per_sample(data, shape, mad_k):
    norms = data.draw(tensors(shape, non_finite=True))
    roi = data.draw(tensors(shape))
    out = remove_sinks(roi, norms, mad_k=mad_k)
    assert out.shape == roi.shape and out.dtype == roi.dtype
    assert torch.equal(sink_threshold(norms, mad_k).isnan(), sink_threshold(norms, mad_k).isnan())
    for sample_roi, sample_norms, sample_out in zip(roi, norms, out):
        assert torch.equal(sample_out, remove_sinks(sample_roi, sample_norms, mad_k=mad_k))
    flat = remove_sinks(roi.flatten(1), norms.flatten(1), mad_k=mad_k, batched=True)  # (B, N): the same samples
    assert torch.equal(flat, out.flatten(1))
    thr = sink_threshold(norms, mad_k)
    assert thr.shape == (shape[0],)
    removed = norms > thr.reshape(-1, 1, 1)
    assert torch.equal(out, roi.masked_fill(removed, 0))  # zero exactly where the norm is over the threshold


@FAST
@given(st.data(), grid_shapes, st.floats(allow_nan=False, allow_infinity=False))
def test_explicit_thresholds_zero_exactly_the_tokens_over_them(data, shape, tau):
    norms = data.draw(tensors(shape, non_finite=True))
    roi = data.draw(tensors(shape))
    assert torch.equal(remove_sinks(roi, norms, tau), roi.masked_fill(norms > tau, 0))
    assert torch.equal(remove_sinks_by_attention(roi, norms, tau), roi.masked_fill(norms >= tau, 0))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (0, 2, 2), (2, 0, 3)])
def test_sink_removal_on_empty_tensors(shape):
    empty = torch.zeros(shape)
    assert remove_sinks(empty, empty).shape == shape
    assert remove_sinks(empty, empty, tau_norm=1.0).shape == shape
    assert remove_sinks_by_attention(empty, empty).shape == shape
    thr = sink_threshold(empty)
    assert thr.shape == ((shape[0],) if len(shape) == 3 else ()) and bool(thr.isnan().all())


@pytest.mark.parametrize("bad", NON_NUMBERS + NON_FINITE + [-1.0, -TINY])
def test_bad_mad_k_is_rejected(bad):
    assert_one_line_error(sink_threshold, torch.ones(4), bad)
    assert_one_line_error(remove_sinks, torch.ones(4), torch.ones(4), mad_k=bad)


@pytest.mark.parametrize("bad", NON_NUMBERS + NON_FINITE)
def test_bad_explicit_thresholds_are_rejected(bad):
    if bad is not None:  # tau_norm=None is the automatic threshold
        assert_one_line_error(remove_sinks, torch.ones(4), torch.ones(4), tau_norm=bad)
    assert_one_line_error(remove_sinks_by_attention, torch.ones(4), torch.ones(4), threshold=bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: remove_sinks(np.ones(4), torch.ones(4)),
        lambda: remove_sinks(torch.ones(4), [1.0] * 4),
        lambda: remove_sinks(torch.ones(4), torch.ones(4, dtype=torch.cfloat)),
        lambda: sink_threshold(np.ones(4)),
        lambda: sink_threshold(torch.ones(4), batched="yes"),
        lambda: remove_sinks_by_attention(torch.ones(4), None),
        lambda: label_stats([1, 0]),
    ],
)
def test_non_tensor_inputs_are_rejected(call):
    assert_one_line_error(call)


def test_integral_and_numpy_settings_behave_like_floats():
    a = torch.rand(5, 5, generator=torch.Generator().manual_seed(0))
    expected = assign_labels(a, 0.2, 0.1, 0.5)
    assert torch.equal(assign_labels(a, np.float32(0.2), np.float64(0.1), np.float32(0.5)), expected)
    assert torch.equal(assign_labels(a, 1, 0, 1), assign_labels(a, 1.0, 0.0, 1.0))
    norms = torch.linspace(1, 2, 25)
    assert torch.equal(sink_threshold(norms, np.int64(5)), sink_threshold(norms, 5.0))
