"""What the supported families share: a chat template, and a transformers text model at `model.model.language_model`
with decoder layers whose attention has `q_proj` / `k_proj` and an `input_layernorm` in front.

Family adapters subclass `StockLayoutAdapter` and add only what is theirs (image layout, positions, crops)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, DynamicCache

from sdrpn.errors import SdrpnError
from sdrpn.models.base import AnswerRow, AttentionShape, CropTokens, FamilyAdapter, PrefixState, PromptBatch


class StockLayoutAdapter(FamilyAdapter):
    """The shared half of an adapter; left padding, so batched decoding continues from every row's last token.

    `prompt_style` says how prompts are written: "chat_template" (the checkpoint's own template) or a style the
    family offers (`prompt_styles`); labels, the RPN and answers must all use one, so it is recorded with them."""

    prompt_styles: ClassVar[tuple[str, ...]] = ("chat_template",)

    def __init__(self, model: nn.Module, processor, name_or_path: str, prompt_style: str | None = None):
        super().__init__(model, processor, name_or_path)
        processor.tokenizer.padding_side = "left"
        self.prompt_style = prompt_style or self.defaults().prompt_style
        self.use_prompt_style(self.prompt_style)

    @classmethod
    def _load_parts(cls, name_or_path: str, model_class, processor_class, *, dtype, device, revision):
        """Model and processor of a checkpoint of this family (hub name at `revision`, or a folder), in eval mode."""
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        if config.model_type not in cls.model_types:
            raise SdrpnError(f"model '{name_or_path}' is a {config.model_type!r} model, not {cls.family}")
        model = model_class.from_pretrained(name_or_path, dtype=dtype or torch.float32, revision=revision)
        processor = processor_class.from_pretrained(name_or_path, revision=revision)
        if device:
            model.to(device)
        return model.eval(), processor

    def use_prompt_style(self, style: str) -> None:
        if style not in self.prompt_styles:
            raise SdrpnError(f"{self.family} prompts are written as one of {self.prompt_styles}, not {style!r}")
        self.prompt_style = style

    # --- prompts -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _messages(self, conversation: list[str], upto: int) -> list[dict]:
        messages = []
        for index, text in enumerate(conversation[:upto]):
            role = "user" if index % 2 == 0 else "assistant"
            content = [{"type": "text", "text": text}]
            if index == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": role, "content": content})
        return messages

    def _prompt(self, conversation: list[str], upto: int) -> str:
        return self.processor.apply_chat_template(self._messages(conversation, upto), add_generation_prompt=True)

    def _check_conversations(self, images: list, conversations: list[list[str]]) -> None:
        """Turns are user text: they may not hold the model's special tokens (an `<image>` would change the
        number of images, an end-of-turn token the conversation)."""
        if len(images) != len(conversations):
            raise SdrpnError(f"got {len(images)} images for {len(conversations)} conversations")
        special = {t for t in self.tokenizer.all_special_tokens if len(t) > 1}
        special |= {getattr(self.processor, name, None) for name in ("image_token", "video_token")} - {None}
        for conversation in conversations:
            if not conversation or len(conversation) % 2 == 0:
                raise SdrpnError("a conversation must alternate user/assistant turns and end with a user turn")
            if any(not text.strip() for text in conversation[::2]):
                raise SdrpnError("empty question")
            for text in conversation:
                found = sorted(token for token in special if token in text)
                if found:
                    raise SdrpnError(f"the text holds the model's special token {found[0]!r}; remove it")

    def _query_positions(
        self, conversations: list[list[str]], attention_mask: torch.Tensor, visual_counts: list[int]
    ) -> list[list[int]]:
        """Per sample, the last token of each user turn: earlier turns from the length of the prompt up to that
        turn (its one image placeholder expanded to the image's tokens, as the processor does), the last turn at
        the end of the left-padded row."""
        positions = []
        for row, conversation in enumerate(conversations):
            pad = int((attention_mask[row] == 0).sum())
            earlier = [
                pad + len(self.tokenizer(self._prompt(conversation, upto))["input_ids"]) + visual_counts[row] - 2
                for upto in range(1, len(conversation) - 1, 2)
            ]
            positions.append([*earlier, attention_mask.shape[1] - 1])
        return positions

    # --- layers --------------------------------------------------------------------------------
    @property
    def _language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self._language_model.layers

    @property
    def attention_shape(self) -> AttentionShape:
        text = self.model.config.text_config
        heads = text.num_attention_heads
        return AttentionShape(
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=text.num_key_value_heads or heads,
            head_dim=self.attention_module(self.decoder_layers[0]).head_dim,
            hidden_size=text.hidden_size,
        )

    @property
    def final_norm(self) -> nn.Module:
        """The text model's last norm (the released LLaVA RPN carries a trainable copy of it)."""
        return self._language_model.norm

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def qk_parts(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        return layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj

    def input_parameters(self, frozen_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Everything but the decoder layers from `frozen_layers` on, the final norm and the output head."""
        later = {id(p) for layer in list(self.decoder_layers)[frozen_layers:] for p in layer.parameters()}
        later |= {id(p) for p in self._language_model.norm.parameters()}
        later |= {id(p) for p in self.model.get_output_embeddings().parameters()}
        later -= {id(p) for p in self.model.get_input_embeddings().parameters()}  # tied embeddings stay in
        for name, parameter in sorted(self.model.named_parameters(), key=lambda item: item[0]):
            if id(parameter) not in later:
                yield name, parameter

    @contextmanager
    def _swapped_layers(self, layers: list[nn.Module]) -> Iterator[None]:
        """Run the stock forward over other layers and without the final norm (no modeling code copied)."""
        language_model = self._language_model
        saved = language_model.layers, language_model.norm
        language_model.layers, language_model.norm = nn.ModuleList(layers), nn.Identity()
        try:
            yield
        finally:
            language_model.layers, language_model.norm = saved

    def run_layers(self, hidden: torch.Tensor, batch: PromptBatch, layers: list[nn.Module], cache=None) -> torch.Tensor:
        """`cache` (a transformers Cache) keeps the layers' keys/values, under their own layer indices."""
        return self._run(hidden, batch.inputs["attention_mask"], batch.position_ids, layers, cache)

    def _run(self, hidden, attention_mask, position_ids, layers: list[nn.Module], cache=None) -> torch.Tensor:
        if not layers:
            return hidden
        with self._swapped_layers(layers):
            out = self._language_model(
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
            )
        return out.last_hidden_state

    @torch.no_grad()
    def prefix_state(self, batch: PromptBatch, num_layers: int) -> PrefixState:
        cache = DynamicCache(config=self.model.config)
        layers = list(self.decoder_layers)[:num_layers]
        batch.prefix = PrefixState(
            num_layers, self.run_layers(self.input_embeddings(batch), batch, layers, cache), cache
        )
        return batch.prefix

    @contextmanager
    def text_attention(self, implementation: str) -> Iterator[None]:
        text_config = self.model.config.text_config
        saved = text_config._attn_implementation
        text_config._attn_implementation = implementation
        try:
            yield
        finally:
            text_config._attn_implementation = saved

    @torch.no_grad()
    def run_prompts_sharing_prefix(
        self, batches: list[PromptBatch], num_layers: int, around_rest: Callable[[torch.Tensor], ContextManager]
    ) -> None:
        """Run the first `num_layers` layers over several prompts per sample (the same images, other texts): the
        leading tokens all of a sample's prompts share ([system, image]) once, then every prompt's rest, in one
        batch, on copies of their keys/values. `around_rest(visual_positions)` wraps the second run (e.g. to
        capture attention rows); the positions are the visual tokens' columns there, prompt after prompt."""
        size, count = batches[0].size, len(batches)
        rows = [self.answer_rows(batch, [[]] * size) for batch in batches]
        shared = [_common_prefix([prompt_rows[i] for prompt_rows in rows]) for i in range(size)]
        layers = list(self.decoder_layers)[:num_layers]
        embeds, attention_mask, positions = lay_out(
            [AnswerRow(row.embeds[:s], row.positions[..., :s], s) for row, s in zip(rows[0], shared)], shared
        )
        cache = DynamicCache(config=self.model.config)
        self._run(embeds, attention_mask, positions, layers, cache)
        width = max(shared)
        every = [row for prompt_rows in rows for row in prompt_rows]
        embeds, attention_mask, positions = lay_out(every, shared * count)
        copies = [
            (layer.keys.repeat(count, 1, 1, 1), layer.values.repeat(count, 1, 1, 1))
            if index < num_layers
            else (None, None)
            for index, layer in enumerate(cache.layers)
        ]
        visual = []
        for batch in batches:
            pads = batch.inputs["attention_mask"].shape[1] - batch.inputs["attention_mask"].sum(1)
            for i in range(size):
                column = batch.visual_positions[i] - pads[i]  # index in the unpadded row
                s, tail = shared[i], len(every[len(visual)].embeds)
                visual.append(torch.where(column < s, width - s + column, embeds.shape[1] - (tail - column)))
        with around_rest(torch.stack(visual)):
            self._run(
                embeds[:, width:],
                attention_mask,
                positions[..., width:],
                layers,
                DynamicCache(ddp_cache_data=copies, config=self.model.config),
            )

    # --- decoding ------------------------------------------------------------------------------
    def answer_rows(self, batch: PromptBatch, crops: list[list[CropTokens]]) -> list[AnswerRow]:
        """Each sample's stage-2 input with its crops inserted right after its image (the family's layout)."""
        raise NotImplementedError(f"{type(self).__name__} does not lay out stage 2")

    def generation_positions(self, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The position ids `generate` takes, from the laid-out positions (B, T) or (P, B, T)."""
        return positions

    def generate(
        self,
        batch: PromptBatch,
        crops: list[list[CropTokens]] | None = None,
        max_new_tokens: int = 128,
        logits_processor=None,
    ) -> torch.Tensor:
        """Greedy decoding of the family's stage-2 rows. When stage 1 kept its frozen layers' keys/values
        (`batch.prefix`), the tokens before each sample's crop are not computed again: their keys/values in
        those layers are stage 1's, their hidden states enter the remaining layers, and decoding continues."""
        rows = self.answer_rows(batch, crops or [[]] * batch.size)
        prefix, cache = batch.prefix, None
        if prefix is not None and prefix.cache is not None:
            shared = [min(row.shared, len(row.embeds) - 1) for row in rows]  # at least one token left to run
            embeds, attention_mask, positions = lay_out(rows, shared)
            cache = self._continue_prefix(batch, prefix, attention_mask, positions, shared)
        else:
            embeds, attention_mask, positions = lay_out(rows, [0] * len(rows))
        return self.model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=self.generation_positions(positions, attention_mask),
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            logits_processor=logits_processor,
        )

    @torch.no_grad()
    def _continue_prefix(
        self, batch: PromptBatch, prefix: PrefixState, attention_mask, positions, shared: list[int]
    ) -> DynamicCache:
        """A cache of every layer over the first `max(shared)` columns of the stage-2 layout: stage 1's keys/values
        for its layers, moved to where each row's shared tokens now lie, and the remaining layers run on stage 1's
        hidden states there."""
        width = max(shared)
        prompt_mask = batch.inputs["attention_mask"]
        source = torch.zeros(batch.size, width, dtype=torch.long, device=prompt_mask.device)
        for row, count in enumerate(shared):
            start = prompt_mask.shape[1] - int(prompt_mask[row].sum())
            source[row, width - count :] = torch.arange(start, start + count, device=source.device)

        offset = int(source[0, 0])
        in_place = bool((source == torch.arange(offset, offset + width, device=source.device)).all())

        def moved(values: torch.Tensor) -> torch.Tensor:  # (B, T, D) or (B, H, T, D) -> columns of the new layout
            if in_place:  # every row's shared tokens already lie in these columns (no padding moved): a view
                return values[..., offset : offset + width, :]
            index = source.to(values.device).view(batch.size, *[1] * (values.ndim - 3), width, 1)
            return values.gather(values.ndim - 2, index.expand(*values.shape[:-2], width, values.shape[-1]))

        cache = DynamicCache(config=self.model.config)
        later = list(self.decoder_layers)[prefix.layers :]
        self._run(moved(prefix.hidden), attention_mask[:, :width], positions[..., :width], later, cache)
        # stage 1's layers join after the run (the run reads the cache's length from layer 0), without a second copy
        # of the layers just computed
        for stage1, layer in zip(prefix.cache.layers[: prefix.layers], cache.layers):
            layer.update(moved(stage1.keys), moved(stage1.values))
        return cache

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _common_prefix(rows: list[AnswerRow]) -> int:
    """How many leading tokens (embeddings and positions) all rows share, leaving each at least one of its own."""
    limit = min(len(row.embeds) for row in rows) - 1
    same = torch.ones(limit, dtype=torch.bool, device=rows[0].embeds.device)
    for row in rows[1:]:
        same &= (row.embeds[:limit] == rows[0].embeds[:limit]).all(-1)
        same &= (row.positions[..., :limit] == rows[0].positions[..., :limit]).reshape(-1, limit).all(0)
    return int(same.long().cumprod(0).sum())


def lay_out(rows: list[AnswerRow], splits: list[int]):
    """A batch of rows, each in two parts at `splits`, each part left-padded to its longest: columns
    [pad, row[:s]] then [pad, row[s:]]. With all splits 0 it is plain left padding; otherwise every row's first
    part ends at one column, where a cache of those parts can end."""
    first = max(splits)
    second = max(len(row.embeds) - split for row, split in zip(rows, splits))
    length, template = first + second, rows[0]
    embeds = template.embeds.new_zeros(len(rows), length, template.embeds.shape[-1])
    positions = template.positions.new_zeros(*template.positions.shape[:-1], len(rows), length)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=template.embeds.device)
    for index, (row, split) in enumerate(zip(rows, splits)):
        tail = len(row.embeds) - split
        for begin, end, part in ((first - split, first, slice(0, split)), (length - tail, length, slice(split, None))):
            embeds[index, begin:end] = row.embeds[part]
            positions[..., index, begin:end] = row.positions[..., part]
            mask[index, begin:end] = 1
    return embeds, mask, positions
