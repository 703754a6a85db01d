"""`sdrpn heads`: per-head maps, scores that find a planted localising head, head lists that labels accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdrpn.attention import teacher_attention
from sdrpn.cli import label_heads_option
from sdrpn.data import Sample, read_samples
from sdrpn.errors import SdrpnError
from sdrpn.heads import (
    SampleMaps,
    box_tokens,
    collect_maps,
    label_map_peaks_on_box,
    rank_heads,
    read_head_list,
    stage_one_on_box,
    write_ranking,
)
from sdrpn.images import load_image
from sdrpn.labeling import LabelSettings
from sdrpn.roi import Geometry, RoiSettings
from tests.conftest import QUESTIONS, random_images


def _samples(folder: Path, count: int, box=(10.0, 10.0, 40.0, 30.0)) -> list[Sample]:
    return [Sample(f"s{index}", folder / f"{index}.png", QUESTIONS[index % 3], None, box) for index in range(count)]


@pytest.fixture()
def three_images(tmp_path) -> Path:
    for index, image in enumerate(random_images(3, seed=5)):
        image.save(tmp_path / f"{index}.png")
    return tmp_path


def test_every_head_is_ranked_on_each_family(adapter, three_images):
    maps, bad = collect_maps(adapter, _samples(three_images, 3), max_new_tokens=3, batch_size=2, progress=False)
    shape = adapter.attention_shape
    assert bad == [] and len(maps) == 3
    assert maps[0].maps.shape[:2] == (shape.num_layers, shape.num_heads)
    assert maps[0].norms.shape[0] == shape.num_layers
    ranking = rank_heads(maps, top=3)
    pairs = [(s.layer, s.head) for s in ranking.scores]
    assert sorted(pairs) == [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
    assert [s.score for s in ranking.scores] == sorted((s.score for s in ranking.scores), reverse=True)
    assert all(0 <= s.concentration <= 1 and 0 <= s.sink_free <= 1 and 0 <= s.box_mass <= 1 for s in ranking.scores)
    picked = [(layer, head) for layer, heads in ranking.label_heads.items() for head in heads]
    assert 1 <= len(picked) <= 3 and set(picked) <= set(pairs[:3])
    assert ranking.peak_on_box == label_map_peaks_on_box(maps, pairs[: len(picked)])


def test_per_head_maps_average_to_the_label_map(adapter, three_images):
    """The heads' maps averaged alike are the map labels are made from (same rows, same query steps)."""
    samples = _samples(three_images, 2)
    maps, _ = collect_maps(adapter, samples, queries="prompt+answer", max_new_tokens=3, progress=False)
    chosen = {0: [1, 0], adapter.attention_shape.num_layers - 1: [1]}
    batch = adapter.prepare([load_image(s.image_path) for s in samples], [[s.question] for s in samples], training=True)
    teacher = teacher_attention(adapter, batch, chosen, max_new_tokens=3, queries="prompt+answer")
    for sample_maps, expected in zip(maps, teacher.roi_maps):
        averaged = torch.stack([sample_maps.maps[layer, head] for layer, heads in chosen.items() for head in heads])
        torch.testing.assert_close(averaged.mean(0), expected.float(), rtol=1e-4, atol=1e-6)


def _planted(count: int = 24, seed: int = 0, boxes: bool = True) -> list[SampleMaps]:
    """Maps of 3 layers x 4 heads on a 6 x 6 grid: head (1, 2) looks at the box, (0, 3) always at one corner
    (positional), (2, 0) at a sink token, the rest at noise."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        maps = torch.rand(3, 4, 6, 6, generator=generator) + 0.5
        row, col = torch.randint(0, 5, (2,), generator=generator).tolist()
        box = torch.zeros(6, 6, dtype=torch.bool)
        box[row : row + 2, col : col + 2] = True
        maps[1, 2] = 0.02 + 5.0 * box + 0.3 * torch.rand(6, 6, generator=generator)
        maps[0, 3] = 0.02
        maps[0, 3, 5, 5] = 10.0
        norms = torch.ones(3, 6, 6) + 0.01 * torch.rand(3, 6, 6, generator=generator)
        sink = (row + 3) % 6, (col + 3) % 6
        norms[:, sink[0], sink[1]] = 50.0
        maps[2, 0] = 0.02
        maps[2, 0, sink[0], sink[1]] = 10.0
        samples.append(SampleMaps(f"s{index}", maps / maps.sum((-1, -2), keepdim=True), norms, box if boxes else None))
    return samples


@pytest.mark.parametrize("boxes", [True, False])
def test_the_planted_localising_head_ranks_first(boxes):
    ranking = rank_heads(_planted(boxes=boxes))
    best = ranking.scores[0]
    assert (best.layer, best.head) == (1, 2)
    by_head = {(s.layer, s.head): s for s in ranking.scores}
    assert by_head[(2, 0)].sink_free < 0.2  # the sink head's attention is on the sink token
    assert by_head[(0, 3)].variety < 0.05 < by_head[(1, 2)].variety  # the positional head looks at the same place
    if boxes:
        assert ranking.label_heads == {1: [2]} and ranking.peak_on_box == 1.0
        assert by_head[(1, 2)].peak_on_box == 1.0 and by_head[(0, 3)].peak_on_box < 0.2
    else:
        assert ranking.peak_on_box is None and len([h for hs in ranking.label_heads.values() for h in hs]) == 8


def test_box_tokens_follow_the_geometry():
    square = Geometry.identity(70, 70, 7, 7)
    inside_one = box_tokens((12, 12, 18, 18), square)  # smaller than a token
    assert inside_one.sum() == 1 and inside_one[1, 1]
    padded = Geometry.pad_to_square(140, 70, 2, 2)  # a 140 x 140 canvas, the image 35 px down
    on = box_tokens((0, 0, 60, 30), padded)  # the image's top-left: the canvas's upper-left token
    assert on.tolist() == [[True, False], [False, False]]
    with pytest.raises(SdrpnError, match="outside"):
        box_tokens((200, 0, 300, 10), padded)


def test_head_list_round_trip_into_label_settings(adapter, tmp_path):
    layers = adapter.attention_shape.num_layers
    ranking = rank_heads(_planted(8))
    ranking.label_heads = {layers - 1: [0, 2], 0: [1]}
    json_path, picture = write_ranking(ranking, tmp_path / "out" / "heads.json", "tiny", "answer", 8)
    assert picture == tmp_path / "out" / "heads.png" and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_head_list(json_path) == {layers - 1: [0, 2], 0: [1]}
    assert label_heads_option(str(json_path)) == read_head_list(json_path)
    assert label_heads_option("1:0,2") == {1: [0, 2]}
    settings = LabelSettings(label_heads=label_heads_option(str(json_path))).resolved(adapter)
    assert settings.label_heads == {layers - 1: [0, 2], 0: [1]} and settings.norm_layer == 0
    written = json.loads(json_path.read_text())
    assert written["samples"] == 8 and len(written["ranking"]) == 12


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "not readable JSON"),
        ('{"label_heads": {}}', 'no "label_heads"'),
        ('{"label_heads": {"2": "all"}}', 'no "label_heads"'),
        ('{"label_heads": {"x": [1]}}', 'no "label_heads"'),
        ("[1, 2]", 'no "label_heads"'),
    ],
)
def test_bad_head_lists_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "heads.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SdrpnError, match=message):
        read_head_list(path)


def test_data_box_field(tmp_path):
    random_images(1)[0].save(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "question": "q one", "box": [1, 2, 30.5, 40]},
        {"image": "a.png", "question": "q two"},
        {"image": "a.png", "question": "q three", "box": [5, 5, 5, 9]},
        {"image": "a.png", "question": "q four", "box": [1, 2, 3]},
        {"image": "a.png", "question": "q five", "box": ["1", 2, 3, 4]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    report = read_samples(tmp_path / "d.jsonl")
    assert [s.box for s in report.samples] == [(1.0, 2.0, 30.5, 40.0), None]
    assert [bad.split(": ", 1)[1] for bad in report.bad] == [
        "box must satisfy 0 <= x0 < x1 and 0 <= y0 < y1, got [5, 5, 5, 9]",
        "box must be [x0, y0, x1, y1] in pixels, got [1, 2, 3]",
        'box must be [x0, y0, x1, y1] in pixels, got ["1", 2, 3, 4]',
    ]


def test_min_layer_leaves_lower_heads_out_of_the_pick():
    """A layer-0 head that matches the box best is ranked first and picked, unless `min_layer` leaves layer 0 out;
    it stays in the ranking either way."""
    samples = []
    for sample in _planted():
        maps = torch.cat([sample.maps, sample.maps[:1]])  # 4 layers
        maps[0, 1] = sample.box.float() + 1e-3
        maps[3] = sample.maps[2]
        norms = torch.cat([sample.norms, sample.norms[:1]])
        samples.append(SampleMaps(sample.sample_id, maps / maps.sum((-1, -2), keepdim=True), norms, sample.box))
    assert rank_heads(samples).label_heads == {0: [1]}
    ranking = rank_heads(samples, min_layer=1)
    assert (ranking.scores[0].layer, ranking.scores[0].head) == (0, 1)
    assert ranking.label_heads == {1: [2]} and ranking.peak_on_box == 1.0 and ranking.min_layer == 1
    with pytest.raises(SdrpnError, match="lowest label layer"):
        rank_heads(samples, min_layer=4)


def _spike_and_blob(count: int = 12, box_tokens_: int = 1) -> list[SampleMaps]:
    """2 layers x 2 heads on a 6 x 6 grid: head 0:0 a one-token spike on the target, head 1:0 a 2 x 2 blob around
    it (so 0:0 holds more of its map in the box and ranks first), the other two noise. The box is the spike's
    token, or it and the token to its right."""
    generator = torch.Generator().manual_seed(3)
    samples = []
    for index in range(count):
        row, col = torch.randint(0, 4, (2,), generator=generator).tolist()
        maps = torch.rand(2, 2, 6, 6, generator=generator) + 0.5
        maps[0, 0] = 1e-4
        maps[0, 0, row, col] = 1.0
        maps[1, 0] = 1e-2
        maps[1, 0, row : row + 2, col : col + 2] = 1.0
        box = torch.zeros(6, 6, dtype=torch.bool)
        box[row, col : col + box_tokens_] = True
        samples.append(SampleMaps(f"s{index}", maps, torch.ones(2, 6, 6), box))
    return samples


SPIKES_DROPPED = RoiSettings(sigma=0.0, tau=0.5, min_tokens=2, grow_below=0)  # 1-token components are noise
SPIKES_KEPT = RoiSettings(sigma=0.0, tau=0.5, min_tokens=1, grow_below=0)


def test_stage_one_drops_one_token_spikes_and_keeps_blobs():
    samples, labels = _spike_and_blob(), LabelSettings()
    spike = stage_one_on_box(samples, [(0, 0)], SPIKES_DROPPED, labels)
    assert spike.region_on_box == 0 and spike.no_region == 1 and spike.clean_on_box == 0 and spike.dropped == 0
    blob = stage_one_on_box(samples, [(1, 0)], SPIKES_DROPPED, labels)
    assert blob.region_on_box == 1 and blob.clean_on_box == 1 and blob.no_region == 0
    assert stage_one_on_box(samples, [(0, 0)], SPIKES_KEPT, labels).clean_on_box == 1


def test_a_box_token_labelled_background_is_not_clean():
    """A spike on one of the target's two tokens leaves the other below bg: a region on the box, but not clean."""
    samples, labels = _spike_and_blob(box_tokens_=2), LabelSettings()
    spike = stage_one_on_box(samples, [(0, 0)], SPIKES_KEPT, labels)
    assert spike.region_on_box == 1 and spike.clean_on_box == 0
    assert stage_one_on_box(samples, [(1, 0)], SPIKES_KEPT, labels).clean_on_box == 1


def test_the_pick_rejects_heads_whose_labels_stage_one_drops():
    """The spike head ranks first either way; it is picked alone only when stage 1 keeps one-token regions, else
    the blob head joins it and the labels survive."""
    samples = _spike_and_blob()
    kept = rank_heads(samples, top=4, roi=SPIKES_KEPT)
    assert (kept.scores[0].layer, kept.scores[0].head) == (0, 0) and kept.label_heads == {0: [0]}
    dropped = rank_heads(samples, top=4, roi=SPIKES_DROPPED)
    assert dropped.label_heads == {0: [0], 1: [0]} and dropped.clean_on_box == 1.0
    assert [c.clean_on_box for c in dropped.candidates][:2] == [0.0, 1.0]


def test_rates_within_one_standard_error_of_the_best_count_as_equal():
    """One sample in 64 does not decide: the candidate whose map peaks on the box more wins."""
    from sdrpn.heads import Candidate, best_candidate

    fewer = Candidate([(1, 2)], 59 / 64, 1.0, 0.0, 0.0, peak_on_box=0.97, box_share=0.7)
    more = Candidate([(1, 2), (0, 3)], 60 / 64, 1.0, 0.0, 0.0, peak_on_box=0.94, box_share=0.5)
    far = Candidate([(1, 2), (0, 3), (2, 0)], 60 / 64, 1.0, 0.0, 0.0, peak_on_box=0.94, box_share=0.5)
    assert best_candidate([fewer, more], 64) is fewer
    assert best_candidate([fewer, more], 6400) is more  # with many samples the gap is real
    assert best_candidate([more, far], 64) is more  # among equals, fewer heads


def test_label_statistics_split_the_targets_tokens():
    """A spike on one of a two-token target labels that token foreground and the other background (certainty one
    half); the blob labels both foreground (certainty one)."""
    from sdrpn.toyworld.heads_check import label_statistics

    samples, labels = _spike_and_blob(box_tokens_=2), LabelSettings()
    spike = label_statistics(samples, [(0, 0)], labels)
    assert spike["box_share_labelled_foreground"] == 0.5 and spike["box_share_labelled_background"] == 0.5
    assert spike["box_share_ignored"] == 0 and spike["target_certainty"] == 0.5
    blob = label_statistics(samples, [(1, 0)], labels)
    assert blob["box_share_labelled_foreground"] == 1 and blob["target_certainty"] == 1


def test_validated_pick_and_weighed_order():
    from sdrpn.heads import Candidate, Validation, best_candidate, best_validated, weighed_order

    def candidate(heads, clean, peak):
        return Candidate(heads, clean, clean, 0.0, 0.0, peak, 0.5)

    a, b, c = candidate([(0, 1)], 0.5, 0.9), candidate([(0, 1), (2, 3)], 0.9, 0.1), candidate([(2, 1)], 0.1, 1.0)
    ordered = weighed_order([a, b, c, candidate([(2, 3), (0, 1)], 0.0, 0.0)], samples=64)
    assert ordered[0] is best_candidate([a, b, c], 64) is b and [x.heads for x in ordered[1:3]] == [a.heads, c.heads]
    assert len(ordered) == 3  # the same head set in another order is one candidate

    def validation(heads, on_box, none):
        return Validation(heads, on_box, none, 64, "rpn")

    first, fewer_empty, worse = validation([(0, 1)], 0.9, 0.1), validation([(2, 1)], 0.9, 0.05), validation([], 0.8, 0)
    assert best_validated([first, fewer_empty, worse]) is fewer_empty
    same = validation([(2, 2)], 0.9, 0.1)
    assert best_validated([first, same, worse]) is first  # a full tie keeps the weighed order
