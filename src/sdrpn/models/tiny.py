"""Tiny models of the real architectures, built offline from configs.

They are real `LlavaForConditionalGeneration` (CLIP vision tower + Llama) and
`Qwen2_5_VLForConditionalGeneration` models with word-level tokenizers, so every code path that serves
`llava-hf/llava-1.5-7b-hf` or `Qwen/Qwen2.5-VL-3B-Instruct` runs on them in seconds on a CPU. Tests use them
randomly initialised; the toy world trains one from scratch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
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


# --- Qwen2.5-VL -------------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
QWEN_CHAT_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", ",", "?", "!", ":", "'"]
# The Qwen2.5-VL chat template without its video and tool branches: the default system prompt, and an image as
# <|vision_start|><|image_pad|><|vision_end|>, as the released checkpoints format it.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyQwenSpec:
    """Sizes of a tiny Qwen2.5-VL. The text layout is Qwen2.5-VL-3B's (36 layers, 16 heads, 2 KV heads, q/k/v
    biases, M-RoPE sections in its proportions) at a small width; the vision tower keeps window attention,
    14-px patches, temporal patches of 2 and the 2 x 2 merge. Images become 2 x 2 to 6 x 6 tokens by default."""

    text_layers: int = 36
    text_heads: int = 16
    text_kv_heads: int = 2
    text_hidden: int = 256
    text_intermediate: int = 512
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_depth: int = 4
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    window_size: int = 56  # pixels: 2 x 2 merged tokens per window
    min_pixels: int = 56 * 56
    max_pixels: int = 168 * 168
    init_std: float | None = 0.15  # weights and biases ~ N(0, std): a random model then answers differently per input
    words: list[str] = field(default_factory=list)


def _word_level(special: list[str], words: list[str]) -> Tokenizer:
    """A word-level backend whose special tokens are matched before pre-tokenisation ("<|im_start|>user" splits)
    and whose "\n" is an added token, so that the whitespace pre-tokenizer cannot drop it."""
    vocab: dict[str, int] = {}
    for token in [*special, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Whitespace()]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken("\n", special=False, normalized=False)])
    return backend


def build_qwen_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen's special tokens and chat template (no download)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_word_level(QWEN_SPECIAL_TOKENS, ["\n", *QWEN_CHAT_WORDS, *words]),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def random_model(model_class, config, seed: int, init_std: float | None):
    """A model of `config` in eval mode; with `init_std`, every weight matrix and bias ~ N(0, init_std), so that a
    random model answers differently per input (None: transformers' own initialisation)."""
    torch.manual_seed(seed)
    model = model_class._from_config(config)
    if init_std is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.ndim >= 2 or name.endswith(".bias"):
                    parameter.normal_(0.0, init_std)
    return model.eval()


def build_tiny_qwen(spec: TinyQwenSpec | None = None, seed: int = 0):
    """Randomly initialised tiny `Qwen2_5_VLForConditionalGeneration` + its image-only processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sdrpn.models.qwen2_5_vl import ImageOnlyQwenProcessor

    spec = spec or TinyQwenSpec()
    half = spec.text_hidden // spec.text_heads // 2
    spatial = max(1, half * 3 // 8)  # Qwen2.5-VL's [16, 24, 24] of 64, in proportion
    tokenizer = build_qwen_tokenizer(spec.words)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [half - 2 * spatial, spatial, spatial],
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_heads=spec.vision_heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=spec.window_size,
        fullatt_block_indexes=list(spec.fullatt_block_indexes),
        out_hidden_size=spec.text_hidden,
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = random_model(Qwen2_5_VLForConditionalGeneration, config, seed, spec.init_std)
    generation = model.generation_config
    generation.pad_token_id, generation.eos_token_id = ids["<|endoftext|>"], ids["<|im_end|>"]
    generation.bos_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    processor = ImageOnlyQwenProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    return model, processor


# --- DeepSeek-VL -------------------------------------------------------------------------------------

DEEPSEEK_SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>", "<unk>"]
DEEPSEEK_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
# DeepSeek-VL's conversation format ("deepseek" in its own code, as deepseek-community checkpoints template it): the
# system prompt, "User: <image_placeholder>{question}\n\n", "Assistant: {answer}<｜end▁of▁sentence｜>", and
# "Assistant:" to prompt an answer.
DEEPSEEK_CHAT_TEMPLATE = (
    "{{ '" + DEEPSEEK_SYSTEM + "' }}{{ '\\n\\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image_placeholder>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}Assistant: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<｜end▁of▁sentence｜>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class TinyDeepseekSpec:
    """Sizes of a tiny DeepSeek-VL. The layout is DeepSeek-VL-1.3B's (24 layers x 16 heads; SigLIP at 384 px with
    16-px patches = 24 x 24 = 576 visual tokens) at a small width. `hybrid` builds the 7B's class instead (30 layers
    x 32 heads, plus the SAM branch at 1024 px whose features are resampled onto the same 24 x 24 grid)."""

    hybrid: bool = False
    text_layers: int = 24
    text_heads: int = 16
    text_hidden: int = 64
    text_intermediate: int = 128
    image_size: int = 384
    patch_size: int = 16
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    high_res_size: int = 1024
    high_res_hidden: int = 16
    high_res_layers: int = 2
    high_res_channels: int = 8
    init_std: float | None = 0.15  # as TinyQwenSpec: a random model then answers differently per input
    words: list[str] = field(default_factory=list)

    @classmethod
    def seven_b(cls, **sizes) -> TinyDeepseekSpec:
        """DeepSeek-VL-7B's layout: the hybrid class, 30 layers x 32 heads. transformers' own initialisation: at
        std 0.15 its 30 wider layers saturate a random RPN's map to 0 or 1."""
        layout = {"hybrid": True, "text_layers": 30, "text_heads": 32, "text_hidden": 128, "init_std": None}
        return cls(**{**layout, **sizes})


def build_deepseek_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with DeepSeek-VL's special tokens, image placeholder and chat template (no download)."""
    chat_words = ["\n", "User", "Assistant", ":", *DEEPSEEK_SYSTEM.replace(".", " .").replace(",", " ,").split()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_word_level(DEEPSEEK_SPECIAL_TOKENS, [*chat_words, "?", "!", "'", *words]),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
        pad_token="<｜end▁of▁sentence｜>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_placeholder>"},
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = DEEPSEEK_CHAT_TEMPLATE
    return tokenizer


def build_tiny_deepseek(spec: TinyDeepseekSpec | None = None, seed: int = 0):
    """Randomly initialised tiny `DeepseekVLForConditionalGeneration` (or, with `spec.hybrid`,
    `DeepseekVLHybridForConditionalGeneration`) + its processor with the PIL image processor."""
    from transformers import (
        DeepseekVLConfig,
        DeepseekVLForConditionalGeneration,
        DeepseekVLHybridConfig,
        DeepseekVLHybridForConditionalGeneration,
        DeepseekVLHybridProcessor,
        DeepseekVLProcessor,
    )
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil,
    )

    spec = spec or TinyDeepseekSpec()
    tokenizer = build_deepseek_tokenizer(spec.words)
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    grid = spec.image_size // spec.patch_size
    image_token_id = tokenizer.convert_tokens_to_ids("<image_placeholder>")
    if spec.hybrid:
        high_res = dict(
            model_type="sam_vision_model",
            hidden_size=spec.high_res_hidden,
            mlp_dim=spec.high_res_hidden * 2,
            num_hidden_layers=spec.high_res_layers,
            num_attention_heads=1,
            image_size=spec.high_res_size,
            patch_size=spec.patch_size,
            output_channels=spec.high_res_channels,
            global_attn_indexes=[spec.high_res_layers - 1],  # the last layer attends globally, as SAM-B's 12th
            window_size=14,
        )
        config = DeepseekVLHybridConfig(
            text_config=text, vision_config=vision, high_res_vision_config=high_res, image_token_id=image_token_id
        )
        model_class, processor_class = DeepseekVLHybridForConditionalGeneration, DeepseekVLHybridProcessor
        image_processor = DeepseekVLHybridImageProcessorPil(
            size={"height": spec.image_size, "width": spec.image_size},
            high_res_size={"height": spec.high_res_size, "width": spec.high_res_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    else:
        config = DeepseekVLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id)
        model_class, processor_class = DeepseekVLForConditionalGeneration, DeepseekVLProcessor
        image_processor = DeepseekVLImageProcessorPil(
            size={"height": spec.image_size, "width": spec.image_size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5] * 3
        )
    model = random_model(model_class, config, seed, spec.init_std)
    generation = model.generation_config
    generation.pad_token_id, generation.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=DEEPSEEK_CHAT_TEMPLATE,
        num_image_tokens=grid * grid,
    )
    return model, processor
