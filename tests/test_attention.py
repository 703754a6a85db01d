"""Pins the attention capture against eager `output_attentions`, and the first-N-layers forward."""

from __future__ import annotations

import pytest
import torch

from sdrpn.attention import prompt_attention, teacher_attention
from tests.conftest import QUESTIONS, extended_inputs, random_images

LAYERS = {2: None, 3: [0, 2]}


def _eager_reference(adapter, image, question, generated, layers, norm_layer, queries, weighting):
    """The same quantity from full eager attention maps on [prompt + response], written the released code's way:
    the rows of the generated tokens fed back (for "prompt+answer" also the last prompt token's), each listed head
    weighing the same (or, for "layer", each layer)."""
    single = adapter.prepare([image], [[question]])
    prompt_length = single.inputs["input_ids"].shape[1]
    model = adapter.model
    model.set_attn_implementation("eager")
    try:
        out = model(
            **extended_inputs(single.inputs, generated[None, :-1]), output_attentions=True, output_hidden_states=True
        )
    finally:
        model.set_attn_implementation("sdpa")
    visual = single.visual_positions[0]
    first = prompt_length if queries == "answer" else prompt_length - 1
    last = prompt_length - 1 + len(generated)  # the row that predicts the last generated token (EOS)
    per_head, per_layer = [], []
    for layer, heads in layers.items():
        attention = out.attentions[layer][0]  # (H, T, S)
        attention = attention[heads] if heads else attention
        rows = attention[:, first:last][:, :, visual].mean(1)  # (heads, N): mean over the query rows
        per_head.append(rows)
        per_layer.append(rows.mean(0))
    mean = torch.cat(per_head).mean(0) if weighting == "head" else torch.stack(per_layer).mean(0)
    norms = out.hidden_states[norm_layer][0, visual].norm(dim=-1)
    return mean.view(*single.grids[0]), norms.view(*single.grids[0])


@pytest.mark.parametrize("queries, weighting", [("answer", "head"), ("prompt+answer", "layer")])
def test_teacher_capture_equals_eager_attention(adapter, queries, weighting):
    images = random_images(2, seed=5)
    batch = adapter.prepare(images, [[QUESTIONS[0]], [QUESTIONS[2]]])  # different lengths: left padding
    output = teacher_attention(
        adapter, batch, LAYERS, max_new_tokens=5, norm_layer=2, queries=queries, head_weighting=weighting
    )
    assert [tuple(m.shape) for m in output.roi_maps] == batch.grids
    for index, question in enumerate([QUESTIONS[0], QUESTIONS[2]]):
        steps = int(output.response_lengths[index])
        assert steps >= 2, "an answer of one token would leave the released queries empty"
        generated = output.token_ids[index, :steps]
        reference, norms = _eager_reference(adapter, images[index], question, generated, LAYERS, 2, queries, weighting)
        torch.testing.assert_close(output.roi_maps[index], reference, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(output.norms[index], norms, atol=1e-5, rtol=1e-5)


def test_capture_leaves_the_model_unchanged(adapter):
    batch = adapter.prepare(random_images(1), [[QUESTIONS[1]]])
    before = adapter.generate(batch, max_new_tokens=4)
    teacher_attention(adapter, batch, LAYERS, max_new_tokens=4)
    assert adapter.model.config.text_config._attn_implementation == "sdpa"
    assert not any(hasattr(adapter.attention_module(layer), "_sdrpn_recorder") for layer in adapter.decoder_layers)
    assert torch.equal(adapter.generate(batch, max_new_tokens=4), before)


def test_prompt_attention_is_a_distribution_over_part_of_the_sequence(adapter):
    batch = adapter.prepare(random_images(2), [[QUESTIONS[0]], [QUESTIONS[1]]])
    maps = prompt_attention(adapter, batch, {1: None})
    assert [tuple(m.shape) for m in maps] == batch.grids
    assert all(bool((m > 0).all()) and float(m.sum()) < 1 for m in maps)


def test_first_layers_equal_full_forward_hidden_states(adapter):
    batch = adapter.prepare(random_images(2), [[QUESTIONS[0]], [QUESTIONS[2]]])
    with torch.no_grad():
        embeds = adapter.input_embeddings(batch)  # the same image tokens for both (a vision tower may vary by batch)
        mask = batch.inputs["attention_mask"]
        full = adapter.model.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=batch.position_ids, output_hidden_states=True
        )
        for layers in (1, 3):
            prefix = adapter.prefix_hidden(batch, layers)
            torch.testing.assert_close(prefix, full.hidden_states[layers], atol=1e-6, rtol=1e-6)
        rest = adapter.run_layers(adapter.prefix_hidden(batch, 2), batch, list(adapter.decoder_layers)[2:4])
        torch.testing.assert_close(rest, full.hidden_states[4], atol=1e-5, rtol=1e-5)
    assert len(adapter.decoder_layers) == adapter.attention_shape.num_layers  # the swap is undone
