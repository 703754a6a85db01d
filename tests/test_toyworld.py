"""Pins sdrpn.toyworld: a seeded fine-detail world whose mark is illegible at the model input but legible in a crop,
and the shipped demo MLLM that reloads offline."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from sdrpn.toyworld import world as W

WEIGHTS = Path(W.__file__).parent / "weights" / "mllm"
N_TOKENS = (W.INPUT_SIZE // 16) ** 2


def _nearest(rgb, names) -> str:
    pal = np.array([W.COLOURS[n] for n in names], np.float32)
    return names[int(((pal - np.asarray(rgb, np.float32)) ** 2).sum(1).argmin())]


def _region_reader(img: Image.Image, box, object_colour: str) -> str | None:
    """A simple nearest-colour classifier: label every pixel of the region with its nearest colour among the
    palette and a few grays/dark, and answer the most frequent palette colour that is not the object's."""
    a = np.asarray(img, np.float32)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    reg = a[max(0, y0) : y1, max(0, x0) : x1].reshape(-1, 3)
    names = list(W.COLOURS)
    pal = np.array(
        [W.COLOURS[n] for n in names] + [[30, 30, 30], [80, 80, 80], [130, 130, 130], [180, 180, 180]], np.float32
    )
    lab = ((reg[:, None, :] - pal[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(lab, minlength=len(pal))[: len(names)].astype(float)
    counts[names.index(object_colour)] = -1
    return names[int(counts.argmax())] if counts.max() > 0 else None


def _scaled(box, origin, scale):
    return [
        (box[0] - origin[0]) * scale,
        (box[1] - origin[1]) * scale,
        (box[2] - origin[0]) * scale,
        (box[3] - origin[1]) * scale,
    ]


def test_same_seed_same_sample_and_different_seeds_differ():
    a, b = W.render_sample(123), W.render_sample(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    fields = ("question", "answer", "qtype", "target_box", "seed")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    c = W.render_sample(124)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    xs, ys = W.make_samples(6, seed=7), W.make_samples(6, seed=7)
    assert [(s.seed, s.question, s.answer) for s in xs] == [(s.seed, s.question, s.answer) for s in ys]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(xs, ys))
    assert [s.seed for s in W.make_samples(6, seed=8)] != [s.seed for s in xs]


def test_sample_fields():
    s = W.render_sample(5, "fine")
    assert s.image.mode == "RGB" and s.image.size == (W.SCENE_SIZE, W.SCENE_SIZE)
    assert s.qtype == "fine" and s.answer in W.MARK_COLOURS
    x0, y0, x1, y1 = s.target_box
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert W.OBJECT_SIZE[0] <= x1 - x0 <= W.OBJECT_SIZE[1]
    small = W.render_sample(5, "fine", size=448)
    assert small.image.size == (448, 448) and small.answer == s.answer


def test_answers_match_pixels():
    """The object's colour next to the box centre is the coarse answer; the mark's pixels are the fine answer."""
    for seed in W.sample_seeds(60, seed=1):
        s = W.render_sample(seed, "fine")
        a = np.asarray(s.image, np.float32)
        x0, y0, x1, y1 = s.target_box
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        body = np.median(a[cy + 4 : cy + 7, cx - 1 : cx + 2].reshape(-1, 3), axis=0)  # below the mark and its rim
        assert _nearest(body, W.OBJECT_COLOURS) == s.attrs["colour"]
        mx0, my0, mx1, my1 = s.attrs["mark_box"]
        assert x0 < mx0 < mx1 < x1 and y0 < my0 < my1 < y1
        mark = np.median(a[my0:my1, mx0:mx1].reshape(-1, 3), axis=0)
        assert _nearest(mark, W.MARK_COLOURS) == s.answer != s.attrs["colour"]
        coarse = W.ask(W.render_scene(seed), "coarse", np.random.default_rng(seed))
        assert coarse[1] == s.attrs[{"colour": "colour", "shape": "shape", "where": "where"}[coarse[2]]]


def test_scenes_of_several_objects_name_the_target_by_colour():
    """Binding scenes: the target is drawn as in its one-object scene, the distractors differ from it and from
    each other in colour and shape, keep clear of each other, and the questions name the target by colour."""
    import pytest

    for seed in W.sample_seeds(30, seed=6):
        one, three = W.render_scene(seed), W.render_scene(seed, objects=3)
        assert [three.shape, three.colour, three.mark, three.target_box] == [
            one.shape,
            one.colour,
            one.mark,
            one.target_box,
        ]
        objects = three.objects
        assert len(objects) == 3 and objects[0].box == three.target_box
        assert len({o.colour for o in objects}) == 3 and len({o.shape for o in objects}) == 3
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        pixels = np.asarray(three.image, np.float32)
        for o in objects:
            mx0, my0, mx1, my1 = o.mark_box
            assert _nearest(np.median(pixels[my0:my1, mx0:mx1].reshape(-1, 3), axis=0), W.MARK_COLOURS) == o.mark
        rng = np.random.default_rng(seed)
        question, answer, _ = W.ask(three, "fine", rng)
        assert question == f"what colour is the mark on the {three.colour} object ?" and answer == three.mark
        question, answer, sub = W.ask(three, "coarse", rng)
        assert f"the {three.colour} object" in question and answer == {"shape": three.shape, "where": three.where}[sub]
    samples = W.make_samples(40, seed=2, objects=3)
    vocab = set(W.WORDS) | {"?"}
    assert all(set(s.question.split()) <= vocab and s.attrs["objects"] == 3 for s in samples)
    for s in samples:
        if s.qtype == "yesno":
            present = {o.colour for o in W.render_scene(s.seed, objects=3).objects}
            assert (s.question.split()[3] in present) == (s.answer == "yes")
    with pytest.raises(ValueError, match="objects must be"):
        W.render_scene(1, objects=W.MAX_OBJECTS + 1)


def test_to_input_matches_the_clip_processor_resize():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    n = W.INPUT_SIZE
    proc = CLIPImageProcessorPil(
        size={"height": n, "width": n}, crop_size={"height": n, "width": n}, do_center_crop=False
    )
    s = W.render_sample(3)
    ours = np.asarray(W.to_input(s.image), np.float32) / 255.0
    ours = (ours - np.array(proc.image_mean)) / np.array(proc.image_std)
    theirs = np.asarray(proc(images=s.image, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    assert np.abs(ours - theirs).max() < 1e-4


def test_mark_illegible_at_input_resolution_but_legible_in_oracle_crop():
    scene_hits, crop_hits, centre_hits = 0, 0, 0
    samples = W.make_samples(200, seed=11, qtypes="fine")
    k = W.INPUT_SIZE / W.SCENE_SIZE
    for s in samples:
        colour = s.attrs["colour"]
        low = W.to_input(s.image)  # the whole scene as the model sees it
        scene_hits += _region_reader(low, _scaled(s.target_box, (0, 0), k), colour) == s.answer
        box = W.oracle_crop_box(s)
        g = W.INPUT_SIZE / (box[2] - box[0])
        crop = W.to_input(s.image, box)  # the oracle crop at the same input size
        crop_hits += _region_reader(crop, _scaled(s.target_box, box[:2], g), colour) == s.answer
        # An oracle reader that knows the mark's exact place and the object's colour reads the one input
        # pixel under the mark: the mark only tints it.
        mx0, my0, mx1, my1 = s.attrs["mark_box"]
        px = np.asarray(low, np.float32)[int((my0 + my1) / 2 * k), int((mx0 + mx1) / 2 * k)]
        centre_hits += _nearest(px, [c for c in W.MARK_COLOURS if c != colour]) == s.answer
    n = len(samples)
    chance = 1 / (len(W.MARK_COLOURS) - 1)
    assert scene_hits / n <= chance + 0.1, scene_hits / n
    assert crop_hits / n >= 0.98, crop_hits / n
    assert centre_hits / n <= 0.7, centre_hits / n


def test_oracle_crop_box_is_a_square_around_the_target_inside_the_image():
    for s in W.make_samples(50, seed=2):
        x0, y0, x1, y1 = W.oracle_crop_box(s, scale=2.0)
        t = s.target_box
        assert x1 - x0 == y1 - y0 and abs((x1 - x0) - 2 * (t[2] - t[0])) <= 1
        assert 0 <= x0 and 0 <= y0 and x1 <= 512 and y1 <= 512
        assert x0 <= t[0] and y0 <= t[1] and t[2] <= x1 and t[3] <= y1


def test_question_types_answers_and_vocabulary():
    samples = W.make_samples(600, seed=3)
    counts = Counter(s.qtype for s in samples)
    for q, w in W.QTYPE_WEIGHTS.items():
        assert abs(counts[q] / len(samples) - w) < 0.06, counts
    yes = [s.answer for s in samples if s.qtype == "yesno"]
    assert 0.4 < yes.count("yes") / len(yes) < 0.6
    assert set(yes) == {"yes", "no"}
    subtypes = Counter(s.attrs["subtype"] for s in samples if s.qtype == "coarse")
    assert set(subtypes) == {"colour", "shape", "where"}
    vocab = set(W.WORDS) | {"?"}
    for s in samples:
        assert set(s.question.split()) <= vocab and set(s.answer.split()) <= vocab
        if s.qtype == "yesno":
            assert (s.attrs["colour"] in s.question.split()) == (s.answer == "yes")
    assert {s.qtype for s in W.make_samples(9, seed=4, qtypes=["coarse", "yesno"])} == {"coarse", "yesno"}


def test_shipped_demo_model_reloads_offline_and_answers():
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(WEIGHTS)
    processor = LlavaProcessor.from_pretrained(WEIGHTS)
    assert model.dtype == torch.float32
    assert processor.num_additional_image_tokens == 1 and processor.patch_size == 16
    meta = json.loads((WEIGHTS / "recipe.json").read_text())
    assert meta["metrics"]["oracle/fine"] > meta["metrics"]["scene/fine"] + 0.3
    question = W.COARSE_TEMPLATES["colour"]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{question} ASSISTANT:"
    right = 0
    samples = W.make_samples(12, seed=5)
    for s in samples:  # the object's colour is legible from the scene alone
        inputs = processor(text=prompt, images=s.image, return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_TOKENS
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        right += (
            processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            == s.attrs["colour"]
        )
    assert right >= 10, right
    # Stage-2 sequence: the crop's visual tokens right after the scene's.
    s = samples[0]
    two = processor(
        text=f"USER: <image><image>\n{s.question} ASSISTANT:",
        images=[s.image, s.image.crop(W.oracle_crop_box(s))],
        return_tensors="pt",
    )
    assert int((two["input_ids"] == model.config.image_token_id).sum()) == 2 * N_TOKENS
    assert model(**two).logits.shape[1] == two["input_ids"].shape[1]


def test_toy_label_layers_are_where_the_shipped_model_finds_the_target(tmp_path):
    """The demo's label layers follow a rule on the recipe's attention log, not a guess: the layers whose
    teacher map (the answer-predicting positions' attention) puts its top on the target in >= 80% of scenes;
    the shipped RPN was distilled from exactly those layers."""
    from sdrpn.toyworld.pipeline import TOY_LABELS, label_layers_from_recipe

    hits = json.loads((WEIGHTS / "recipe.json").read_text())["metrics"]["attention"]["fine"]["teacher"]["top1_hit"]
    chosen = {layer for layer, hit in enumerate(hits) if hit >= 0.8}
    assert chosen and set(TOY_LABELS.label_heads) == chosen
    assert all(heads is None for heads in TOY_LABELS.label_heads.values())
    rpn_config = json.loads((WEIGHTS.parent / "rpn" / "rpn_config.json").read_text())
    assert {int(layer) for layer in rpn_config["label_settings"]["label_heads"]} == chosen
    fake = {"metrics": {"attention": {"fine": {"teacher": {"top1_hit": [0.3, 0.7, 0.5]}}}}}
    (tmp_path / "recipe.json").write_text(json.dumps(fake))
    assert label_layers_from_recipe(tmp_path) == {1: None}  # none reaches 80%: the best layer alone


def test_recipe_probe_labels_follow_the_scene():
    """Stage a's per-patch labels: a scene's target tokens carry its colour, shape and 3 x 3 cell, the
    others "none"; a crop carries the mark where it is legible and no cell (its tokens are not at the
    scene's places)."""
    from sdrpn.toyworld import recipe as R

    for seed in W.sample_seeds(20, seed=2):
        scene = W.render_scene(seed)
        colour, shape, mark, where = R.patch_labels(scene, (0, 0, *scene.image.size), is_crop=False)
        held = R.target_tokens(scene.shape, scene.target_box, (0, 0, *scene.image.size))
        assert held.any() and (colour[held] == 1 + W.OBJECT_COLOURS.index(scene.colour)).all()
        assert set(where[held]) == {1 + R.WHERE_CELLS.index(scene.where)}
        assert set(where[~held]) <= {0, -100} and (mark == -100).all()
        box = W.oracle_crop_box(W.render_sample(seed))
        colour, shape, mark, where = R.patch_labels(scene, R.padded_square(box), is_crop=True)
        assert (where == -100).all()
        assert (mark == 1 + W.MARK_COLOURS.index(scene.mark)).any()
        assert (shape == 1 + W.SHAPES.index(scene.shape)).sum() >= 2  # the whole shape, over several tokens
    corners = ["top left", "top right", "bottom left", "bottom right"]
    assert R.WHERE_CELLS == [corners[0], "top", corners[1], "left", "centre", "right", corners[2], "bottom", corners[3]]


def test_the_shipped_qwen_toy_reads_marks_through_its_rpn_on_scenes_of_any_shape():
    """toy-qwen: a Qwen2.5-VL trained on the toy world; its RPN was distilled from the label layers its recipe
    log gives, and on a few wide and tall scenes SD-RPN reads marks the scene alone does not show."""
    from sdrpn.toyworld import pipeline, world

    adapter, network = pipeline.load_toy("toy-qwen")
    assert adapter.model.config.model_type == "qwen2_5_vl" and network.config.base_model == "toy-qwen"
    chosen = pipeline.label_layers_from_recipe(pipeline.toy_model_dir("toy-qwen"))
    assert {int(layer) for layer in network.config.label_settings["label_heads"]} == set(chosen)
    zoom = pipeline.make_zoom(adapter, network)
    samples = world.make_samples(12, 4242, qtypes="fine", aspects=world.ASPECTS)
    images, questions = [s.image for s in samples], [s.question for s in samples]
    grids = {r.geometry.grid_height * 100 + r.geometry.grid_width for r in zoom.ask_batch(images, questions)}
    assert len(grids) >= 3  # dynamic resolution: the grids follow the scenes' shapes
    zoomed = [r.answer == s.answer for r, s in zip(zoom.ask_batch(images, questions), samples)]
    plain = [r.answer == s.answer for r, s in zip(zoom.ask_batch(images, questions, method="base"), samples)]
    assert sum(zoomed) >= sum(plain) + 4, (sum(zoomed), sum(plain))
