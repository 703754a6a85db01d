"""Pins the RPN's construction from the base model's layers, its logits, and its checkpoint binding."""

from __future__ import annotations

import pytest
import torch

from sdrpn.errors import SdrpnError
from sdrpn.models import wrap_model
from sdrpn.models.tiny import TinyLlavaSpec, build_tiny_llava
from sdrpn.rpn import RegionProposalNetwork, load_rpn, read_rpn_config
from tests.conftest import QUESTIONS, WORDS, random_images


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


def test_initial_logits_are_the_last_layers_attention_logits(adapter):
    """At initialisation the RPN's map is layer B+R-1's (RoPE-free) q.k/sqrt(d), averaged over heads."""
    batch = adapter.prepare(random_images(2), [[QUESTIONS[0]], [QUESTIONS[2]]])
    rpn = RegionProposalNetwork(adapter, 1, 2)
    logits, mask = rpn(batch)
    assert logits.shape == (2, 1, 16) and bool(mask.all())
    with torch.no_grad():
        hidden = adapter.model.model(
            **batch.inputs, position_ids=batch.position_ids, output_hidden_states=True
        ).hidden_states[2]
    layer = adapter.decoder_layers[2]
    normed = layer.input_layernorm(hidden)
    shape = adapter.attention_shape
    for row in range(2):
        q = layer.self_attn.q_proj(normed[row, batch.query_positions[row][-1]]).view(shape.num_heads, -1)
        k = layer.self_attn.k_proj(normed[row, batch.visual_positions[row]]).view(16, shape.num_kv_heads, -1)
        expected = torch.einsum("hd,nhd->hn", q, k).mean(0) / shape.head_dim**0.5
        torch.testing.assert_close(logits[row, 0], expected, atol=1e-5, rtol=1e-5)


def test_one_map_per_user_turn(adapter):
    conversation = [QUESTIONS[0], "red", QUESTIONS[1]]
    batch = adapter.prepare(random_images(2), [conversation, [QUESTIONS[2]]])
    assert len(batch.query_positions[0]) == 2 and batch.query_positions[0][0] < batch.query_positions[0][1]
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch.inputs["input_ids"][0])
    first, second = batch.query_positions[0]
    assert tokens[first - 1 : first + 2] == ["ASSISTANT", ":", "red"]  # the token right before each answer
    assert tokens[second - 1 :] == ["ASSISTANT", ":"]
    logits, mask = RegionProposalNetwork(adapter, 2, 2)(batch)
    assert logits.shape == (2, 2, 16)
    assert mask.tolist() == [[True, True], [True, False]]


def test_checkpoint_round_trip(adapter, tmp_path):
    rpn = RegionProposalNetwork(adapter, 2, 3)
    with torch.no_grad():
        rpn.q_proj.weight.add_(0.1)
    rpn.save(tmp_path / "rpn")
    config = read_rpn_config(tmp_path / "rpn")
    assert (config.frozen_layers, config.rpn_layers, config.base_model) == (2, 3, "tiny-llava")
    loaded = load_rpn(tmp_path / "rpn", adapter)
    for (name, a), (_, b) in zip(rpn.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = adapter.prepare(random_images(1), [[QUESTIONS[0]]])
    torch.testing.assert_close(rpn(batch)[0], loaded(batch)[0])


def test_checkpoint_refuses_another_base_model(adapter, tmp_path):
    RegionProposalNetwork(adapter, 2, 3).save(tmp_path / "rpn")
    other_model, other_processor = build_tiny_llava(TinyLlavaSpec(words=WORDS), seed=7)
    other = wrap_model(other_model, other_processor, "other")
    with pytest.raises(SdrpnError, match="was trained for base model 'tiny-llava'"):
        load_rpn(tmp_path / "rpn", other)
    wider, wider_processor = build_tiny_llava(TinyLlavaSpec(words=WORDS, text_hidden=96), seed=1)
    with pytest.raises(SdrpnError, match="trained for base model"):
        load_rpn(tmp_path / "rpn", wrap_model(wider, wider_processor, "wider"))
    assert load_rpn(tmp_path / "rpn", other, allow_other_base=True) is not None


def test_bad_depth_and_bad_folder(adapter, tmp_path):
    with pytest.raises(SdrpnError, match="do not fit"):
        RegionProposalNetwork(adapter, 5, 3)
    with pytest.raises(SdrpnError, match="not an RPN checkpoint"):
        load_rpn(tmp_path, adapter)
