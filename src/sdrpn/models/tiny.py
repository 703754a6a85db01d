"""Tiny LLaVA-architecture models built offline from configs.

They are real `LlavaForConditionalGeneration` models (CLIP vision tower + Llama text model) with a
word-level tokenizer, so every code path that serves `llava-hf/llava-1.5-7b-hf` runs on them in
seconds on a CPU. Tests use them randomly initialised; the toy world trains one from scratch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
CHAT_WORDS = ["USER", "ASSISTANT", ":", "\n", ".", ",", "?", "!", "'"]
# The LLaVA-1.5 conversation format, as a Jinja chat template, so the tiny processor formats prompts
# exactly as llava-hf checkpoints do ("USER: <image>\n{question} ASSISTANT:").
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA; defaults give a ~1M-parameter model that runs a forward in milliseconds."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 128
    max_positions: int = 512
    words: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer: no download, stable ids, `<image>` registered."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *CHAT_WORDS, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Whitespace()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llava(
    spec: TinyLlavaSpec | None = None, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Randomly initialised tiny LLaVA + its processor (CLS dropped, as llava-1.5 does)."""
    spec = spec or TinyLlavaSpec()
    tokenizer = build_word_tokenizer(spec.words)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    image_processor = CLIPImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=False,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor
