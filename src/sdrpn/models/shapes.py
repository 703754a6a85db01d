"""Randomly initialised models with a real 7B checkpoint's depth, heads and visual-token count, built offline.

Speed depends on shapes, not weights: these models run every code path of `llava-hf/llava-1.5-7b-hf` and
`Qwen/Qwen2.5-VL-7B-Instruct` with the same number of layers, heads and visual tokens, at a width reduced so
that a CPU run is compute-bound and takes seconds. The vocabulary is the toy world's (a few dozen words), so the
output head costs little, as the 32K-word head of a 4096-wide 7B model does (about 2% of its FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdrpn.errors import SdrpnError
from sdrpn.models.tiny import TinyLlavaSpec, TinyQwenSpec, build_tiny_llava, build_tiny_qwen


@dataclass(frozen=True)
class ModelShape:
    name: str
    description: str  # what is the checkpoint's and what is reduced (docs/benchmarks.md prints it)
    checkpoint: str  # the real checkpoint it stands for, whose released settings (B, label heads) it takes


# LLaVA-1.5-7B: Vicuna-7B (32 layers, 32 heads, hidden 4096, MLP 11008) after CLIP ViT-L/14 at 336 px (24 layers,
# 16 heads, 576 tokens). Widths / 8 (text), / 8 (vision); the MLP keeps its 2.6875 ratio.
LLAVA_7B_SHAPE = TinyLlavaSpec(
    image_size=336,
    patch_size=14,
    vision_hidden=128,
    vision_layers=24,
    vision_heads=16,
    text_hidden=512,
    text_layers=32,
    text_heads=32,
    text_kv_heads=32,
    text_intermediate=1376,
    max_positions=4096,
)

# Qwen2.5-VL-7B: 28 layers, 28 heads, 4 KV heads, hidden 3584 (head 128), MLP 18944; vision 32 blocks (full
# attention at 7, 15, 23, 31), 16 heads, window 112 px; 576 merged tokens for a square image at the released
# budget (672 x 672 px). Text head 16 (hidden 448), vision hidden 128.
QWEN_7B_SHAPE = TinyQwenSpec(
    text_layers=28,
    text_heads=28,
    text_kv_heads=4,
    text_hidden=448,
    text_intermediate=2368,
    vision_hidden=128,
    vision_heads=16,
    vision_depth=32,
    fullatt_block_indexes=(7, 15, 23, 31),
    window_size=112,
    min_pixels=576 * 28 * 28,
    max_pixels=576 * 28 * 28,
    init_std=0.02,
)

SHAPES = {
    "llava7b-shape": ModelShape(
        "llava7b-shape",
        "LLaVA-1.5-7B's depth and heads (32 x 32, MHA), 576 visual tokens (CLIP 24 layers, 336 px, patch 14); "
        "text hidden 512 (head 16), MLP 1376; vision hidden 128",
        "llava-hf/llava-1.5-7b-hf",
    ),
    "qwen7b-shape": ModelShape(
        "qwen7b-shape",
        "Qwen2.5-VL-7B's depth and heads (28 layers, 28 heads, 4 KV heads), 576 visual tokens (672 px square; "
        "vision 32 blocks, window 112 px); text hidden 448 (head 16), MLP 2368; vision hidden 128",
        "Qwen/Qwen2.5-VL-7B-Instruct",
    ),
}


def build_shape_model(name: str, seed: int = 0):
    """(model, processor) of a named shape, randomly initialised (seeded)."""
    from sdrpn.toyworld.world import WORDS

    if name not in SHAPES:
        raise SdrpnError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    if name == "llava7b-shape":
        spec = TinyLlavaSpec(**{**LLAVA_7B_SHAPE.to_dict(), "words": list(WORDS)})
        return build_tiny_llava(spec, seed=seed)
    spec = TinyQwenSpec(**{**QWEN_7B_SHAPE.__dict__, "words": list(WORDS)})
    return build_tiny_qwen(spec, seed=seed)


def stand_in_defaults(name: str):
    """The released settings of the checkpoint a shape stands for (its width differs, so the config does not
    match the checkpoint's signature and the adapter would otherwise give generic defaults)."""
    from sdrpn.models.llava import LLAVA_CHECKPOINTS
    from sdrpn.models.qwen2_5_vl import QWEN_CHECKPOINTS

    if name not in SHAPES:
        raise SdrpnError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    known = {checkpoint.name: checkpoint.defaults for checkpoint in (*LLAVA_CHECKPOINTS, *QWEN_CHECKPOINTS)}
    return known[SHAPES[name].checkpoint]
