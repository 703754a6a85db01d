"""Stage 2 continues stage 1's frozen layers: the same logits as computing the whole prompt again, per family."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from sdrpn.infer import InferSettings, RoiPrediction, Zoom
from sdrpn.models import CropTokens
from sdrpn.roi import RoiSettings
from sdrpn.rpn import RegionProposalNetwork
from tests.conftest import random_images

NEW_TOKENS = 4
QUESTIONS = [["where ?"], ["what colour is the object ?"], ["what is red top left green blue square ? where"]]
FROZEN = 2


class RecordScores(LogitsProcessor):
    """Keeps every decoding step's logits, unchanged."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def _images():
    sizes = [(100, 80), (60, 90), (120, 120)]
    return [random_images(1, seed=20 + i, size=size)[0] for i, size in enumerate(sizes)]


def _crops(adapter, images, upscale: str) -> list[list[CropTokens]]:
    """Sample 0 and 2 get crops (two boxes, or one crop with half its tokens kept); sample 1 none."""
    crops = []
    for index, image in enumerate(images):
        if index == 1:
            crops.append([])
            continue
        width, height = image.size
        if upscale == "box":
            encoded, _ = adapter.encode_crops(
                [image.crop((0, 0, width // 2, height // 2)), image.crop((5, 9, width, height))]
            )
            crops.append(encoded)
        else:
            (crop,), _ = adapter.encode_crops([image.crop((4, 2, width - 3, height - 7))])
            keep = torch.arange(crop.features.shape[0]) % 2 == 0
            crops.append([CropTokens(crop.features, crop.grid, keep)])
    return crops


def _decode(adapter, batch, crops, reuse: bool):
    batch.prefix = None
    if reuse:
        adapter.prefix_state(batch, FROZEN)
    recorder = RecordScores()
    with torch.no_grad():
        ids = adapter.generate(batch, crops, NEW_TOKENS, logits_processor=LogitsProcessorList([recorder]))
    return ids, torch.stack(recorder.steps)


def _assert_same_logits(reused: torch.Tensor, recomputed: torch.Tensor) -> None:
    scale = recomputed.abs().max()
    torch.testing.assert_close(reused, recomputed, atol=2e-5 * max(1.0, float(scale)), rtol=0)


@pytest.mark.parametrize("upscale", ["box", "mask"])
def test_reused_prefix_gives_the_logits_of_the_whole_prompt(adapter, upscale):
    """Left-padded rows of different lengths, crops of different sizes, and a row with no region."""
    images = _images()
    batch = adapter.prepare(images, QUESTIONS)
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "rows must be padded differently"
    crops = _crops(adapter, images, upscale)
    ids, recomputed = _decode(adapter, batch, crops, reuse=False)
    reused_ids, reused = _decode(adapter, batch, crops, reuse=True)
    assert batch.prefix is not None and batch.prefix.cache.get_seq_length() == batch.inputs["input_ids"].shape[1]
    _assert_same_logits(reused, recomputed)
    assert torch.equal(reused_ids, ids)


@pytest.mark.parametrize("upscale", ["mask", None])
def test_reused_prefix_of_one_unpadded_row_gives_the_logits_of_the_whole_prompt(adapter, upscale):
    """One sample: no row moves, so stage 1's keys/values enter stage 2's cache as they are (views)."""
    images = _images()[2:]
    batch = adapter.prepare(images, QUESTIONS[2:])
    crops = _crops(adapter, [images[0]] * 3, upscale)[2:] if upscale else [[]]
    ids, recomputed = _decode(adapter, batch, crops, reuse=False)
    reused_ids, reused = _decode(adapter, batch, crops, reuse=True)
    _assert_same_logits(reused, recomputed)
    assert torch.equal(reused_ids, ids)


def test_reused_prefix_without_any_region_runs_only_the_later_layers(adapter):
    images = _images()
    batch = adapter.prepare(images, QUESTIONS)
    ids, recomputed = _decode(adapter, batch, [[], [], []], reuse=False)
    reused_ids, reused = _decode(adapter, batch, [[], [], []], reuse=True)
    _assert_same_logits(reused, recomputed)
    assert torch.equal(reused_ids, ids)

    # The frozen layers see only the one token left to continue from (the last prompt token), then decoding.
    lengths = []
    handle = adapter.decoder_layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    try:
        _decode(adapter, batch, [[], [], []], reuse=True)
    finally:
        handle.remove()
    assert lengths[1] == 1, f"layer 0 ran over {lengths[1]} tokens in stage 2's first step"


def test_stage1_cache_holds_exactly_the_frozen_layers(adapter):
    batch = adapter.prepare(_images()[:1], QUESTIONS[:1])
    prefix = adapter.prefix_state(batch, FROZEN)
    filled = [layer.get_seq_length() for layer in prefix.cache.layers]
    assert filled[:FROZEN] == [batch.inputs["input_ids"].shape[1]] * FROZEN
    assert set(filled[FROZEN:]) == {0}
    torch.testing.assert_close(prefix.hidden, adapter.prefix_hidden(batch, FROZEN), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("upscale", ["mask", "box"])
def test_zoom_answers_are_the_same_with_and_without_reuse(adapter, upscale):
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(adapter, FROZEN, 3).eval()
    with torch.no_grad():
        rpn.q_proj.weight.mul_(100.0)  # a peaked map, so some tokens clear tau and others do not
    roi = RoiSettings(tau=0.6, max_side_frac=1.0)
    images, questions = _images(), [q[0] for q in QUESTIONS]
    results = {}
    for reuse in (True, False):
        zoom = Zoom(
            adapter, rpn, InferSettings(upscale=upscale, roi=roi, max_new_tokens=NEW_TOKENS, prefix_reuse=reuse)
        )
        results[reuse] = zoom.ask_batch(images, questions)
    assert any(r.extra_tokens for r in results[True]), "no region: the test would not exercise crops"
    assert [r.answer for r in results[True]] == [r.answer for r in results[False]]
    assert [r.extra_tokens for r in results[True]] == [r.extra_tokens for r in results[False]]


def test_raw_attention_without_a_region_answers_from_its_first_pass(adapter, monkeypatch):
    images, questions = _images(), [q[0] for q in QUESTIONS]
    zoom = Zoom(adapter, None, InferSettings(method="base", max_new_tokens=NEW_TOKENS))
    base = zoom.ask_batch(images, questions)
    # A max-normalised map always clears any tau at its peak: here the regions are dropped after the map.
    monkeypatch.setattr(
        zoom,
        "regions",
        lambda maps, batch, method: [RoiPrediction(m, None, [], None, g) for m, g in zip(maps, batch.geometries)],
    )
    calls = []
    original = type(adapter).generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(adapter), "generate", counted)
    results = zoom.ask_batch(images, questions, method="raw-attention")
    assert all(r.boxes == [] for r in results)
    assert len(calls) == 1, "raw attention decoded again although no sample got a crop"
    assert [r.answer for r in results] == [r.answer for r in base]


def test_reprompt_reuses_the_visual_tokens(adapter, monkeypatch):
    images = _images()
    batch = adapter.prepare(images, QUESTIONS)
    adapter.input_embeddings(batch)
    fresh = adapter.prepare(images, [["write a general description ."]] * 3)
    expected = adapter.input_embeddings(fresh)
    monkeypatch.setattr(adapter.model.model, "get_image_features", None)  # the vision tower may not run again
    other = adapter.reprompt(batch, [["write a general description ."]] * 3)
    torch.testing.assert_close(other.embeddings, expected, atol=1e-6, rtol=1e-6)


def test_vicrop_prompts_share_their_image_prefix(adapter):
    """ViCrop's two prompts: [system, image] runs once, then only the two prompts' own tokens (both in one batch)."""
    from sdrpn.attention import prompt_attention, prompts_attention

    images = _images()
    batch = adapter.prepare(images, QUESTIONS)
    generic = adapter.reprompt(batch, [["write a general description ."]] * 3)
    seen = []
    handle = adapter.decoder_layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[:2]),
        with_kwargs=True,
    )
    try:
        shared = prompts_attention(adapter, [batch, generic], {1: None})
    finally:
        handle.remove()
    (rows, prefix), (both, rest) = seen
    assert rows == 3 and both == 6
    assert prefix >= max(batch.visual_counts) and rest < batch.inputs["input_ids"].shape[1] - min(batch.visual_counts)
    for prompt, maps in zip([batch, generic], shared):
        for ours, alone in zip(maps, prompt_attention(adapter, prompt, {1: None})):
            torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-4)
