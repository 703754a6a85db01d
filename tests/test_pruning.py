"""High-resolution pruning (released Qwen2.5-VL): when a crop is made for an image of many visual tokens, stage 2
drops the image's own tokens that no token of the question looks at."""

from __future__ import annotations

import pytest
import torch

from sdrpn.errors import SdrpnError
from sdrpn.infer import InferSettings, Zoom, load
from sdrpn.models import wrap_model
from sdrpn.models.qwen2_5_vl import Qwen2_5_VLAdapter
from sdrpn.roi import RoiSettings
from sdrpn.rpn import RegionProposalNetwork
from tests.conftest import build_tiny, random_images
from tests.test_prefix_reuse import FROZEN, QUESTIONS, _assert_same_logits, _crops, _decode, _images


def test_the_released_qwen_rule_prunes_above_1024_tokens_at_score_001():
    released = RoiSettings.released_qwen()
    assert (released.prune_above, released.prune_score) == (1024, 0.01)
    assert RoiSettings.released().prune_above == 0 and RoiSettings().prune_above == 0  # LLaVA and sdrpn: never


@pytest.mark.parametrize("field, value", [("prune_above", -1), ("prune_above", 2.5), ("prune_score", 1.0)])
def test_bad_pruning_settings_are_refused(field, value):
    with pytest.raises(SdrpnError, match=field):
        RoiSettings(**{field: value})


def _rpn(adapter) -> RegionProposalNetwork:
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(adapter, FROZEN, 3).eval()
    with torch.no_grad():
        rpn.q_proj.weight.mul_(100.0)  # spread logits: some tokens far above any threshold, others far below
    return rpn


def test_question_scores_are_the_best_logit_of_any_token_after_the_image(adapter):
    """By definition, token by token: sigmoid of the max over every position after the image's last token."""
    rpn = _rpn(adapter)
    batch = adapter.prepare(_images(), QUESTIONS)
    with torch.no_grad():
        hidden = rpn.trunk(batch)
        scores = rpn.question_scores(hidden, batch)
        for index, count in enumerate(batch.visual_counts):
            after_image = range(int(batch.visual_positions[index, count - 1]) + 1, hidden.shape[1])
            assert len(after_image) >= 2  # the question's tokens and the assistant's header
            one_by_one = torch.stack(
                [rpn.logits_at(hidden, batch, torch.full((batch.size, 1), t))[index, 0, :count] for t in after_image]
            )
            torch.testing.assert_close(scores[index], one_by_one.amax(0).sigmoid(), atol=1e-5, rtol=1e-5)


def _prune_every_other(batch, samples=(0, 2)) -> None:
    batch.visual_keep = [
        (torch.arange(count) % 2 == 1) if index in samples else None for index, count in enumerate(batch.visual_counts)
    ]


def test_pruned_tokens_leave_stage_two_and_the_rest_keep_their_place(adapter):
    """Each row is the unpruned row without the pruned image tokens: M-RoPE positions as they were assigned
    (released Qwen2.5-VL), 1-D positions counting the tokens that remain (as LLaVA's `generate` counts them)."""
    images = _images()
    batch = adapter.prepare(images, QUESTIONS)
    crops = _crops(adapter, images, "mask")
    full = adapter.answer_rows(batch, crops)
    _prune_every_other(batch)
    pruned = adapter.answer_rows(batch, crops)
    for index, (whole, row) in enumerate(zip(full, pruned)):
        if not crops[index]:  # no crop, no pruning (released: only when a crop is made)
            assert torch.equal(row.embeds, whole.embeds)
            continue
        keep = torch.ones(len(whole.embeds), dtype=torch.bool)
        keep[: len(batch.row_keep(index))] = batch.row_keep(index)
        assert int((~keep).sum()) == batch.visual_counts[index] // 2
        torch.testing.assert_close(row.embeds, whole.embeds[keep])
        if whole.positions.ndim == 2:  # M-RoPE
            assert torch.equal(row.positions, whole.positions[:, keep])
        else:
            assert torch.equal(row.positions, torch.arange(len(row.embeds)))
        first_pruned = int(batch.visual_positions[index, 0]) - int((batch.inputs["attention_mask"][index] == 0).sum())
        assert row.shared == first_pruned  # reuse stops at the first token that left


def test_pruned_stage_two_reuses_the_prefix_exactly(adapter):
    images = _images()
    batch = adapter.prepare(images, QUESTIONS)
    crops = _crops(adapter, images, "mask")
    _prune_every_other(batch)
    ids, recomputed = _decode(adapter, batch, crops, reuse=False)
    reused_ids, reused = _decode(adapter, batch, crops, reuse=True)
    _assert_same_logits(reused, recomputed)
    assert torch.equal(reused_ids, ids)


def test_zoom_prunes_only_images_above_the_limit_and_only_with_a_crop(adapter, monkeypatch):
    rpn = _rpn(adapter)
    # scores spread over [0, 1] (the peaked RPN that makes regions saturates them): about half the tokens go
    monkeypatch.setattr(
        rpn, "question_scores", lambda hidden, batch: [torch.linspace(0, 1, c) for c in batch.visual_counts]
    )
    images, questions = _images(), [q[0] for q in QUESTIONS]
    batch = adapter.prepare(images, [[q] for q in questions])
    limit = min(batch.visual_counts) - 1  # every image is above it
    results = {}
    for reuse in (True, False):
        roi = RoiSettings(tau=0.6, max_side_frac=1.0, prune_above=limit, prune_score=0.5)
        zoom = Zoom(adapter, rpn, InferSettings(roi=roi, max_new_tokens=4, prefix_reuse=reuse))
        results[reuse] = zoom.ask_batch(images, questions)
    with_crop = [r for r in results[True] if r.extra_tokens]
    assert with_crop, "no region: the test would not exercise pruning"
    assert all(r.pruned_tokens == (r.geometry.grid_height * r.geometry.grid_width + 1) // 2 for r in with_crop)
    assert all(r.pruned_tokens == 0 for r in results[True] if not r.extra_tokens)
    assert [r.answer for r in results[True]] == [r.answer for r in results[False]]
    assert [r.pruned_tokens for r in results[True]] == [r.pruned_tokens for r in results[False]]
    assert all("pruned_tokens" in r.to_json() for r in results[True])

    roi = RoiSettings(tau=0.6, max_side_frac=1.0, prune_above=max(batch.visual_counts), prune_score=0.5)
    unpruned = Zoom(adapter, rpn, InferSettings(roi=roi, max_new_tokens=4)).ask_batch(images, questions)
    assert all(r.pruned_tokens == 0 for r in unpruned)  # at the limit: not above it


def test_only_the_images_above_the_limit_are_pruned():
    """Qwen2.5-VL grids follow the image: a wide image is pruned, a small one in the same batch is not."""
    adapter = wrap_model(*build_tiny("qwen"), "tiny-qwen")
    assert isinstance(adapter, Qwen2_5_VLAdapter)
    images = [random_images(1, seed=1, size=(40, 40))[0], random_images(1, seed=2, size=(200, 120))[0]]
    rpn = _rpn(adapter)
    batch = adapter.prepare(images, [["where ?"], ["where ?"]])
    small, large = batch.visual_counts
    assert small < large
    zoom = Zoom(adapter, rpn, InferSettings(roi=RoiSettings(prune_above=small, prune_score=0.5)))
    zoom.roi_maps(batch, "sdrpn")
    assert batch.visual_keep[0] is None and batch.visual_keep[1] is not None
    assert batch.visual_keep[1].shape == (large,)


def test_qwen_prunes_by_default_and_load_can_turn_it_off():
    adapter = wrap_model(*build_tiny("qwen"), "tiny-qwen")
    rpn = _rpn(adapter)
    assert load(adapter, rpn).settings.roi.prune_above == 1024  # the released rule is the family's default
    assert load(adapter, rpn, prune=False).settings.roi.prune_above == 0
