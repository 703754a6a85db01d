"""Pins what families bring: known checkpoints recognised by their config, their defaults, resolution options."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2_5_VLConfig

from sdrpn.errors import SdrpnError
from sdrpn.labeling import LabelSettings
from sdrpn.models import load_model, wrap_model
from sdrpn.models.llava import LlavaAdapter
from sdrpn.models.qwen2_5_vl import PAPER_PIXELS, Qwen2_5_VLAdapter
from sdrpn.roi import RoiSettings
from sdrpn.shipped import resolve, shipped_dir
from tests.conftest import build_tiny, random_images


def _qwen_config(layers: int, hidden: int, heads: int, kv_heads: int) -> Qwen2_5_VLConfig:
    """A config of a released Qwen2.5-VL size, as its config.json gives it (no weights needed)."""
    return Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
        },
        vision_config={"depth": 32, "hidden_size": 1280, "out_hidden_size": hidden},
    )


def _llava_config(layers: int, hidden: int, heads: int) -> LlavaConfig:
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_attention_heads=16)
    text = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)
    return LlavaConfig(vision_config=vision, text_config=text)


def test_released_checkpoints_are_recognised_by_config_not_folder_name():
    seven = Qwen2_5_VLAdapter.recognise(_qwen_config(28, 3584, 28, 4))
    three = Qwen2_5_VLAdapter.recognise(_qwen_config(36, 2048, 16, 2))
    assert (seven.name, three.name) == ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct")
    assert (seven.defaults.frozen_layers, seven.defaults.rpn_layers) == (16, 3)
    assert (three.defaults.frozen_layers, three.defaults.rpn_layers) == (21, 3)
    assert seven.defaults.label_heads == {16: [1, 7, 17], 19: [17, 20]}
    assert seven.defaults.sink_heads == {9: [4, 22]} and seven.defaults.sink_threshold == 1e-2
    assert seven.defaults.label_pixels == PAPER_PIXELS == 576 * 28 * 28
    assert Qwen2_5_VLAdapter.recognise(_qwen_config(36, 2048, 16, 4)) is None  # another shape: not the 3B
    llava = LlavaAdapter.recognise(_llava_config(32, 4096, 32))
    assert llava.name == "llava-hf/llava-1.5-7b-hf" and llava.defaults.label_heads == {14: [24, 13, 26]}
    assert LlavaAdapter.recognise(_llava_config(40, 5120, 40)).name == "llava-hf/llava-1.5-13b-hf"
    other_tower = _llava_config(32, 4096, 32)
    other_tower.vision_config.image_size = 224  # a 7B Vicuna behind another CLIP: not LLaVA-1.5-7B
    assert LlavaAdapter.recognise(other_tower) is None


def test_named_label_head_sets_bring_their_sink_heads():
    defaults = Qwen2_5_VLAdapter.recognise(_qwen_config(28, 3584, 28, 4)).defaults
    text_rich = defaults.with_head_set("text-rich")
    assert text_rich.label_heads == {22: [1, 4], 23: [6, 11]}
    assert text_rich.sink_heads is None and text_rich.sink_rule == "none"  # released: no sink heads for these
    natural = defaults.with_head_set("natural")
    assert natural.sink_heads == {9: [4, 22]} and natural.sink_rule == "attention"
    with pytest.raises(SdrpnError, match="unknown label head set 'charts'"):
        defaults.with_head_set("charts")


def test_a_tiny_model_gets_the_family_defaults_and_explicit_settings_override_them(adapter):
    layers = adapter.attention_shape.num_layers
    defaults = adapter.defaults()
    assert defaults.label_heads == {layer: None for layer in range(layers // 4, layers // 2 + 1)}
    assert (defaults.frozen_layers, defaults.rpn_layers) == (layers // 2 - 1, 3)
    resolved = LabelSettings(label_heads={3: [1]}, sink_rule="none").resolved(adapter)
    assert resolved.label_heads == {3: [1]} and resolved.sink_rule == "none"
    with pytest.raises(SdrpnError, match="unknown label head set 'natural'"):
        LabelSettings(label_heads="natural").resolved(adapter)  # an unknown checkpoint has no named sets


def test_qwen_resolution_options_set_the_grid_and_are_reported(tmp_path):
    model, processor = build_tiny("qwen")
    image = random_images(1, size=(400, 100))[0]
    small = wrap_model(model, processor, "tiny-qwen", min_pixels=28 * 28, max_pixels=4 * 28 * 28)
    large = wrap_model(model, processor, "tiny-qwen", min_pixels=28 * 28, max_pixels=16 * 28 * 28)
    small_grid = small.prepare([image], [["where ?"]]).grids[0]
    large_grid = large.prepare([image], [["where ?"]]).grids[0]
    assert small_grid[0] * small_grid[1] <= 4 < large_grid[0] * large_grid[1] <= 16
    assert large_grid[1] > large_grid[0]  # the aspect ratio is kept
    from sdrpn.infer import load

    result = load(large, max_new_tokens=2).ask(image, "where ?")
    assert result.to_json()["input_size"] == [large_grid[1] * 28, large_grid[0] * 28]
    assert large.prepare([image], [["where ?"]], training=True).grids[0] == (6, 6)  # labels: one square grid
    with pytest.raises(SdrpnError, match="min_pixels"):
        wrap_model(model, processor, "tiny-qwen", min_pixels=10 * 28 * 28, max_pixels=4 * 28 * 28)


def test_tiny_images_and_crops_are_grown_to_one_token():
    model, processor = build_tiny("qwen")
    adapter = wrap_model(model, processor, "tiny-qwen")
    from sdrpn.infer import load

    zoom = load(adapter, max_new_tokens=2)
    image = random_images(1, size=(12, 9))[0]
    (result,) = zoom.ask_with_boxes([image], ["where ?"], [[(2, 2, 5, 4)]])  # a 3 x 2 px crop
    assert result.extra_tokens >= 1 and result.geometry.grid_height >= 1


def test_llava_refuses_resolution_options(llava_adapter):
    with pytest.raises(SdrpnError, match="do not apply to LLaVA-1.5"):
        wrap_model(llava_adapter.model, llava_adapter.processor, "tiny-llava", max_pixels=1000)


def test_a_saved_qwen_reloads_offline_with_its_processor(model_dir, family, adapter):
    loaded = load_model(str(model_dir))
    assert type(loaded) is type(adapter)
    image = random_images(1, size=(70, 50))[0]
    mine = adapter.generate(adapter.prepare([image], [["where ?"]]), max_new_tokens=3)
    theirs = loaded.generate(loaded.prepare([image], [["where ?"]]), max_new_tokens=3)
    assert mine.tolist() == theirs.tolist()


def test_shipped_names_resolve_through_the_package():
    assert resolve("toy", "mllm") == str(shipped_dir("mllm", "toy"))
    assert json.loads((shipped_dir("mllm", "toy") / "config.json").read_text())["model_type"] == "llava"
    assert resolve("llava-hf/llava-1.5-7b-hf", "mllm") == "llava-hf/llava-1.5-7b-hf"


def test_load_takes_shipped_names_in_python_as_on_the_command_line():
    import sdrpn

    zoom = sdrpn.load(model="toy", rpn="toy", max_new_tokens=2)
    assert zoom.rpn is not None and zoom.settings.method == "sdrpn"
    assert zoom.rpn.config.base_model == "toy"
    assert isinstance(zoom.ask(random_images(1, size=(64, 48))[0], "what colour is the object ?").answer, str)


def test_task_presets_take_the_released_threshold_and_tau_overrides(adapter, family):
    from sdrpn.infer import load

    released = {"llava": {"docvqa": 0.1, "ocrbench": 0.05, "textvqa": 0.15}, "qwen": {"textvqa": 0.075}}
    for task, tau in released.get(family, {}).items():  # DeepSeek-VL: no thresholds were released
        assert load(adapter, task=task).settings.roi.tau == tau
    if adapter.defaults().task_tau:
        assert load(adapter, task="ocrbench", tau=0.3).settings.roi.tau == 0.3
    with pytest.raises(SdrpnError, match="unknown task 'mmmu'"):
        load(adapter, task="mmmu")
    if family == "llava":  # every LLaVA-1.5 takes the released stage-1 rule by default
        assert adapter.defaults().roi == RoiSettings.released()


def test_llava_prompts_as_the_released_evaluation_and_an_rpn_keeps_its_prompt(llava_adapter, tmp_path):
    from sdrpn.models.llava import VICUNA_SYSTEM
    from sdrpn.rpn import RegionProposalNetwork, load_rpn

    vicuna = wrap_model(llava_adapter.model, llava_adapter.processor, "tiny-llava", prompt_style="vicuna_v1")
    conversation = ["what colour is the object ?", "red", "where is the square ?"]
    assert vicuna._prompt(conversation, 3) == (
        f"{VICUNA_SYSTEM} USER: <image>\nwhat colour is the object ? ASSISTANT: red</s> USER: where is the square ?"
        " ASSISTANT:"
    )
    batch = vicuna.prepare(random_images(1), [conversation])
    tokens = vicuna.tokenizer.convert_ids_to_tokens(batch.inputs["input_ids"][0])
    first, second = batch.query_positions[0]
    assert tokens[first - 1 : first + 2] == ["ASSISTANT", ":", "red"] and tokens[second - 1 :] == ["ASSISTANT", ":"]
    assert llava_adapter._prompt(conversation, 1).startswith("USER:")  # the chat template: no system prompt
    RegionProposalNetwork(vicuna, 2, 2).save(tmp_path / "rpn")
    assert json.loads((tmp_path / "rpn" / "rpn_config.json").read_text())["prompt_style"] == "vicuna_v1"
    other = wrap_model(llava_adapter.model, llava_adapter.processor, "tiny-llava")
    load_rpn(tmp_path / "rpn", other)
    assert other.prompt_style == "vicuna_v1"  # answers are prompted as the RPN was trained
    model, processor = build_tiny("qwen")
    with pytest.raises(SdrpnError, match="not 'vicuna_v1'"):
        wrap_model(model, processor, "tiny-qwen", prompt_style="vicuna_v1")


def test_the_api_refuses_a_device_that_cannot_hold_the_model_before_loading():
    import torch

    cases = [("gpu7", "not a device"), ("meta", "holds no weights")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "CUDA is not available"))
    for device, message in cases:
        with pytest.raises(SdrpnError, match=message):
            load_model("toy", device=device)
