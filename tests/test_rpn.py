"""Pins the RPN's construction from the base model's layers, its logits, and its checkpoint binding."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sdrpn.errors import SdrpnError
from sdrpn.models import FamilyAdapter, wrap_model
from sdrpn.rpn import RegionProposalNetwork, load_rpn, read_rpn_config
from tests.conftest import QUESTIONS, build_tiny, random_images


def test_initial_layers_equal_base_layers(adapter):
    rpn = RegionProposalNetwork(adapter, 2, 3)
    assert len(rpn.blocks) == 2
    for copy, original in zip(rpn.blocks, list(adapter.decoder_layers)[2:4]):
        for (name, mine), (_, theirs) in zip(copy.state_dict().items(), original.state_dict().items()):
            assert torch.equal(mine, theirs), name
    last = adapter.decoder_layers[4]
    assert torch.equal(rpn.q_proj.weight, last.self_attn.q_proj.weight)
    assert torch.equal(rpn.k_proj.weight, last.self_attn.k_proj.weight)
    assert torch.equal(rpn.head_norm.weight, last.input_layernorm.weight)
    assert rpn.q_proj.weight.data_ptr() != last.self_attn.q_proj.weight.data_ptr()  # a copy, not shared


_CAPTURED: dict = {}


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    if getattr(module, "_test_record", False):
        _CAPTURED["q"], _CAPTURED["k"] = query, key  # after the layer's positional rotation, before repeat_kv
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("test_record_qk", _recording_attention)
AttentionMaskInterface.register("test_record_qk", sdpa_mask)


def test_initial_logits_are_the_last_layers_attention_logits(adapter):
    """At initialisation the RPN's map is layer B+R-1's q.k/sqrt(d), averaged over heads: for LLaVA without RoPE
    (as the released models compare them), for Qwen2.5-VL exactly the layer's own post-M-RoPE logits."""
    batch = adapter.prepare(random_images(2, size=(90, 60)), [[QUESTIONS[0]], [QUESTIONS[2]]])
    rpn = RegionProposalNetwork(adapter, 1, 2, final_norm=False)
    logits, mask = rpn(batch)
    assert logits.shape == (2, 1, max(batch.visual_counts)) and bool(mask.all())
    layer = adapter.decoder_layers[2]
    shape = adapter.attention_shape
    attention = adapter.attention_module(layer)
    attention._test_record = True
    try:
        with torch.no_grad(), adapter.text_attention("test_record_qk"):
            hidden = adapter.model.model(
                **batch.inputs, position_ids=batch.position_ids, output_hidden_states=True
            ).hidden_states[2]
    finally:
        del attention._test_record
    for row in range(2):
        visual = batch.visual_positions[row, : batch.visual_counts[row]]
        query = batch.query_positions[row][-1]
        if type(adapter).position_qk is FamilyAdapter.position_qk:  # q and k compared without positions
            normed = layer.input_layernorm(hidden)
            q = layer.self_attn.q_proj(normed[row, query]).view(shape.num_heads, -1)
            k = layer.self_attn.k_proj(normed[row, visual]).view(len(visual), shape.num_kv_heads, -1)
            k = k.repeat_interleave(shape.num_heads // shape.num_kv_heads, dim=1)
            expected = torch.einsum("hd,nhd->hn", q, k).mean(0) / shape.head_dim**0.5
        else:
            q = _CAPTURED["q"][row, :, query]  # (H, D)
            k = _CAPTURED["k"][row][:, visual].repeat_interleave(shape.num_heads // shape.num_kv_heads, dim=0)
            expected = torch.einsum("hd,hnd->hn", q, k).mean(0) / shape.head_dim**0.5
        torch.testing.assert_close(logits[row, 0, : len(visual)], expected, atol=1e-4, rtol=1e-4)


def test_one_map_per_user_turn(adapter):
    conversation = [QUESTIONS[0], "red", QUESTIONS[1]]
    batch = adapter.prepare(random_images(2), [conversation, [QUESTIONS[2]]])
    assert len(batch.query_positions[0]) == 2 and batch.query_positions[0][0] < batch.query_positions[0][1]
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch.inputs["input_ids"][0])
    first, second = batch.query_positions[0]
    answer_prompt = tokens[second - 1 :]  # every prompt ends with its template's cue for an answer
    assert tokens[first - 1 : first + 2] == [*answer_prompt, "red"]  # the token right before each answer
    logits, mask = RegionProposalNetwork(adapter, 2, 2)(batch)
    assert logits.shape == (2, 2, max(batch.visual_counts))
    assert mask.tolist() == [[True, True], [True, False]]


def test_checkpoint_round_trip(adapter, tmp_path):
    rpn = RegionProposalNetwork(adapter, 2, 3)
    with torch.no_grad():
        rpn.q_proj.weight.add_(0.1)
    rpn.save(tmp_path / "rpn")
    config = read_rpn_config(tmp_path / "rpn")
    assert (config.frozen_layers, config.rpn_layers, config.base_model) == (2, 3, adapter.name_or_path)
    loaded = load_rpn(tmp_path / "rpn", adapter)
    for (name, a), (_, b) in zip(rpn.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = adapter.prepare(random_images(1), [[QUESTIONS[0]]])
    torch.testing.assert_close(rpn(batch)[0], loaded(batch)[0])


def test_checkpoint_refuses_another_base_model(adapter, family, tmp_path):
    RegionProposalNetwork(adapter, 2, 3).save(tmp_path / "rpn")
    other_model, other_processor = build_tiny(family, seed=7)
    other = wrap_model(other_model, other_processor, "other")
    with pytest.raises(SdrpnError, match=f"was trained for base model '{adapter.name_or_path}'"):
        load_rpn(tmp_path / "rpn", other)
    wider, wider_processor = build_tiny(family, text_hidden=adapter.attention_shape.hidden_size + 64)
    with pytest.raises(SdrpnError, match="trained for base model"):
        load_rpn(tmp_path / "rpn", wrap_model(wider, wider_processor, "wider"))
    assert load_rpn(tmp_path / "rpn", other, allow_other_base=True) is not None


def test_an_rpn_of_one_family_is_refused_by_the_other(adapter, family, llava_adapter, tmp_path):
    qwen_model, qwen_processor = build_tiny("qwen")
    qwen = wrap_model(qwen_model, qwen_processor, "tiny-qwen")
    mine, theirs = (llava_adapter, qwen) if family == "llava" else (qwen, llava_adapter)
    RegionProposalNetwork(mine, 2, 3).save(tmp_path / "rpn")
    with pytest.raises(SdrpnError, match="trained for base model"):
        load_rpn(tmp_path / "rpn", theirs)


def test_bad_depth_and_bad_folder(adapter, tmp_path):
    with pytest.raises(SdrpnError, match="do not fit"):
        RegionProposalNetwork(adapter, adapter.attention_shape.num_layers - 1, 3)
    with pytest.raises(SdrpnError, match="not an RPN checkpoint"):
        load_rpn(tmp_path, adapter)


def test_a_base_model_fine_tuned_where_the_rpn_reads_is_refused(adapter, family, tmp_path):
    """The binding covers every weight the RPN's input depends on, and only those."""
    RegionProposalNetwork(adapter, 2, 3).save(tmp_path / "rpn")
    model, processor = build_tiny(family)
    tuned = wrap_model(model, processor, "tuned")
    assert load_rpn(tmp_path / "rpn", tuned) is not None  # the same weights: accepted
    vision = next(p for n, p in model.named_parameters() if "vision" in n or "visual" in n)
    with torch.no_grad():
        list(tuned.decoder_layers)[-1].mlp.down_proj.weight.add_(0.5)  # after the RPN: its input is unchanged
    assert load_rpn(tmp_path / "rpn", tuned) is not None
    with torch.no_grad():
        vision.add_(0.05)  # a fine-tuned vision tower moves every box
    with pytest.raises(SdrpnError, match="trained for base model"):
        load_rpn(tmp_path / "rpn", tuned)


def test_an_rpn_of_an_older_digest_is_refused_with_the_reason(adapter, tmp_path):
    rpn = RegionProposalNetwork(adapter, 2, 3)
    rpn.config.weights_digest = "243ab1d31466732c"
    rpn.save(tmp_path / "rpn")
    with pytest.raises(SdrpnError, match="older sdrpn"):
        load_rpn(tmp_path / "rpn", adapter)


def test_the_released_llava_rpn_puts_a_copy_of_the_final_norm_in_front_of_its_head(llava_adapter, tmp_path):
    adapter = llava_adapter
    rpn = RegionProposalNetwork(adapter, 1, 2)  # the LLaVA-1.5 default, as released
    assert rpn.config.final_norm and torch.equal(rpn.final_norm.weight, adapter.final_norm.weight)
    assert rpn.final_norm.weight.data_ptr() != adapter.final_norm.weight.data_ptr()
    with torch.no_grad():
        rpn.final_norm.weight.mul_(1.7)  # trained: the copy moves, the model's norm does not
    batch = adapter.prepare(random_images(1, size=(90, 60)), [[QUESTIONS[0]]])
    logits, _ = rpn(batch)
    with torch.no_grad():
        hidden = adapter.model.model(**batch.inputs, position_ids=batch.position_ids, output_hidden_states=True)
    normed = rpn.head_norm(rpn.final_norm(hidden.hidden_states[2][0]))
    shape = adapter.attention_shape
    q = rpn.q_proj(normed[batch.query_positions[0][-1]]).view(shape.num_heads, -1)
    k = rpn.k_proj(normed[batch.visual_positions[0]]).view(-1, shape.num_kv_heads, shape.head_dim)
    expected = torch.einsum("hd,nhd->hn", q, k.repeat_interleave(shape.num_heads // shape.num_kv_heads, 1))
    torch.testing.assert_close(logits[0, 0], expected.mean(0) / shape.head_dim**0.5, atol=1e-5, rtol=1e-5)
    rpn.save(tmp_path / "rpn")
    loaded = load_rpn(tmp_path / "rpn", adapter)
    assert loaded.config.final_norm and torch.equal(loaded.final_norm.weight, rpn.final_norm.weight)
    assert RegionProposalNetwork(adapter, 1, 2, final_norm=False).final_norm is None
