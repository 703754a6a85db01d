"""Pins sink removal (norm and attention rules, explicit and automatic tau) and label assignment (eq. 1-2)."""

from __future__ import annotations

import pytest
import torch

from sdrpn.errors import SdrpnError
from sdrpn.labels import (
    assign_labels,
    label_stats,
    remove_sinks,
    remove_sinks_by_attention,
    sink_threshold,
)


def _map_a() -> torch.Tensor:
    """6x6 map, max 10: fg at (1,1) and (3,3) -> box rows 1..3, cols 1..3 (9/36 tokens)."""
    a = torch.zeros(6, 6)
    a[1, 1] = 10.0  # the max -> fg
    a[3, 3] = 2.0  # exactly 0.2 * max -> fg (inclusive)
    a[2, 2] = 1.5  # inside the box, middle band -> -1
    a[2, 1] = 0.5  # inside the box, low -> -1 (bg only outside the box)
    a[0, 5] = 1.99  # outside, just under fg -> middle band -> -1
    a[5, 0] = 1.0  # outside, exactly 0.1 * max -> bg (inclusive)
    a[5, 5] = 1.01  # outside, just over bg -> middle band -> -1
    return a


MAP_A_LABELS = torch.tensor(
    [
        [0, 0, 0, 0, 0, -1],
        [0, 1, -1, -1, 0, 0],
        [0, -1, -1, -1, 0, 0],
        [0, -1, -1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, -1],
    ]
)


# ---------------------------------------------------------------- assign_labels


def test_full_map_matches_hand_labels():
    labels = assign_labels(_map_a())
    assert labels.dtype == torch.int64
    assert labels.shape == (6, 6)
    assert torch.equal(labels, MAP_A_LABELS)


def test_fg_threshold_is_inclusive_at_exactly_fg_times_max():
    a = torch.zeros(5, 5)
    a[0, 0] = 10.0
    a[0, 1] = 2.0  # == 0.2 * 10
    a[4, 4] = 1.99  # just under
    labels = assign_labels(a)
    assert labels[0, 1] == 1
    assert labels[4, 4] == -1
    assert int((labels == 1).sum()) == 2


def test_fg_threshold_follows_argument():
    # fg=0.25: 2.0 is no longer fg, the box shrinks to (1,1), so 0.5 at (2,1) becomes bg
    labels = assign_labels(_map_a(), fg=0.25, bg=0.1)
    expected = torch.zeros(6, 6, dtype=torch.int64)
    expected[1, 1] = 1
    expected[2, 2] = expected[3, 3] = expected[0, 5] = expected[5, 5] = -1  # middle band (1, 2.5)
    assert torch.equal(labels, expected)


def test_bg_only_outside_the_box_and_inclusive_at_bg_times_max():
    a = _map_a()
    labels = assign_labels(a)
    assert labels[5, 0] == 0  # exactly 0.1 * max, outside
    assert labels[4, 4] == 0  # zero, outside
    assert labels[2, 1] == -1  # 0.5 <= bg * max but inside the box
    assert labels[1, 2] == -1  # zero but inside the box


def test_inside_box_non_fg_tokens_are_ignored():
    labels = assign_labels(_map_a())
    box = labels[1:4, 1:4]
    assert torch.equal(box, torch.tensor([[1, -1, -1], [-1, -1, -1], [-1, -1, 1]]))


def test_middle_band_is_ignored_everywhere():
    labels = assign_labels(_map_a())
    assert labels[0, 5] == -1  # 1.99: between 0.1 and 0.2 of max
    assert labels[5, 5] == -1  # 1.01
    assert labels[2, 2] == -1  # 1.5, inside the box too


def test_box_is_the_minimal_box_around_fg_tokens():
    a = torch.zeros(6, 8)
    a[0, 4] = 1.0
    a[2, 1] = 0.5  # fg; box = rows 0..2, cols 1..4 (12/48 tokens)
    labels = assign_labels(a)
    expected = torch.zeros(6, 8, dtype=torch.int64)
    expected[0:3, 1:5] = -1
    expected[0, 4] = 1
    expected[2, 1] = 1
    assert torch.equal(labels, expected)


def test_drop_when_box_covers_half_the_grid():
    a = torch.zeros(4, 5)
    a[1, 0] = 1.0
    a[2, 4] = 1.0  # box rows 1..2, cols 0..4 = 10 / 20 tokens = exactly 50%
    labels = assign_labels(a)
    assert torch.equal(labels, torch.full((4, 5), -1))


def test_no_drop_just_under_half_the_grid():
    a = torch.zeros(4, 5)
    a[1, 0] = 1.0
    a[3, 2] = 1.0  # box rows 1..3, cols 0..2 = 9 / 20 tokens
    labels = assign_labels(a)
    expected = torch.zeros(4, 5, dtype=torch.int64)
    expected[1:4, 0:3] = -1
    expected[1, 0] = 1
    expected[3, 2] = 1
    assert torch.equal(labels, expected)


def test_max_box_frac_argument():
    a = torch.zeros(4, 5)
    a[1, 0] = 1.0
    a[3, 2] = 1.0  # 9 / 20 = 0.45
    assert (assign_labels(a, max_box_frac=0.45) == -1).all()
    assert (assign_labels(a, max_box_frac=0.46) == 0).any()
    full = torch.ones(4, 5)  # box = whole grid: dropped even with max_box_frac=1
    assert (assign_labels(full, max_box_frac=1.0) == -1).all()


def test_all_zero_map_is_dropped():
    labels = assign_labels(torch.zeros(5, 5))
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.full((5, 5), -1))


def test_integer_map_accepted():
    labels = assign_labels((_map_a() * 100).round().to(torch.int32))
    assert labels.dtype == torch.int64
    assert torch.equal(labels, MAP_A_LABELS)


def test_batch_equals_per_sample():
    g = torch.Generator().manual_seed(0)
    sparse = torch.rand(6, 6, generator=g) * 0.05  # low noise -> bg outside the box
    sparse[2:4, 3:5] += 1.0  # the object -> fg, a 4/36 box
    sparse[0, 0] = 0.15  # middle band -> ignored
    dropped = torch.zeros(6, 6)
    dropped[0, 0] = dropped[5, 5] = 1.0
    samples = [_map_a(), torch.zeros(6, 6), dropped, sparse, torch.rand(6, 6, generator=g)]
    batch = torch.stack(samples)
    labels = assign_labels(batch)
    assert labels.shape == (5, 6, 6)
    expected = torch.stack([assign_labels(s) for s in samples])
    assert torch.equal(labels, expected)
    assert torch.equal(labels[0], MAP_A_LABELS)
    assert (labels[1] == -1).all() and (labels[2] == -1).all()
    assert {-1, 0, 1} <= set(labels[3].unique().tolist())  # this sample exercises all three


# ---------------------------------------------------------------- label_stats


def test_label_stats():
    assert label_stats(MAP_A_LABELS) == {"fg": 2, "bg": 25, "ignored": 9, "dropped": False}
    assert label_stats(torch.full((3, 3), -1)) == {"fg": 0, "bg": 0, "ignored": 9, "dropped": True}
    with pytest.raises(SdrpnError, match="one sample"):
        label_stats(torch.zeros(2, 3, 3, dtype=torch.int64))
    with pytest.raises(SdrpnError, match="-1, 0 or 1"):
        label_stats(torch.tensor([0, 2]))


# ---------------------------------------------------------------- sink removal


def test_remove_sinks_explicit_tau_is_strict_and_copies():
    roi = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 0.9]])
    norms = torch.tensor([[1.0, 30.0, 20.0], [20.5, 5.0, 100.0]])
    out = remove_sinks(roi, norms, tau_norm=20.0)
    assert torch.equal(out, torch.tensor([[0.5, 0.0, 0.3], [0.0, 0.1, 0.0]]))  # 20.0 itself is kept
    assert roi[0, 1] == 0.4  # input untouched


def test_sink_threshold_hand_value():
    # median 3, |x - 3| = [2, 1, 0, 1, 97] -> MAD 1 -> 3 + 5 * 1 = 8
    thr = sink_threshold(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert thr.ndim == 0
    assert thr.item() == pytest.approx(8.0)
    assert sink_threshold(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]), mad_k=2.0).item() == pytest.approx(5.0)


def test_remove_sinks_auto_removes_planted_outlier_only():
    norms = torch.linspace(0.9, 1.1, 25).reshape(5, 5)
    norms[2, 3] = 50.0  # planted sink
    roi = torch.ones(5, 5)
    out = remove_sinks(roi, norms)
    expected = torch.ones(5, 5)
    expected[2, 3] = 0.0
    assert torch.equal(out, expected)


def test_remove_sinks_auto_constant_norms_removes_nothing_but_a_clear_outlier():
    norms = torch.ones(10)
    roi = torch.arange(1.0, 11.0)
    assert torch.equal(remove_sinks(roi, norms), roi)  # MAD = 0: nothing is a sink
    norms[3] = 1.000001  # float jitter: not a sink
    norms[7] = 1.5
    expected = roi.clone()
    expected[7] = 0.0
    assert torch.equal(remove_sinks(roi, norms), expected)


def test_remove_sinks_auto_is_per_sample_in_a_batch():
    norms = torch.tensor([[1.0, 1.0, 1.0, 1.0, 10.0], [10.0, 11.0, 12.0, 13.0, 100.0]])
    roi = torch.ones(2, 5)
    per_sample = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    assert torch.equal(remove_sinks(roi, norms, batched=True), per_sample)
    assert sink_threshold(norms, batched=True).shape == (2,)
    # the same rows as (B, H, W) grids: batched by default
    assert torch.equal(remove_sinks(roi.reshape(2, 1, 5), norms.reshape(2, 1, 5)), per_sample.reshape(2, 1, 5))
    # a 2-D tensor is one (H, W) grid by default: pooled median 10, MAD 3 -> tau 25, only 100 goes
    pooled = torch.ones(2, 5)
    pooled[1, 4] = 0.0
    assert torch.equal(remove_sinks(roi, norms), pooled)


def test_remove_sinks_by_attention():
    roi = torch.tensor([0.5, 0.4, 0.3, 0.2])
    sink_att = torch.tensor([0.0, 1e-3, 9.9e-4, 0.5])
    assert torch.equal(remove_sinks_by_attention(roi, sink_att), torch.tensor([0.5, 0.0, 0.3, 0.0]))
    assert torch.equal(remove_sinks_by_attention(roi, sink_att, threshold=1e-2), torch.tensor([0.5, 0.4, 0.3, 0.0]))
    batch = remove_sinks_by_attention(roi.repeat(2, 1).reshape(2, 2, 2), sink_att.repeat(2, 1).reshape(2, 2, 2))
    assert torch.equal(batch, torch.tensor([0.5, 0.0, 0.3, 0.0]).repeat(2, 1).reshape(2, 2, 2))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fg": 1.5}, "fg must be in"),
        ({"fg": -0.1, "bg": 0.0}, "fg must be in"),
        ({"bg": 0.3}, "bg must be in"),  # bg > fg
        ({"bg": -0.1}, "bg must be in"),
        ({"max_box_frac": 0.0}, "max_box_frac"),
        ({"max_box_frac": 1.2}, "max_box_frac"),
    ],
)
def test_assign_labels_rejects_bad_arguments(kwargs, match):
    with pytest.raises(SdrpnError, match=match):
        assign_labels(_map_a(), **kwargs)


@pytest.mark.parametrize("shape", [(36,), (1, 1, 6, 6)])
def test_assign_labels_rejects_non_grid(shape):
    with pytest.raises(SdrpnError, match="roi_map must be"):
        assign_labels(torch.ones(shape))


def test_sink_removal_rejects_bad_input():
    with pytest.raises(SdrpnError, match="same shape"):
        remove_sinks(torch.ones(2, 3), torch.ones(3, 2), tau_norm=1.0)
    with pytest.raises(SdrpnError, match="same shape"):
        remove_sinks_by_attention(torch.ones(4), torch.ones(5))
    with pytest.raises(SdrpnError, match="mad_k"):
        sink_threshold(torch.ones(4), mad_k=-1.0)
    with pytest.raises(SdrpnError, match="expected shape"):
        sink_threshold(torch.ones(1, 2, 3, 4))
    with pytest.raises(SdrpnError, match="expected shape"):
        sink_threshold(torch.ones(4), batched=True)
    with pytest.raises(SdrpnError, match="expected shape"):
        sink_threshold(torch.ones(2, 3, 4), batched=False)
