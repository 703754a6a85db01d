"""Pins two-stage inference (paper 3.4): crop token counts, insertion point, no-region == base, batch == single."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import sdrpn
from sdrpn.attention import teacher_attention
from sdrpn.errors import SdrpnError
from sdrpn.images import load_image
from sdrpn.infer import GENERIC_PROMPT, VICROP_SUFFIX, InferSettings, RoiPrediction, Zoom, load
from sdrpn.models import CropTokens, wrap_model
from sdrpn.models.stock import lay_out
from sdrpn.roi import Geometry, RoiSettings, crop_token_mask, find_regions, grid_box_to_pixels, image_cells
from sdrpn.rpn import RegionProposalNetwork, load_rpn
from tests.conftest import build_tiny, random_images

NEW_TOKENS = 4
# Three questions of different token lengths, so the batch is left-padded differently per row.
BATCH_QUESTIONS = ["where ?", "what colour is the object ?", "what is red top left green blue square ? where"]
# Sharpened random RPN + a threshold that keeps part of its map; max_side_frac=1 keeps whole-grid
# regions too (a random model's attention maps are nearly flat, so raw-attention covers the grid).
CROP_ROI = RoiSettings(tau=0.6, max_side_frac=1.0)


def crop_token_count(adapter, image: Image.Image, box) -> int:
    """How many visual tokens the model gives a crop of `image` (any family, any grid)."""
    crops, _ = adapter.encode_crops([image.crop(box)])
    return crops[0].kept


def _images() -> list[Image.Image]:
    sizes = [(100, 80), (60, 90), (120, 120)]
    return [random_images(1, seed=10 + i, size=size)[0] for i, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def fresh_rpn(adapter):
    torch.manual_seed(0)
    return RegionProposalNetwork(adapter, 2, 3).eval()


@pytest.fixture(scope="module")
def sharp_rpn(adapter):
    """A freshly initialised RPN whose q projection is scaled up: its near-flat random map (all ~0.5)
    becomes peaked enough that thresholding keeps some tokens and drops others."""
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(adapter, 2, 3).eval()
    with torch.no_grad():
        rpn.q_proj.weight.mul_(100.0)
    return rpn


# --- stage 2: the crop tokens --------------------------------------------------------------------


def _two_component_prediction(image: Image.Image) -> RoiPrediction:
    probability = np.zeros((4, 4))
    probability[0, 0] = probability[0, 1] = 0.9  # component 1
    probability[2, 1] = probability[2, 2] = 0.9  # component 2 (two rows below: not 8-connected)
    settings = RoiSettings(sigma=0.0, tau=0.5, min_tokens=1, grow_below=0, max_side_frac=1.0)
    regions = find_regions(probability, settings)
    assert regions.boxes == [(0, 0, 1, 2), (2, 1, 3, 3)]
    geometry = Geometry.pad_to_square(*image.size, 4, 4)
    boxes = [grid_box_to_pixels(b, geometry) for b in regions.boxes]
    union = grid_box_to_pixels(regions.union_box, geometry)
    return RoiPrediction(probability, regions, boxes, union, geometry)


def test_box_upscaling_gives_one_full_crop_per_box(adapter):
    image = random_images(1, seed=1, size=(120, 90))[0]
    prediction = _two_component_prediction(image)
    zoom = Zoom(adapter, settings=InferSettings(method="base"))
    with torch.no_grad():
        crops = zoom.crop_tokens(image, prediction, "box")
        expected, _ = adapter.encode_crops([image.crop(b) for b in prediction.boxes])
    assert len(crops) == 2 and all(c.keep is None for c in crops)
    for crop, reference in zip(crops, expected):
        assert crop.grid == reference.grid and crop.kept == crop.grid[0] * crop.grid[1]
        torch.testing.assert_close(crop.features, reference.features)


def test_mask_upscaling_keeps_only_crop_tokens_under_the_mask(adapter):
    image = random_images(1, seed=1, size=(120, 90))[0]
    prediction = _two_component_prediction(image)
    zoom = Zoom(adapter, settings=InferSettings(method="base"))
    crop = image.crop(prediction.union_box)
    with torch.no_grad():
        (masked,) = zoom.crop_tokens(image, prediction, "mask")
        (whole,), geometries = adapter.encode_crops([crop])
    keep = crop_token_mask(prediction.regions.mask, prediction.geometry, prediction.union_box, geometries[0])
    assert 0 < keep.sum() < keep.size
    assert masked.grid == whole.grid and masked.kept == int(keep.sum())
    torch.testing.assert_close(masked.features, whole.features)  # every token kept for positions, then pruned
    assert torch.equal(masked.keep, torch.from_numpy(keep.reshape(-1)))
    torch.testing.assert_close(masked.kept_features(), whole.features[torch.from_numpy(keep.reshape(-1))])
    # The union box is b_all of Eq. 8: one crop around both components, not the whole image.
    assert prediction.union_box != (0, 0, *image.size)


# --- stage 2: where the crop tokens go -----------------------------------------------------------


def test_llava_extra_tokens_are_inserted_right_after_the_image_tokens(llava_adapter):
    adapter = llava_adapter
    images = random_images(3, seed=2)
    batch = adapter.prepare(images, [[q] for q in BATCH_QUESTIONS])
    mask = batch.inputs["attention_mask"]
    lengths = mask.sum(-1).tolist()
    assert len(set(lengths)) == 3, "the prompts must differ in length for this test to mean anything"
    dim = adapter.attention_shape.hidden_size
    generator = torch.Generator().manual_seed(0)
    extra = [torch.randn(n, dim, generator=generator) for n in (5, 0, 17)]
    with torch.no_grad():
        embeds = adapter.input_embeddings(batch)
    crops = [[CropTokens(tokens, (1, len(tokens)))] if len(tokens) else [] for tokens in extra]
    new_embeds, new_mask, _ = lay_out(adapter.answer_rows(batch, crops), [0] * batch.size)

    assert new_mask.shape == new_embeds.shape[:2]
    assert new_mask.shape[1] == max(n + len(t) for n, t in zip(lengths, extra))
    for row in range(batch.size):
        n_extra = len(extra[row])
        assert int(new_mask[row].sum()) == lengths[row] + n_extra
        # Left padding: zeros then ones, the last position is always a real token.
        pad = int((new_mask[row] == 0).sum())
        assert new_mask[row, :pad].sum() == 0 and bool(new_mask[row, pad:].all())
        assert torch.all(new_embeds[row, :pad] == 0)
        old_pad = int((mask[row] == 0).sum())
        last_visual = int(batch.visual_positions[row, -1])
        assert last_visual == int(batch.visual_positions[row].max())
        before = embeds[row, old_pad : last_visual + 1]
        after = embeds[row, last_visual + 1 :]
        got = new_embeds[row, pad:]
        torch.testing.assert_close(got[: len(before)], before, rtol=0, atol=0)
        torch.testing.assert_close(got[len(before) : len(before) + n_extra], extra[row], rtol=0, atol=0)
        torch.testing.assert_close(got[len(before) + n_extra :], after, rtol=0, atol=0)


# --- no region == the base model ---------------------------------------------------------------


def test_no_region_gives_exactly_the_base_answer(adapter, fresh_rpn):
    images = _images()
    # A fresh RPN predicts ~0.5 everywhere: nothing clears tau = 0.9.
    zoom = Zoom(adapter, fresh_rpn, InferSettings(roi=RoiSettings(tau=0.9), max_new_tokens=NEW_TOKENS))
    predictions = zoom.predict_roi(images, BATCH_QUESTIONS)
    assert [p.boxes for p in predictions] == [[], [], []]

    results = zoom.ask_batch(images, BATCH_QUESTIONS)
    base = zoom.ask_batch(images, BATCH_QUESTIONS, method="base")
    assert all(r.extra_tokens == 0 and r.boxes == [] for r in results)
    grids = zoom._prepare(images, BATCH_QUESTIONS).grids
    assert [r.roi_map.shape for r in results] == grids
    assert [r.answer for r in results] == [r.answer for r in base]

    batch = zoom._prepare(images, BATCH_QUESTIONS)
    with torch.no_grad():
        ours = adapter.generate(batch, [[], [], []], max_new_tokens=NEW_TOKENS)
        stock = adapter.model.generate(**batch.inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    stock = stock[:, batch.inputs["input_ids"].shape[1] :]
    assert torch.equal(ours, stock)
    assert adapter.decode(stock) == [r.answer for r in results]


def test_zeroed_rpn_map_gives_the_base_answer(adapter, fresh_rpn, monkeypatch):
    image, question = _images()[0], BATCH_QUESTIONS[2]
    zoom = Zoom(adapter, fresh_rpn, InferSettings(max_new_tokens=NEW_TOKENS))
    base = zoom.ask(image, question, method="base")
    monkeypatch.setattr(zoom, "roi_maps", lambda batch, method: [np.zeros(grid) for grid in batch.grids])
    result = zoom.ask(image, question)
    assert (result.answer, result.extra_tokens, result.boxes) == (base.answer, 0, [])


# --- batch == single ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, upscale",
    [
        ("sdrpn", "mask"),
        ("sdrpn", "box"),
        ("base", "mask"),
        ("raw-attention", "mask"),
        ("raw-attention", "box"),
        ("vicrop", "box"),
        ("vicrop", "mask"),
    ],
)
def test_batch_answers_equal_single_answers(adapter, sharp_rpn, method, upscale):
    images = _images()
    settings = InferSettings(method=method, upscale=upscale, roi=CROP_ROI, max_new_tokens=NEW_TOKENS)
    zoom = Zoom(adapter, sharp_rpn, settings)
    batched = zoom.ask_batch(images, BATCH_QUESTIONS)
    singles = [zoom.ask(image, question) for image, question in zip(images, BATCH_QUESTIONS)]
    for many, one in zip(batched, singles):
        assert many.method == one.method == method
        assert many.boxes == one.boxes
        assert many.extra_tokens == one.extra_tokens
        assert many.answer == one.answer
        if method == "base":
            assert many.roi_map is None and many.extra_tokens == 0
        else:
            np.testing.assert_allclose(many.roi_map, one.roi_map, atol=1e-5, rtol=1e-4)
    if method != "base":
        assert any(r.boxes for r in batched), f"{method} proposed no region: the test would not exercise crops"
        for result, image in zip(batched, images):
            per_box = sum(crop_token_count(adapter, image, box) for box in result.boxes)
            if method == "vicrop" or upscale == "box":
                assert result.extra_tokens == per_box
            elif result.boxes:
                union = crop_token_count(adapter, image, zoom.predict_roi([image], [BATCH_QUESTIONS[0]])[0].union_box)
                assert 0 < result.extra_tokens <= max(union, per_box)
            else:
                assert result.extra_tokens == 0
    if method == "sdrpn":
        # Some sample's region must be a real part of the image, not all of it, or the test is weaker.
        assert any(r.boxes and r.boxes != [(0, 0, *image.size)] for r, image in zip(batched, images))
        if upscale == "mask":
            assert any(
                0 < r.extra_tokens < crop_token_count(adapter, i, (0, 0, *i.size)) for r, i in zip(batched, images)
            )


# --- ViCrop's map ---------------------------------------------------------------------------------


def _eager_last_token_attention(adapter, batch, layer: int) -> torch.Tensor:
    output = adapter.model(**batch.inputs, position_ids=batch.position_ids, output_attentions=True, use_cache=False)
    attention = output.attentions[layer]  # (B, heads, T, T)
    rows = torch.arange(batch.size)[:, None]
    return batch.per_sample(attention[:, :, -1, :].mean(1)[rows, batch.visual_positions])


@pytest.mark.parametrize("rule", ["released", "sdrpn"])
def test_vicrop_map_equals_a_direct_eager_computation(adapter, rule):
    """The last prompt token's attention at one layer, divided by the same for the generic prompt; as released,
    both prompts end with ViCrop's " Answer the question using a single word or phrase."."""
    images = _images()
    layer = 2
    zoom = Zoom(adapter, settings=InferSettings(method="vicrop", vicrop_layer=layer, vicrop_rule=rule))
    batch = zoom._prepare(images, BATCH_QUESTIONS)
    maps = zoom.roi_maps(batch, "vicrop")
    suffix = VICROP_SUFFIX if rule == "released" else ""
    asked = adapter.prepare(batch.images, [[q + suffix] for q in BATCH_QUESTIONS])
    generic = adapter.prepare(batch.images, [[GENERIC_PROMPT + suffix]] * batch.size)
    adapter.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            specific_rows = _eager_last_token_attention(adapter, asked, layer)
            generic_rows = _eager_last_token_attention(adapter, generic, layer)
            # One sample alone (no padding): the batch must not change the map.
            alone = adapter.prepare(images[:1], [[BATCH_QUESTIONS[0] + suffix]])
            alone_generic = adapter.prepare(images[:1], [[GENERIC_PROMPT + suffix]])
            alone_rows = _eager_last_token_attention(adapter, alone, layer)
            alone_generic_rows = _eager_last_token_attention(adapter, alone_generic, layer)
    finally:
        adapter.model.set_attn_implementation("sdpa")
    assert adapter.model.config.text_config._attn_implementation == "sdpa"

    assert [m.shape for m in maps] == batch.grids
    for got, specific, generic in zip(maps, specific_rows, generic_rows):
        ratio = specific / generic
        np.testing.assert_allclose(got, (ratio / ratio.max()).numpy(), atol=1e-5, rtol=1e-4)
        assert np.isclose(got.max(), 1.0)
    ratio_alone = alone_rows[0] / alone_generic_rows[0]
    np.testing.assert_allclose(maps[0], (ratio_alone / ratio_alone.max()).numpy(), atol=1e-5, rtol=1e-4)
    # Not the trivial map: the question changes where the last token looks.
    assert not all(np.allclose(m, 1.0, atol=1e-3) for m in maps)


def test_vicrop_default_layer_is_the_first_label_layer(adapter):
    images = _images()[:1]
    default = Zoom(adapter, settings=InferSettings(method="vicrop"))
    first_layer = min(adapter.defaults().label_heads)
    explicit = Zoom(adapter, settings=InferSettings(method="vicrop", vicrop_layer=first_layer))
    batch = default._prepare(images, BATCH_QUESTIONS[:1])
    np.testing.assert_array_equal(default.roi_maps(batch, "vicrop")[0], explicit.roi_maps(batch, "vicrop")[0])


# --- predict_roi ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sdrpn", "vicrop", "raw-attention"])
def test_predict_roi_boxes_are_pixels_inside_a_non_square_image(adapter, sharp_rpn, method):
    zoom = Zoom(adapter, sharp_rpn, InferSettings(roi=CROP_ROI, max_new_tokens=NEW_TOKENS))
    images = random_images(8, seed=4, size=(160, 60))
    predictions = zoom.predict_roi(images, ["what colour is the object ?"] * 8, method=method)
    with_boxes = [(i, p) for i, p in zip(images, predictions) if p.boxes]
    assert with_boxes, f"{method} proposed no box for any image"
    image, prediction = with_boxes[0]
    for other in predictions:  # cells that show only padding (LLaVA's pad-to-square) are never chosen
        assert not (other.regions.mask & ~image_cells(other.geometry)).any()
    grid = (prediction.geometry.grid_height, prediction.geometry.grid_width)
    assert prediction.probability.shape == prediction.regions.mask.shape == grid
    assert (prediction.geometry.image_width, prediction.geometry.image_height) == (160, 60)
    assert prediction.boxes, f"{method} proposed no box for this image"
    assert len(prediction.boxes) == len(prediction.regions.boxes)
    for box, grid_box in zip(prediction.boxes, prediction.regions.boxes):
        x0, y0, x1, y1 = box
        assert all(isinstance(v, int) for v in box)
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 60
        if not prediction.windowed:  # ViCrop's window is a pixel square, not its token box
            assert box == grid_box_to_pixels(grid_box, prediction.geometry)
    ux0, uy0, ux1, uy1 = prediction.union_box
    assert 0 <= ux0 < ux1 <= 160 and 0 <= uy0 < uy1 <= 60
    assert zoom.predict_roi([image], ["where ?"], method="base") == []


@pytest.mark.parametrize("method", ["sdrpn", "raw-attention"])
def test_windows_replace_token_boxes_and_masked_upscaling_keeps_their_tokens(adapter, sharp_rpn, method):
    roi = RoiSettings(tau=0.6, max_side_frac=1.0, window=1.5)
    zoom = Zoom(adapter, sharp_rpn, InferSettings(roi=roi, max_new_tokens=NEW_TOKENS))
    images = _images()
    predictions = zoom.predict_roi(images, BATCH_QUESTIONS, method=method)
    assert any(p.boxes for p in predictions), f"{method} proposed no region"
    for image, prediction in zip(images, predictions):
        assert len(prediction.boxes) == len(prediction.regions.boxes)
        side = 1.5 * prediction.geometry.cell_width  # square canvas: cells are square
        for x0, y0, x1, y1 in prediction.boxes:
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            assert x1 - x0 == min(math.ceil(side), image.width) and y1 - y0 == min(math.ceil(side), image.height)
    results = zoom.ask_batch(images, BATCH_QUESTIONS, method=method, upscale="mask")
    for result, prediction in zip(results, predictions):
        assert result.boxes == prediction.boxes
        if len(prediction.boxes) == 1:  # one window: the masked crop is the window, all its tokens on the image
            assert result.extra_tokens > 0
    box_results = zoom.ask_batch(images, BATCH_QUESTIONS, method=method, upscale="box")
    expected = [sum(crop_token_count(adapter, i, b) for b in p.boxes) for i, p in zip(images, predictions)]
    assert [r.extra_tokens for r in box_results] == expected


def test_raw_attention_uses_the_heads_the_rpn_was_distilled_from(adapter):
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(adapter, 2, 3).eval()
    assert Zoom(adapter, rpn).teacher_heads() == adapter.defaults().label_heads  # no label settings recorded
    rpn.config.label_settings = {"label_heads": {"3": [0, 1]}}  # as JSON stores it
    zoom = Zoom(adapter, rpn, InferSettings(max_new_tokens=NEW_TOKENS))
    assert zoom.teacher_heads() == {3: [0, 1]} != adapter.defaults().label_heads
    batch = zoom._prepare(_images(), BATCH_QUESTIONS)
    maps = zoom.roi_maps(batch, "raw-attention")
    expected = teacher_attention(adapter, batch, {3: [0, 1]}, max_new_tokens=NEW_TOKENS).roi_maps
    for got, reference in zip(maps, expected):
        np.testing.assert_allclose(got, (reference / reference.max()).numpy(), atol=1e-6)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_tau_outside_open_unit_interval_is_rejected(adapter, tau):
    with pytest.raises(SdrpnError, match="tau"):
        RoiSettings(tau=tau)
    with pytest.raises(SdrpnError, match="tau"):
        load(adapter, tau=tau)


def test_sdrpn_without_rpn_is_rejected(adapter):
    with pytest.raises(SdrpnError, match="RPN"):
        Zoom(adapter, None, InferSettings(method="sdrpn"))
    zoom = Zoom(adapter)  # no RPN: the base model
    assert zoom.settings.method == "base"
    image = random_images(1)[0]
    with pytest.raises(SdrpnError, match="RPN"):
        zoom.ask(image, "where ?", method="sdrpn")


def test_unknown_method_or_upscale_is_rejected(adapter, fresh_rpn):
    with pytest.raises(SdrpnError, match="method"):
        InferSettings(method="zoom-harder")
    with pytest.raises(SdrpnError, match="upscale"):
        InferSettings(upscale="bicubic")
    zoom = Zoom(adapter, fresh_rpn, InferSettings(max_new_tokens=NEW_TOKENS))
    image = random_images(1)[0]
    with pytest.raises(SdrpnError, match="method"):
        zoom.ask(image, "where ?", method="zoom-harder")
    with pytest.raises(SdrpnError, match="upscale"):
        zoom.ask(image, "where ?", upscale="bicubic")
    with pytest.raises(SdrpnError, match="method"):
        zoom.predict_roi([image], ["where ?"], method="zoom-harder")


def test_rpn_of_another_base_model_is_rejected(adapter, family, fresh_rpn, tmp_path):
    fresh_rpn.save(tmp_path / "rpn")
    assert isinstance(load_rpn(tmp_path / "rpn", adapter), RegionProposalNetwork)  # its own model: fine
    other_model, other_processor = build_tiny(family, seed=2)
    other = wrap_model(other_model, other_processor, f"tiny-{family}-seed2")
    assert other.fingerprint() == adapter.fingerprint()  # same shapes: only the weights tell them apart
    with pytest.raises(SdrpnError, match="trained for base model"):
        load_rpn(tmp_path / "rpn", other)
    with pytest.raises(SdrpnError, match="trained for base model"):
        load(other, str(tmp_path / "rpn"))


def test_degenerate_images_are_rejected_with_sdrpn_error(adapter, tmp_path):
    zoom = Zoom(adapter, settings=InferSettings(method="base", max_new_tokens=NEW_TOKENS))
    strip = Image.new("L", (20000, 300), 128)  # aspect 66.7 > 50
    path = tmp_path / "strip.png"
    strip.save(path)
    with pytest.raises(SdrpnError, match="aspect ratio"):
        zoom.ask(str(path), "where ?")
    with pytest.raises(SdrpnError, match="aspect ratio"):
        zoom.ask(strip, "where ?")
    with pytest.raises(SdrpnError, match="file not found"):
        zoom.ask(str(tmp_path / "missing.png"), "where ?")
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(SdrpnError, match="not an image"):
        zoom.ask(str(text), "where ?")


def _odd_images() -> dict[str, Image.Image]:
    rgb = random_images(1, seed=6, size=(70, 50))[0]
    deep = Image.fromarray((np.arange(50 * 70, dtype=np.uint16).reshape(50, 70) * 18).astype(np.uint16))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return {
        "1x1": Image.new("RGB", (1, 1), (200, 10, 10)),
        "L": rgb.convert("L"),
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "I;16": deep,
        "P": rgb.convert("P"),
    }


@pytest.mark.parametrize("method", ["vicrop", "sdrpn"])
def test_odd_pil_modes_are_answered(adapter, sharp_rpn, method):
    odd = _odd_images()
    assert odd["I;16"].mode.startswith("I;16") and odd["CMYK"].mode == "CMYK"
    zoom = Zoom(adapter, sharp_rpn, InferSettings(method=method, roi=CROP_ROI, max_new_tokens=NEW_TOKENS))
    results = zoom.ask_batch(list(odd.values()), ["what colour is the object ?"] * len(odd))
    assert len(results) == len(odd)
    for name, result in zip(odd, results):
        assert isinstance(result.answer, str), name
        w, h = odd[name].size
        for x0, y0, x1, y1 in result.boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, name
    if method == "vicrop":  # ViCrop always crops one window: the 1x1 image must survive its crop
        for image, result in zip(odd.values(), results):
            assert len(result.boxes) == 1
            assert result.extra_tokens == crop_token_count(adapter, load_image(image), result.boxes[0])
    single = zoom.ask(odd["1x1"], "what colour is the object ?")
    assert single.answer == results[0].answer


def test_ask_with_boxes_checks_its_boxes(adapter):
    zoom = Zoom(adapter, settings=InferSettings(method="base", max_new_tokens=NEW_TOKENS))
    image = random_images(1, seed=2, size=(90, 60))[0]
    boxes = [(0, 0, 45, 30), (45, 30, 90, 60)]
    (result,) = zoom.ask_with_boxes([image], ["what ?"], [boxes])
    assert result.extra_tokens == sum(crop_token_count(adapter, image, box) for box in boxes) > 0
    assert result.boxes == boxes
    with pytest.raises(SdrpnError, match="outside the 90 x 60 image"):
        zoom.ask_with_boxes([image], ["what ?"], [[(0, 0, 91, 30)]])
    with pytest.raises(SdrpnError, match="1 images, 1 questions and 2 box lists"):
        zoom.ask_with_boxes([image], ["what ?"], [[], []])


def test_load_takes_roi_defaults_from_the_checkpoint(adapter, tmp_path):
    rpn = RegionProposalNetwork(adapter, 2, 3)
    rpn.config.roi_settings = {"tau": 0.77, "min_tokens": 1, "grow_below": 0}
    rpn.save(tmp_path / "rpn")
    zoom = sdrpn.load(adapter, str(tmp_path / "rpn"))
    assert (zoom.settings.roi.tau, zoom.settings.roi.min_tokens, zoom.settings.roi.grow_below) == (0.77, 1, 0)
    assert sdrpn.load(adapter, str(tmp_path / "rpn"), tau=0.3).settings.roi.tau == 0.3
    assert sdrpn.load(adapter, RegionProposalNetwork(adapter, 2, 3)).settings.roi == adapter.defaults().roi


# --- stage 2 == the stock model fed [image, crop] as two images ------------------------------------


def _two_image_prompt(adapter, family: str, question: str) -> str:
    """The stock prompt with the crop as a second image right after the first, in the same user turn."""
    prompt = adapter._prompt([question], 1)
    if family != "qwen":  # one placeholder per image, expanded by the processor
        return prompt.replace(adapter.processor.image_token, adapter.processor.image_token * 2, 1)
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    return prompt.replace(block, block + block, 1)


def _stock_two_image_answers(adapter, family, images, crops, questions) -> torch.Tensor:
    prompts = [_two_image_prompt(adapter, family, q) for q in questions]
    if family != "qwen":  # square inputs, padded as the family pads them
        pixels = adapter._squares([image for pair in zip(images, crops) for image in pair])
        inputs = adapter.processor(images=pixels, text=prompts, return_tensors="pt", padding=True)
    else:
        pixels = [image for pair in zip(images, crops) for image in pair]
        inputs = adapter.processor(
            images=pixels, text=prompts, size=adapter._pixels(False), return_tensors="pt", padding=True
        )
    with torch.no_grad():
        out = adapter.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def test_box_upscaling_equals_the_stock_model_fed_image_and_crop(adapter, family):
    """Stage 2 with one box is token for token the stock model (its processor, chat template and generate) fed
    the image and the crop as two images of one turn; batched with left padding and a different grid each."""
    images = _images()
    boxes = [(10, 5, 70, 50), (0, 30, 40, 90), (60, 60, 120, 120)]
    zoom = Zoom(adapter, settings=InferSettings(method="base", max_new_tokens=NEW_TOKENS))
    ours = zoom.ask_with_boxes(images, BATCH_QUESTIONS, [[box] for box in boxes])
    crops = [image.crop(box) for image, box in zip(images, boxes)]
    stock = _stock_two_image_answers(adapter, family, images, crops, BATCH_QUESTIONS)
    assert [r.answer for r in ours] == adapter.decode(stock)
    batch = zoom._prepare(images, BATCH_QUESTIONS)
    crop_tokens = [adapter.encode_crops([crop])[0] for crop in crops]
    with torch.no_grad():
        assert torch.equal(adapter.generate(batch, crop_tokens, max_new_tokens=NEW_TOKENS), stock)
    if family == "qwen":
        assert len({g for g in batch.grids}) == 3, "the samples must have different grids"
    assert len({r.answer for r in ours}) > 1, "a model that always says the same thing would prove nothing"


def test_pruning_no_crop_token_equals_the_whole_crop(adapter):
    """Masked upscaling removes tokens after positions are assigned: keeping every token changes nothing."""
    images = _images()
    batch = adapter.prepare(images, [[q] for q in BATCH_QUESTIONS])
    crops = [adapter.encode_crops([image.crop((0, 0, 50, 40))])[0][0] for image in images]
    all_kept = [[replace(crop, keep=torch.ones(crop.features.shape[0], dtype=torch.bool))] for crop in crops]
    with torch.no_grad():
        whole = adapter.generate(batch, [[crop] for crop in crops], max_new_tokens=NEW_TOKENS)
        kept = adapter.generate(batch, all_kept, max_new_tokens=NEW_TOKENS)
    assert torch.equal(whole, kept)


def test_masked_crop_keeps_the_positions_of_its_kept_tokens():
    """Qwen2.5-VL: a pruned crop's kept tokens carry the 2-D positions they have in the whole crop, and the
    text after it continues from the same positions (the rope index over the unpruned grid)."""
    model, processor = build_tiny("qwen")
    adapter = wrap_model(model, processor, "tiny-qwen")
    image = _images()[0]
    batch = adapter.prepare([image], [[BATCH_QUESTIONS[0]]])
    (crop,), _ = adapter.encode_crops([image.crop((0, 0, 60, 60))])
    keep = torch.zeros(crop.features.shape[0], dtype=torch.bool)
    keep[::3] = True
    _, whole_positions = adapter._with_crops(batch, 0, [crop])
    embeds, positions = adapter._with_crops(batch, 0, [replace(crop, keep=keep)])
    start = int((batch.inputs["input_ids"][0] == model.config.vision_end_token_id).nonzero()[0, 0]) + 2
    crop_columns = torch.arange(start, start + len(keep))
    expected = torch.cat(
        [whole_positions[:, :start], whole_positions[:, crop_columns[keep]], whole_positions[:, start + len(keep) :]], 1
    )
    assert torch.equal(positions, expected)
    assert embeds.shape[0] == positions.shape[1] == whole_positions.shape[1] - int((~keep).sum())


# --- the released stage 2 (LLaVA get_batched_sub_images), on hand-made maps -----------------------------------


def _released_zoom(adapter, grid: np.ndarray, upscale: str, monkeypatch) -> Zoom:
    roi = RoiSettings(tau=0.5, sigma=0.0, max_side_frac=1.0, max_tokens=225, grow_rule="released", crop_rule="released")
    zoom = Zoom(adapter, settings=InferSettings(method="base", upscale=upscale, roi=roi, max_new_tokens=NEW_TOKENS))
    monkeypatch.setattr(zoom, "roi_maps", lambda batch, method: [grid] * batch.size)
    monkeypatch.setitem(sdrpn.infer.METHODS, "base", replace(sdrpn.infer.METHODS["base"], upscale=None))
    return zoom


def test_released_stage2_one_region_is_a_stretched_box_whatever_the_upscale(llava_adapter, monkeypatch):
    image = random_images(1, seed=3, size=(120, 80))[0]
    grid = np.zeros((4, 4))
    grid[1, 1:3] = 0.9
    (prediction,) = _released_zoom(llava_adapter, grid, "mask", monkeypatch).predict_roi([image], ["where ?"])
    zoom = _released_zoom(llava_adapter, grid, "mask", monkeypatch)
    (crop,) = zoom.crop_tokens(image, prediction, "mask")
    stretched = image.crop(prediction.boxes[0]).resize((64, 64), Image.BILINEAR)
    (expected,), _ = llava_adapter.encode_crops([stretched])  # a square: padding changes nothing
    assert crop.keep is None and crop.kept == 16
    torch.testing.assert_close(crop.features, expected.features)


def test_released_stage2_two_regions_mask_the_whole_map_resized_bilinearly(llava_adapter, monkeypatch):
    image = random_images(1, seed=3, size=(120, 120))[0]
    grid = np.zeros((4, 4))
    grid[0, 0:2] = 0.9
    grid[2, 1:3] = 0.9  # two components; the mask's box is rows 0-2, columns 0-2
    zoom = _released_zoom(llava_adapter, grid, "mask", monkeypatch)
    (prediction,) = zoom.predict_roi([image], ["where ?"])
    assert len(prediction.boxes) == 2 and prediction.union_box == (0, 0, 90, 90)
    (crop,) = zoom.crop_tokens(image, prediction, "mask")
    cut = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    expected = torch.nn.functional.interpolate(cut[None, None], size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.equal(crop.keep, (expected[0, 0] > 0.5).reshape(-1))
    assert 0 < crop.kept < 16
    three = np.zeros((4, 4))
    three[0, 0:2] = three[2:4, 0] = three[2, 2:4] = (
        0.9  # three components: box upscaling of more than two crops nothing
    )
    boxes_zoom = _released_zoom(llava_adapter, three, "box", monkeypatch)
    (result,) = boxes_zoom.ask_batch([image], ["where ?"])
    assert len(result.boxes) == 3 and result.extra_tokens == 0


def test_released_qwen_stage2_crops_every_cell_above_tau_once(monkeypatch):
    """Released Qwen2.5-VL: no components; one crop around all cells above tau, at the image's pixel budget,
    its tokens kept where the mask resized bilinearly is above 0.5; the top-left strip is zeroed on big grids."""
    model, processor = build_tiny("qwen")
    adapter = wrap_model(model, processor, "tiny-qwen")
    image = random_images(1, seed=3, size=(168, 168))[0]
    roi = replace(RoiSettings.released_qwen(tau=0.5), sigma=0.0)
    zoom = Zoom(adapter, settings=InferSettings(method="base", upscale="box", roi=roi, max_new_tokens=NEW_TOKENS))
    grid = np.zeros((6, 6))
    grid[0, 0:2] = grid[3, 4] = 0.9  # two separate blobs: still one region
    monkeypatch.setattr(zoom, "roi_maps", lambda batch, method: [grid] * batch.size)
    monkeypatch.setitem(sdrpn.infer.METHODS, "base", replace(sdrpn.infer.METHODS["base"], upscale=None))
    (prediction,) = zoom.predict_roi([image], ["where ?"])
    assert prediction.regions.boxes == [(0, 0, 4, 5)] and prediction.union_box == (0, 0, 140, 112)
    (crop,) = zoom.crop_tokens(image, prediction, "box")  # even with box upscaling
    cut = torch.from_numpy(grid[0:4, 0:5] > 0.5).float()
    expected = torch.nn.functional.interpolate(cut[None, None], size=crop.grid, mode="bilinear", align_corners=False)
    assert torch.equal(crop.keep, (expected[0, 0] > 0.5).reshape(-1))
    big = np.zeros((30, 30))
    big[0:3, 0] = 0.9  # 900 tokens > 768: the released strip is zeroed, nothing is left
    monkeypatch.setattr(zoom, "roi_maps", lambda batch, method: [big] * batch.size)
    (prediction,) = zoom.predict_roi([image], ["where ?"])
    assert prediction.boxes == []


# --- what the Python API accepts ---------------------------------------------------------------------------


def test_the_api_takes_arrays_and_bytes_and_refuses_the_rest(adapter):
    import io

    zoom = Zoom(adapter, settings=InferSettings(method="base", max_new_tokens=2))
    image = random_images(1, seed=8, size=(70, 50))[0]
    pixels = np.asarray(image)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    reference = zoom.ask(image, "where ?").answer
    assert zoom.ask(pixels, "where ?").answer == reference
    assert zoom.ask(encoded.getvalue(), "where ?").answer == reference
    assert zoom.ask_batch([], []) == [] and zoom.predict_roi([], []) == [] and zoom.ask_with_boxes([], [], []) == []
    for bad_image in (None, torch.zeros(3, 8, 8), pixels.astype(np.float32), 42):
        with pytest.raises(SdrpnError):
            zoom.ask(bad_image, "where ?")
    for bad_question in (None, 3, ["where ?", 7]):
        with pytest.raises(SdrpnError, match="question"):
            zoom.ask(image, bad_question)
    with pytest.raises(SdrpnError, match="4 numbers"):
        zoom.ask_with_boxes([image], ["where ?"], [[(1, 2, 3)]])
    with pytest.raises(SdrpnError, match="2 images for 1 questions"):
        zoom.ask_batch([image, image], ["where ?"])
    assert issubclass(SdrpnError, ValueError)


def test_a_multi_frame_image_is_read_at_its_first_frame_and_the_result_says_so(adapter, tmp_path):
    zoom = Zoom(adapter, settings=InferSettings(method="base", max_new_tokens=2))
    first, second = random_images(2, seed=9, size=(60, 40))
    path = tmp_path / "moving.gif"
    first.save(path, save_all=True, append_images=[second])
    result = zoom.ask(str(path), "where ?")
    assert result.warnings == [f"image '{path}' has 2 frames; only the first is used"]
    assert result.to_json()["warnings"] == result.warnings
    assert zoom.ask(first, "where ?").warnings == []


def test_vicrop_suffix_is_added_once_whatever_separates_it():
    from sdrpn.infer import _with_suffix

    assert _with_suffix("what is it?", 0) == "what is it?" + VICROP_SUFFIX
    assert _with_suffix("what is it?" + VICROP_SUFFIX, 0) == "what is it?" + VICROP_SUFFIX
    newline = "what is it?\n" + VICROP_SUFFIX.strip()
    assert _with_suffix(newline, 0) == newline
    assert _with_suffix("an answer", 1) == "an answer"
