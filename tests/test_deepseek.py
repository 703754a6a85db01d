"""DeepSeek-VL's own layout: the real input sizes (SigLIP 384 px = 24 x 24 tokens; the hybrid's SAM at 1024 px)
end to end through the CLI, the SAM branch's pixel values for images and crops, the processor's padding, known
checkpoints and a checkpoint folder without its processor files. The family tests (`adapter` fixture) cover the rest
on 6 x 6 grids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DeepseekVLConfig, DeepseekVLHybridConfig

from sdrpn.cli import main
from sdrpn.errors import SdrpnError
from sdrpn.models import load_model, wrap_model
from sdrpn.models.deepseek_vl import DeepseekVLAdapter, DeepseekVLHybridAdapter
from sdrpn.models.tiny import TinyDeepseekSpec, build_tiny_deepseek
from tests.conftest import QUESTIONS, WORDS, build_tiny, random_images

REAL_LAYOUTS = {
    "deepseek": (TinyDeepseekSpec(words=WORDS), 24, 16),
    "deepseek-hybrid": (TinyDeepseekSpec.seven_b(words=WORDS), 30, 32),
}


@pytest.fixture(scope="module", params=sorted(REAL_LAYOUTS))
def real_layout(request, tmp_path_factory):
    """(family, adapter, saved folder) of a tiny DeepSeek-VL with the real input sizes and depth x heads."""
    spec, _, _ = REAL_LAYOUTS[request.param]
    model, processor = build_tiny_deepseek(spec, seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return request.param, wrap_model(model, processor, str(folder)), folder


def test_the_real_layout_runs_label_train_and_ask(real_layout, tmp_path, capsys):
    family, adapter, folder = real_layout
    _, layers, heads = REAL_LAYOUTS[family]
    shape = adapter.attention_shape
    assert (shape.num_layers, shape.num_heads) == (layers, heads)
    batch = adapter.prepare(random_images(1, size=(120, 90)), [[QUESTIONS[0]]])
    assert batch.grids == [(24, 24)] and batch.visual_counts == [576]
    if family == "deepseek-hybrid":
        assert tuple(batch.inputs["high_res_pixel_values"].shape) == (1, 3, 1024, 1024)
    for index, image in enumerate(random_images(3, seed=5, size=(120, 90))):
        image.save(tmp_path / f"{index}.png")
    lines = [json.dumps({"image": f"{i}.png", "question": QUESTIONS[i]}) for i in range(3)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    label = ["label", "--model", str(folder), "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "l")]
    assert main([*label, "--max-new-tokens", "2"]) == 0
    assert "labelled 3" in capsys.readouterr().out
    train = ["train", "--model", str(folder), "--labels", str(tmp_path / "l"), "--out", str(tmp_path / "rpn")]
    assert main([*train, "--batch-size", "3", "--max-steps", "1"]) == 0
    defaults = adapter.defaults()
    assert f"B={defaults.frozen_layers}, R={defaults.rpn_layers}" in capsys.readouterr().out
    ask = ["ask", "--model", str(folder), "--rpn", str(tmp_path / "rpn"), "--image", str(tmp_path / "0.png")]
    assert main([*ask, "--question", "where ?", "--tau", "0.3", "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["grid"] == [24, 24] and (result["extra_tokens"] > 0) == bool(result["boxes"])


def test_an_image_smaller_than_the_sam_input_is_padded_as_the_processor_does(real_layout):
    family, adapter, _ = real_layout
    image = random_images(1, size=(30, 12))[0]
    batch = adapter.prepare([image], [[QUESTIONS[0]]])
    stock = adapter.processor.image_processor([image], return_tensors="pt")
    for key in ("pixel_values", "high_res_pixel_values") if family == "deepseek-hybrid" else ("pixel_values",):
        ours = batch.inputs[key][0]
        assert torch.equal(ours, stock[key][0].to(ours.dtype))
        side = ours.shape[-1]
        assert side == (1024 if key.startswith("high_res") else 384)
        # resized to the input's width, then centred on a square of the background colour
        assert torch.equal(ours[:, 0], ours[:, 0, :1].expand_as(ours[:, 0]))
        assert not torch.equal(ours[:, side // 2], ours[:, side // 2, :1].expand_as(ours[:, side // 2]))


def test_the_sam_branch_sees_the_image_and_every_crop_at_its_own_resolution():
    """Every image and crop reaches the hybrid's SAM tower at its 1024-px (here 256-px) input, and a crop's tokens
    are the stock model's own features of the processed crop (SigLIP and SAM fused)."""
    model, processor = build_tiny("deepseek-hybrid")
    adapter = wrap_model(model, processor, "tiny-deepseek-hybrid")
    side = model.config.high_res_vision_config.image_size
    seen = []
    high_res = model.model.get_high_res_image_features

    def record(pixel_values, **kwargs):
        seen.append(tuple(pixel_values.shape))
        return high_res(pixel_values, **kwargs)

    model.model.get_high_res_image_features = record
    try:
        images = random_images(2, size=(90, 60))
        adapter.input_embeddings(adapter.prepare(images, [[QUESTIONS[0]], [QUESTIONS[1]]]))
        crop = images[0].crop((10, 10, 50, 30))
        (tokens,), _ = adapter.encode_crops([crop])
        adapter.encode_crops([crop, crop], stretch=True)
    finally:
        del model.model.get_high_res_image_features
    assert seen == [(1, 3, side, side)] * 5
    with torch.no_grad():
        stock = model.model.get_image_features(**processor.image_processor([crop], return_tensors="pt"))
    torch.testing.assert_close(tokens.features, stock.pooler_output[0])


def test_real_checkpoints_are_recognised_by_their_config_with_middle_band_defaults():
    text = {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16}
    vision = {"image_size": 384, "patch_size": 16}
    small = DeepseekVLAdapter.recognise(DeepseekVLConfig(text_config=text, vision_config=vision))
    assert small is not None and small.name == "deepseek-community/deepseek-vl-1.3b-chat"
    assert small.defaults.label_heads == {layer: None for layer in range(6, 13)}
    assert (small.defaults.frozen_layers, small.defaults.rpn_layers) == (11, 3)
    text = {"hidden_size": 4096, "num_hidden_layers": 30, "num_attention_heads": 32}
    high_res = {"image_size": 1024, "patch_size": 16}
    config = DeepseekVLHybridConfig(text_config=text, vision_config=vision, high_res_vision_config=high_res)
    large = DeepseekVLHybridAdapter.recognise(config)
    assert large is not None and large.name == "deepseek-community/deepseek-vl-7b-chat"
    assert large.defaults.label_heads == {layer: None for layer in range(7, 16)}
    assert (large.defaults.frozen_layers, large.defaults.rpn_layers) == (14, 3)
    assert DeepseekVLAdapter.recognise(DeepseekVLConfig(text_config={**text, "num_hidden_layers": 12})) is None


@pytest.mark.parametrize("missing", ["processor_config.json", "tokenizer.json", "chat_template.jinja"])
def test_a_checkpoint_folder_without_its_processor_files_is_named_in_one_line(missing, tmp_path, capsys):
    model, processor = build_tiny("deepseek")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(SdrpnError, match=missing.replace(".", r"\.")):
        load_model(str(tmp_path))
    image = tmp_path / "scene.png"
    random_images(1)[0].save(image)
    capsys.readouterr()
    assert main(["ask", "--model", str(tmp_path), "--image", str(image), "--question", "where ?"]) == 2
    err = capsys.readouterr().err.strip()
    assert missing in err and "\n" not in err and "Traceback" not in err, err
