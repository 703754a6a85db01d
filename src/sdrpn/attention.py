"""Capture of the few attention rows SD-RPN needs, without eager seq x seq maps.

An attention function registered through transformers' `AttentionInterface` delegates every layer's
output to sdpa, with sdpa's masks; on the selected layers only, it also computes the softmax row of the newest query
token against all keys and keeps the columns of the visual tokens. During greedy decoding the newest
query is, step by step, the token that predicts each response token (the last prompt token first),
so the mean of the kept rows is the paper's response-to-image RoI map.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sdrpn.models.base import FamilyAdapter, LayerHeads, PromptBatch

CAPTURE_IMPLEMENTATION = "sdrpn_capture"


class RowRecorder:
    """Keeps, per forward call, the head-averaged attention of the last query to the visual tokens
    (`per_head`: every head's row, for ranking heads)."""

    def __init__(self, heads: list[int] | None, visual_positions: torch.Tensor, per_head: bool = False):
        self.heads = heads
        self.visual_positions = visual_positions
        self.per_head = per_head
        self.rows: list[torch.Tensor] = []  # each (B, N_max), or (B, H, N_max) per head

    def record(self, query, key, attention_mask, scaling: float) -> None:
        last_query = query[:, :, -1:, :].float()  # (B, H, 1, D)
        keys = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # GQA: repeat kv heads
        scores = (last_query @ keys.transpose(-1, -2)) * scaling  # (B, H, 1, S)
        if attention_mask is not None:
            mask = attention_mask[:, :, -1:, : keys.shape[-2]]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.float()
        probs = scores.softmax(-1)[:, :, 0]  # (B, H, S)
        if self.heads is not None:
            probs = probs[:, self.heads]
        positions = self.visual_positions.to(probs.device)
        if self.per_head:
            self.rows.append(probs.gather(2, positions[:, None, :].expand(-1, probs.shape[1], -1)))
        else:
            self.rows.append(probs.mean(1).gather(1, positions))

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.rows, dim=1)  # (B, steps, N_v), or (B, steps, H, N_v) per head


def _capturing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    output = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    recorder = getattr(module, "_sdrpn_recorder", None)
    if recorder is not None:
        recorder.record(query, key, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return output


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_attention)
# sdpa's own masks, so every layer keeps the fast path (None when nothing is masked: the last query, causal or not,
# then sees every key); only the recording layers compute one extra row.
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@contextmanager
def capture_rows(
    adapter: FamilyAdapter, layer_heads: LayerHeads, visual_positions: torch.Tensor, per_head: bool = False
) -> Iterator[dict]:
    """Inside the block, every forward of the adapter's model records rows at `layer_heads`."""
    recorders = {layer: RowRecorder(heads, visual_positions, per_head) for layer, heads in layer_heads.items()}
    modules = [adapter.attention_module(adapter.decoder_layers[layer]) for layer in recorders]
    with ExitStack() as stack:
        stack.enter_context(adapter.text_attention(CAPTURE_IMPLEMENTATION))
        for module, recorder in zip(modules, recorders.values()):
            module._sdrpn_recorder = recorder
            stack.callback(delattr, module, "_sdrpn_recorder")
        yield recorders


@contextmanager
def capture_hidden_norms(adapter: FamilyAdapter, layer: int, visual_positions: torch.Tensor) -> Iterator[list]:
    """L2 norms (B, N_v) of the visual tokens' hidden states entering decoder layer `layer`, from the
    prompt pass (sink tokens are the ones with outlying norms)."""
    captured: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not captured and hidden.shape[1] > 1:
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
            captured.append(hidden[rows, visual_positions.to(hidden.device)].float().norm(dim=-1))

    handle = adapter.decoder_layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


@dataclass
class TeacherOutput:
    """What the frozen MLLM says and where it looked while saying it; maps are per sample, on its own grid."""

    answers: list[str]
    token_ids: torch.Tensor  # (B, L) generated ids
    response_lengths: torch.Tensor  # (B,) steps until (and including) EOS
    roi_maps: list[torch.Tensor]  # (H_i, W_i) mean over layers, heads and response tokens
    norms: list[torch.Tensor] | None  # (H_i, W_i) visual hidden-state norms at the norm layer
    sink_maps: list[torch.Tensor] | None  # (H_i, W_i) attention of the sink heads (released code's sink rule)


def response_lengths(token_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Number of decoding steps each sample really used: up to and including its first EOS."""
    is_eos = torch.isin(token_ids, torch.tensor(eos_ids, device=token_ids.device))
    first = torch.where(
        is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], token_ids.shape[1], dtype=torch.long)
    )
    return first.long()


QUERIES = ("answer", "prompt+answer")
HEAD_WEIGHTINGS = ("head", "layer")


def _mean_over_steps(
    recorders: list[RowRecorder], lengths: torch.Tensor, num_heads: int, queries: str, weighting: str
) -> torch.Tensor:
    """Average the recorded rows over layers/heads and over the query steps.

    Step 0 is the prefill row (the last prompt token, which predicts the first answer token); step i >= 1 is the
    row of the i-th generated token fed back. `queries="answer"` (the released code) keeps only the generated
    tokens, and EOS, never fed back, is never a query; "prompt+answer" also keeps the prefill row. `weighting=
    "head"` gives every listed (layer, head) equal weight (released), "layer" every layer."""

    def weight(recorder: RowRecorder) -> int:
        if weighting == "layer":
            return 1
        return num_heads if recorder.heads is None else len(recorder.heads)

    weights = torch.tensor([weight(r) for r in recorders], dtype=torch.float32)
    stacked = torch.stack([r.stacked() for r in recorders])  # (layers, B, steps, N) or (layers, B, steps, H, N)
    weights = weights.to(stacked.device).reshape(-1, *([1] * (stacked.ndim - 1)))
    rows = (stacked * weights).sum(0) / weights.sum()
    steps = torch.arange(rows.shape[1], device=rows.device)[None, :]
    active = steps < lengths.to(rows.device)[:, None]
    if queries == "answer":
        active &= steps >= 1
    active = active.float().reshape(*active.shape, *([1] * (rows.ndim - 2)))  # per-head rows: (B, steps, H, N)
    return (rows * active).sum(1) / active.sum(1).clamp(min=1)


class ForcedAnswers(LogitsProcessor):
    """Greedy decoding that can only choose each sample's given next token (its last one, EOS, repeats)."""

    def __init__(self, answers: list[list[int]]):
        self.answers = answers

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1]  # generation from embeddings: input_ids holds the new tokens only
        chosen = torch.tensor([a[min(step, len(a) - 1)] for a in self.answers], device=scores.device)
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(chosen), device=scores.device), chosen] = 0.0
        return forced


@torch.no_grad()
def teacher_attention(
    adapter: FamilyAdapter,
    batch: PromptBatch,
    label_heads: LayerHeads,
    *,
    max_new_tokens: int = 128,
    norm_layer: int | None = None,
    sink_heads: LayerHeads | None = None,
    queries: str = "answer",
    head_weighting: str = "head",
    forced_answers: list[list[int]] | None = None,
) -> TeacherOutput:
    """Greedy-decode the model's own answer and average its response-to-image attention (paper 3.1).

    `forced_answers` (token ids per sample, ending with EOS) makes the model say those instead: the paper's
    ablation that takes labels from the dataset's answers rather than the model's own."""
    layers = dict(label_heads)
    for layer, heads in (sink_heads or {}).items():
        if layer in layers and layers[layer] != heads:
            raise ValueError(f"layer {layer} is both a label layer and a sink layer with other heads")
    all_heads = {**layers, **(sink_heads or {})}
    with ExitStack() as stack:
        recorders = stack.enter_context(capture_rows(adapter, all_heads, batch.visual_positions))
        norms = None
        if norm_layer is not None:
            norms = stack.enter_context(capture_hidden_norms(adapter, norm_layer, batch.visual_positions))
        steer = LogitsProcessorList([ForcedAnswers(forced_answers)]) if forced_answers is not None else None
        token_ids = adapter.generate(batch, max_new_tokens=max_new_tokens, logits_processor=steer)
    lengths = response_lengths(token_ids, adapter.eos_token_ids)
    if queries not in QUERIES or head_weighting not in HEAD_WEIGHTINGS:
        raise ValueError(f"queries must be one of {QUERIES} and head_weighting one of {HEAD_WEIGHTINGS}")
    heads = adapter.attention_shape.num_heads
    roi = _mean_over_steps([recorders[layer] for layer in label_heads], lengths, heads, queries, head_weighting)
    sinks = None
    if sink_heads:
        sinks = _mean_over_steps([recorders[layer] for layer in sink_heads], lengths, heads, queries, head_weighting)
    return TeacherOutput(
        answers=adapter.decode(token_ids),
        token_ids=token_ids,
        response_lengths=lengths,
        roi_maps=batch.per_sample(roi),
        norms=batch.per_sample(norms[0]) if norms else None,
        sink_maps=batch.per_sample(sinks) if sinks is not None else None,
    )


@torch.no_grad()
def prompt_attention(adapter: FamilyAdapter, batch: PromptBatch, layer_heads: LayerHeads) -> list[torch.Tensor]:
    """Attention (H_i, W_i) of each sample's last prompt token to its image, from one prompt pass (ViCrop's)."""
    with capture_rows(adapter, layer_heads, batch.visual_positions) as recorders:
        embeds = adapter.input_embeddings(batch)
        adapter.run_layers(embeds, batch, list(adapter.decoder_layers)[: max(layer_heads) + 1])
    rows = torch.stack([r.stacked()[:, -1] for r in recorders.values()]).mean(0)
    return batch.per_sample(rows)


@torch.no_grad()
def prompts_attention(
    adapter: FamilyAdapter, batches: list[PromptBatch], layer_heads: LayerHeads
) -> list[list[torch.Tensor]]:
    """`prompt_attention` of several prompts about the same images (ViCrop's question and generic prompts), per
    prompt: the adapter runs the [system, image] prefix they share once, and only the recording layers compute a
    row."""
    captured: list[dict[int, RowRecorder]] = []

    @contextmanager
    def recording(visual_positions: torch.Tensor) -> Iterator[None]:
        with capture_rows(adapter, layer_heads, visual_positions) as recorders:
            captured.append(recorders)
            yield

    adapter.run_prompts_sharing_prefix(batches, max(layer_heads) + 1, recording)
    rows = torch.cat([torch.stack([r.stacked()[:, -1] for r in recorders.values()]).mean(0) for recorders in captured])
    size = batches[0].size
    return [batch.per_sample(rows[k * size : (k + 1) * size]) for k, batch in enumerate(batches)]
