"""DeepSeek-VL (`DeepseekVLForConditionalGeneration`, e.g. `deepseek-community/deepseek-vl-1.3b-chat`) and its
hybrid (`DeepseekVLHybridForConditionalGeneration`, `deepseek-community/deepseek-vl-7b-chat`), stock transformers.

Both see an image as DeepSeek-VL was trained: resized so that its long side fits the input and padded to a square
with the processor's background colour (the processor does both, so nothing is centre-cropped away), then one fixed
24 x 24 grid of visual tokens (SigLIP, 384 px / 16). The hybrid adds a high-resolution SAM branch (1024 px) whose
features are resampled onto the same grid and fused with SigLIP's token by token: its pixel values go with every
image and every crop. Like LLaVA-1.5 (a Llama LLM, 1-D positions, no image markers), a crop's tokens go right
after the image's, so the LLaVA adapter's layout serves; only loading, the processor's own padding and the
hybrid's second input differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import (
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridProcessor,
    DeepseekVLProcessor,
)

from sdrpn.errors import SdrpnError
from sdrpn.models.base import FamilyDefaults, KnownCheckpoint, middle_band
from sdrpn.models.llava import LlavaAdapter
from sdrpn.roi import RoiSettings

# What a checkpoint folder must hold besides config.json and weights: without them the processor cannot be built,
# and transformers' own error would be a traceback about a missing attribute.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def _signature(model_type: str, layers: int, hidden: int, heads: int, high_res: list[int] | None = None) -> dict:
    """DeepSeek-VL = SigLIP at 384 px / 16 (+ SAM at 1024 px / 16 for the hybrid) + a DeepSeek LLM of this size."""
    signature = {"model_type": model_type, "text": [layers, hidden, heads, heads], "vision": [384, 16]}
    if high_res is not None:
        signature["high_res_vision"] = high_res
    return signature


def _defaults(num_layers: int) -> FamilyDefaults:
    """The middle-band rule: no label heads or code were published for DeepSeek-VL. With it, the norm sink rule
    of the paper's text, and the released LLaVA-1.5 RoI rule and optimisation, made for the same 24 x 24 grid and
    Llama LLM. No final-norm copy in the RPN: its initial map is then exactly a layer's attention logits."""
    return middle_band(num_layers, roi=RoiSettings.released())


DEEPSEEK_CHECKPOINTS = (
    # the chat model and its base share one architecture, so one signature serves both
    KnownCheckpoint("deepseek-community/deepseek-vl-1.3b-chat", _signature("deepseek_vl", 24, 2048, 16), _defaults(24)),
)
DEEPSEEK_HYBRID_CHECKPOINTS = (
    KnownCheckpoint(
        "deepseek-community/deepseek-vl-7b-chat",
        _signature("deepseek_vl_hybrid", 30, 4096, 32, high_res=[1024, 16]),
        _defaults(30),
    ),
)


class DeepseekVLAdapter(LlavaAdapter):
    family = "DeepSeek-VL"
    prompt_styles = ("chat_template",)
    model_types = ("deepseek_vl",)
    known_checkpoints = DEEPSEEK_CHECKPOINTS
    model_class: type[nn.Module] = DeepseekVLForConditionalGeneration
    processor_class: type = DeepseekVLProcessor

    @classmethod
    def _load_parts(cls, name_or_path: str, model_class, processor_class, **options):
        """The stock loading, after checking that a local folder holds the processor's files."""
        _check_processor_files(name_or_path)
        model, processor = super()._load_parts(name_or_path, model_class, processor_class, **options)
        if processor.chat_template is None:
            raise SdrpnError(
                f"model '{name_or_path}' has no chat template (chat_template.jinja); {cls.family} needs it"
            )
        return model, processor

    # --- defaults ------------------------------------------------------------------------------
    @classmethod
    def config_signature(cls, config) -> dict:
        signature = super().config_signature(config)
        high_res = getattr(config, "high_res_vision_config", None)
        if high_res is not None:
            signature["high_res_vision"] = [high_res.image_size, high_res.patch_size]
        return signature

    def generic_defaults(self) -> FamilyDefaults:
        return _defaults(self.attention_shape.num_layers)

    # --- images --------------------------------------------------------------------------------
    def _squares(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images themselves: DeepSeek-VL's processor resizes the long side to its input, then pads to a
        square with its background colour (the order it was trained with), for the image and every crop."""
        return list(images)


class DeepseekVLHybridAdapter(DeepseekVLAdapter):
    """DeepSeek-VL-7B: the same layout, with SAM's high-resolution pixel values beside SigLIP's everywhere."""

    family = "DeepSeek-VL hybrid"
    model_types = ("deepseek_vl_hybrid",)
    known_checkpoints = DEEPSEEK_HYBRID_CHECKPOINTS
    model_class = DeepseekVLHybridForConditionalGeneration
    processor_class = DeepseekVLHybridProcessor

    @property
    def _stretch_side(self) -> int:
        """A stretched crop fills the SAM branch's input, so the high-resolution tower sees all its detail."""
        return self.model.config.high_res_vision_config.image_size

    def _image_features(self, pixels: dict) -> list[torch.Tensor]:
        """One image at a time: SAM's convolutions pick their kernels by batch size, which would make an image's
        tokens (and so its answer) depend on the batch it came in."""
        count = len(pixels["pixel_values"])
        single = super()._image_features
        return [f for i in range(count) for f in single({k: v[i : i + 1] for k, v in pixels.items()})]


def _check_processor_files(name_or_path: str) -> None:
    """A local checkpoint folder missing its processor files fails in one line naming the file, before minutes of
    loading weights."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return
    for names in (TOKENIZER_FILES, IMAGE_PROCESSOR_FILES, CHAT_TEMPLATE_FILES):
        if not any((folder / name).is_file() for name in names) and not _template_inside(folder, names):
            alternatives = " or ".join(names)
            raise SdrpnError(
                f"model folder '{name_or_path}' has no {alternatives}: copy the checkpoint's processor files"
            )


def _template_inside(folder: Path, names: tuple[str, ...]) -> bool:
    """Older checkpoints keep the chat template inside their tokenizer or processor settings."""
    if names != CHAT_TEMPLATE_FILES:
        return False
    for name in ("tokenizer_config.json", "processor_config.json"):
        try:
            if "chat_template" in json.loads((folder / name).read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError):
            continue
    return False
