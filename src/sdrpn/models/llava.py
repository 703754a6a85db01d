"""LLaVA-1.5 (`LlavaForConditionalGeneration`, e.g. `llava-hf/llava-1.5-7b-hf`).

Images are padded to a square with the processor's mean colour before the processor sees them, as
LLaVA-1.5 was trained (`image_aspect_ratio: pad`); nothing is centre-cropped away, so every pixel of a
predicted region maps back onto the original image.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sdrpn.errors import SdrpnError
from sdrpn.images import pad_to_square
from sdrpn.models.base import (
    AnswerRow,
    CropTokens,
    FamilyDefaults,
    KnownCheckpoint,
    PromptBatch,
    pad_visual_positions,
    unchanged_prefix,
)
from sdrpn.models.stock import StockLayoutAdapter
from sdrpn.roi import Geometry, RoiSettings


def padding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (what `generate` uses), so batch == single answers."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# The released evaluation's RoI threshold per benchmark (reproduce.sh).
LLAVA_TASK_TAU = {
    "textvqa": 0.15,
    "infovqa": 0.15,
    "chartqa": 0.15,
    "pope": 0.15,
    "docvqa": 0.1,
    "vstar": 0.1,
    "hrbench": 0.1,
    "ocrbench": 0.05,
}


def _signature(layers: int, hidden: int, heads: int) -> dict:
    """LLaVA-1.5 = CLIP ViT-L/14 at 336 px + a Vicuna of this size."""
    return {"model_type": "llava", "text": [layers, hidden, heads, heads], "vision": [336, 14]}


# The paper's settings (released code): label heads, the attention sink rule (mean attention of the sink heads
# >= 1e-3), B = 15, R = 3.
LLAVA_CHECKPOINTS = (
    KnownCheckpoint(
        "llava-hf/llava-1.5-7b-hf",
        _signature(32, 4096, 32),
        FamilyDefaults(
            label_heads={14: [24, 13, 26]},
            frozen_layers=15,
            rpn_layers=3,
            sink_rule="attention",
            sink_heads={2: None},
            roi=RoiSettings.released(),
            rpn_final_norm=True,
            prompt_style="vicuna_v1",
            task_tau=LLAVA_TASK_TAU,
        ),
    ),
    KnownCheckpoint(
        "llava-hf/llava-1.5-13b-hf",
        _signature(40, 5120, 40),
        FamilyDefaults(
            label_heads={16: [2, 21, 30], 15: [2], 13: [21, 23, 26]},
            frozen_layers=15,
            rpn_layers=3,
            sink_rule="attention",
            sink_heads={16: [17, 22]},
            roi=RoiSettings.released(),
            rpn_final_norm=True,
            prompt_style="vicuna_v1",
            task_tau=LLAVA_TASK_TAU,
        ),
    ),
)


class LlavaAdapter(StockLayoutAdapter):
    family = "LLaVA-1.5"
    prompt_styles = ("vicuna_v1", "chat_template")
    model_types = ("llava",)
    known_checkpoints = LLAVA_CHECKPOINTS
    model_class: type[nn.Module] = LlavaForConditionalGeneration
    processor_class: type = LlavaProcessor

    def __init__(self, model: nn.Module, processor, name_or_path: str, *, prompt_style: str | None = None, **options):
        self._refuse_options(options)
        super().__init__(model, processor, name_or_path, prompt_style)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        device: str | None = None,
        revision: str | None = None,
        prompt_style: str | None = None,
        **options,
    ):
        cls._refuse_options(options)
        model, processor = cls._load_parts(
            name_or_path, cls.model_class, cls.processor_class, dtype=dtype, device=device, revision=revision
        )
        return cls(model, processor, str(name_or_path), prompt_style=prompt_style, **options)

    @classmethod
    def _refuse_options(cls, options: dict) -> None:
        unknown = {name for name, value in options.items() if value is not None}
        if unknown:
            raise SdrpnError(
                f"{', '.join(sorted(unknown))} do not apply to {cls.family}, whose input is a fixed square "
                "(they are Qwen2.5-VL settings)"
            )

    # --- defaults ------------------------------------------------------------------------------
    @classmethod
    def config_signature(cls, config) -> dict:
        text, vision = config.text_config, config.vision_config
        heads = text.num_attention_heads
        return {
            "model_type": config.model_type,
            "text": [text.num_hidden_layers, text.hidden_size, heads, text.num_key_value_heads or heads],
            "vision": [vision.image_size, vision.patch_size],
        }

    def generic_defaults(self) -> FamilyDefaults:
        return self.middle_band_defaults(
            sink_heads={min(2, self.attention_shape.num_layers - 1): None},
            roi=RoiSettings.released(),
            rpn_final_norm=True,
            task_tau=LLAVA_TASK_TAU,
        )

    # --- prompts -------------------------------------------------------------------------------
    def _prompt(self, conversation: list[str], upto: int) -> str:
        """The released evaluation's vicuna_v1 conversation (system prompt, `USER:` / `ASSISTANT:` turns, `</s>`
        after each answer), or the checkpoint's own chat template (llava-hf's has no system prompt)."""
        if self.prompt_style == "chat_template":
            return super()._prompt(conversation, upto)
        text = VICUNA_SYSTEM
        for index, turn in enumerate(conversation[:upto]):
            if index % 2 == 0:
                text += f" USER: {'<image>' + chr(10) if index == 0 else ''}{turn}"
            else:
                text += f" ASSISTANT: {turn}</s>"
        return text + " ASSISTANT:"

    def _fill_colour(self) -> tuple[int, int, int]:
        mean = getattr(self.processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        return tuple(int(round(255 * m)) for m in mean)

    def prepare(
        self, images: list[Image.Image], conversations: list[list[str]], *, training: bool = False
    ) -> PromptBatch:
        """LLaVA-1.5 sees every image padded to a square at one resolution, for training and answering alike."""
        self._check_conversations(images, conversations)
        prompts = [self._prompt(c, len(c)) for c in conversations]
        inputs = self.processor(images=self._squares(images), text=prompts, return_tensors="pt", padding=True)
        inputs = {
            k: v.to(self.device, self.dtype) if k.endswith("pixel_values") else v.to(self.device)
            for k, v in inputs.items()
        }
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        is_visual = input_ids == self.model.config.image_token_id
        counts = is_visual.sum(-1)
        if not bool((counts == counts[0]).all()):
            raise SdrpnError(f"every prompt needs exactly one image, got image-token counts {counts.tolist()}")
        visual_positions = is_visual.nonzero()[:, 1].view(len(prompts), -1)
        side = int(round(visual_positions.shape[1] ** 0.5))
        if side * side != visual_positions.shape[1]:
            raise SdrpnError(f"{visual_positions.shape[1]} visual tokens do not form a square grid")
        query_positions = self._query_positions(conversations, attention_mask, counts.tolist())
        geometries = [Geometry.pad_to_square(*image.size, side, side) for image in images]
        return PromptBatch(
            inputs=inputs,
            position_ids=padding_positions(attention_mask),
            visual_positions=pad_visual_positions(list(visual_positions)),
            query_positions=query_positions,
            geometries=geometries,
            images=list(images),
            conversations=[list(c) for c in conversations],
        )

    def _squares(self, images: list[Image.Image]) -> list[Image.Image]:
        """What the processor is given: each image padded to a square with the processor's mean colour."""
        fill = self._fill_colour()
        return [pad_to_square(image, fill) for image in images]

    # --- images and generation -----------------------------------------------------------------
    def _image_features(self, pixels: dict) -> list[torch.Tensor]:
        """Visual tokens of processed images: every `*pixel_values` input the vision towers take."""
        inputs = {k: v.to(self.device, self.dtype) for k, v in pixels.items() if k.endswith("pixel_values")}
        features = self.model.model.get_image_features(**inputs)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        return [f.reshape(-1, f.shape[-1]) for f in features]

    def input_size(self, geometry: Geometry) -> tuple[int, int]:
        side = self.model.config.vision_config.image_size
        return side, side

    @property
    def _stretch_side(self) -> int:
        """The square a crop is stretched to (the released stage 2): the vision tower's input side."""
        return self.model.config.vision_config.image_size

    def encode_crops(
        self, crops: list[Image.Image], *, stretch: bool = False
    ) -> tuple[list[CropTokens], list[Geometry]]:
        """Crops padded to a square (sdrpn), or stretched to the square input (the released stage 2)."""
        size = self._stretch_side
        if stretch:
            squares = [image.resize((size, size), Image.BILINEAR) for image in crops]
        else:
            squares = self._squares(crops)
        features = self._image_features(self.processor.image_processor(squares, return_tensors="pt"))
        side = int(round(features[0].shape[0] ** 0.5))
        make = Geometry.identity if stretch else Geometry.pad_to_square
        geometries = [make(*image.size, side, side) for image in crops]
        return [CropTokens(f, (side, side)) for f in features], geometries

    @torch.no_grad()
    def input_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        if batch.embeddings is None:
            embeds = self.model.get_input_embeddings()(batch.inputs["input_ids"])
            visual = torch.stack(self._image_features(batch.inputs)).to(embeds.dtype)
            rows = torch.arange(len(visual), device=embeds.device)[:, None]
            embeds[rows, batch.visual_positions] = visual
            batch.embeddings = embeds
        return batch.embeddings

    def answer_rows(self, batch: PromptBatch, crops: list[list[CropTokens]]) -> list[AnswerRow]:
        """LLaVA-1.5 takes a crop's kept tokens right after the image's, with no markers (released code);
        positions count the real tokens, as `generate` counts them past left padding."""
        embeds, attention_mask = self.input_embeddings(batch), batch.inputs["attention_mask"]
        rows = []
        for index, sample in enumerate(crops):
            row = embeds[index][attention_mask[index].bool()]
            shared = len(row)
            if sample:
                pad = attention_mask.shape[1] - len(row)
                image_end = int(batch.visual_positions[index, batch.visual_counts[index] - 1]) + 1 - pad
                extra = torch.cat([crop.kept_features() for crop in sample]).to(row.dtype)
                keep = batch.row_keep(index)  # the image's own tokens stage 2 drops (high-resolution pruning)
                shared = unchanged_prefix(keep, image_end)
                if keep is not None:
                    row, image_end = row[keep.to(row.device)], image_end - int((~keep).sum())
                row = torch.cat([row[:image_end], extra, row[image_end:]])
            rows.append(AnswerRow(row, torch.arange(len(row), device=row.device), shared))
        return rows
