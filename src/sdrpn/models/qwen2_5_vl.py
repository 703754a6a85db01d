"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, e.g. `Qwen/Qwen2.5-VL-7B-Instruct`), stock transformers.

Resolution is dynamic: an image becomes an (H, W) grid of merged tokens (2 x 2 patches of 14 px = 28 px a token)
whose size follows its aspect ratio and the pixel budget [min_pixels, max_pixels]. As the released code runs it,
labels and RPN training see every image padded to a square with gray (127) at exactly `label_pixels` (24 x 24
tokens); answering keeps the aspect ratio. Positions are M-RoPE's (3, B, T) (temporal, row, column), built by the
model's own rope-index routine. A crop enters stage 2 exactly as a second image of the same user turn does
through the processor and chat template: its own vision start/end markers, right after the first image, positions
from the rope index over both grids; masked-out crop tokens are removed after positions are assigned.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

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

TOKEN_PIXELS = 28  # one merged token: 2 x 2 patches of 14 px
PAPER_PIXELS = 576 * TOKEN_PIXELS * TOKEN_PIXELS  # 24 x 24 tokens for a square image
PAD_GRAY = (127, 127, 127)
# ViCrop's official code crops windows of 224 x {1 .. 2} px for the Qwen2.5-VL checkpoints it ran; other models
# (the toy's scenes are smaller than that) keep their input side
VICROP_WINDOW_PX = 224


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """The stock Qwen2.5-VL processor without its video half, which needs torchvision.

    ProcessorMixin takes its sub-processors from `__init__`'s signature, so leaving `video_processor` out of it
    is what makes this image-only; prompts and image tokens are expanded by the stock code."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Tokenizer + the PIL image processor from a checkpoint folder (or hub name), offline-safe."""
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        settings = _image_processor_settings(path, kwargs.get("revision"))
        image_processor = Qwen2VLImageProcessorPil(**settings)
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _image_processor_settings(path, revision: str | None = None) -> dict:
    """The image processor's saved settings (`preprocessor_config.json`, or the processor's own file)."""
    from transformers.utils import cached_file

    for name in ("preprocessor_config.json", "processor_config.json"):
        file = (
            Path(path) / name
            if Path(path).is_dir()
            else cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        )
        if file and Path(file).is_file():
            data = json.loads(Path(file).read_text())
            data = data.get("image_processor", data)
            keep = (
                "min_pixels",
                "max_pixels",
                "size",
                "patch_size",
                "temporal_patch_size",
                "merge_size",
                "image_mean",
                "image_std",
            )
            return {k: v for k, v in data.items() if k in keep}
    return {}


# The released evaluation's RoI threshold per benchmark (Qwen2.5-VL-7B); "-hr" at the high-resolution budgets
# (--min-pixels = --max-pixels = 3072 x 28 x 28 for V*, 4096 x 28 x 28 for HR-Bench).
QWEN_TASK_TAU = {
    "textvqa": 0.075,
    "vstar": 0.075,
    "docvqa": 0.1,
    "infovqa": 0.1,
    "chartqa": 0.1,
    "pope": 0.1,
    "ocrbench": 0.05,
    "vstar-hr": 0.05,
    "hrbench-hr": 0.03,
}


def _signature(layers: int, hidden: int, heads: int, kv_heads: int) -> dict:
    return {"model_type": "qwen2_5_vl", "text": [layers, hidden, heads, kv_heads], "vision": [32, 1280]}


def _qwen_defaults(frozen: int, text_rich: dict, natural: dict, natural_sinks: dict) -> FamilyDefaults:
    """The released settings: natural-image heads with their sink heads (attention rule at 1e-2) by default,
    text-rich heads (no sink heads) by name; RoI tau 0.1 (the released standard-benchmark value)."""
    return FamilyDefaults(
        label_heads=natural,
        frozen_layers=frozen,
        rpn_layers=3,
        sink_rule="attention",
        sink_heads=natural_sinks,
        sink_threshold=1e-2,
        roi=RoiSettings.released_qwen(),
        task_tau=QWEN_TASK_TAU,
        learning_rate=1e-4,
        effective_batch=128,
        label_head_sets={"natural": natural, "text-rich": text_rich},
        sink_head_sets={"natural": natural_sinks, "text-rich": None},
        min_pixels=PAPER_PIXELS,
        max_pixels=PAPER_PIXELS,
        label_pixels=PAPER_PIXELS,
        vicrop_window_px=VICROP_WINDOW_PX,
    )


QWEN_CHECKPOINTS = (
    KnownCheckpoint(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        _signature(28, 3584, 28, 4),
        _qwen_defaults(
            16, text_rich={22: [1, 4], 23: [6, 11]}, natural={16: [1, 7, 17], 19: [17, 20]}, natural_sinks={9: [4, 22]}
        ),
    ),
    KnownCheckpoint(
        "Qwen/Qwen2.5-VL-3B-Instruct",
        _signature(36, 2048, 16, 2),
        _qwen_defaults(
            21, text_rich={20: [1, 4], 22: [14]}, natural={21: [9, 11], 22: [0, 7]}, natural_sinks={8: [1, 13]}
        ),
    ),
)


class Qwen2_5_VLAdapter(StockLayoutAdapter):
    family = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    known_checkpoints = QWEN_CHECKPOINTS

    def __init__(
        self,
        model: nn.Module,
        processor,
        name_or_path: str,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        label_pixels: int | None = None,
        prompt_style: str | None = None,
    ):
        super().__init__(model, processor, name_or_path, prompt_style)
        defaults = self.defaults()
        self.min_pixels = min_pixels or defaults.min_pixels
        self.max_pixels = max_pixels or defaults.max_pixels
        self.label_pixels = label_pixels or defaults.label_pixels
        if self.min_pixels > self.max_pixels:
            raise SdrpnError(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        if self.min_pixels < TOKEN_PIXELS * TOKEN_PIXELS:
            raise SdrpnError(f"min_pixels must be at least one token ({TOKEN_PIXELS}x{TOKEN_PIXELS} px)")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        device: str | None = None,
        revision: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        label_pixels: int | None = None,
        prompt_style: str | None = None,
    ):
        model, processor = cls._load_parts(
            name_or_path,
            Qwen2_5_VLForConditionalGeneration,
            ImageOnlyQwenProcessor,
            dtype=dtype,
            device=device,
            revision=revision,
        )
        return cls(
            model,
            processor,
            str(name_or_path),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            label_pixels=label_pixels,
            prompt_style=prompt_style,
        )

    # --- defaults ------------------------------------------------------------------------------
    @classmethod
    def config_signature(cls, config) -> dict:
        text, vision = config.text_config, config.vision_config
        return {
            "model_type": config.model_type,
            "text": [text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads],
            "vision": [vision.depth, vision.hidden_size],
        }

    def generic_defaults(self) -> FamilyDefaults:
        """The paper's 576-token budget for labels and answers, within what the checkpoint's processor allows."""
        size = self.processor.image_processor.size
        low, high = size["shortest_edge"], size["longest_edge"]
        pixels = min(max(PAPER_PIXELS, low), high)
        return self.middle_band_defaults(
            roi=RoiSettings.released_qwen(),
            task_tau=QWEN_TASK_TAU,
            learning_rate=1e-4,
            effective_batch=128,
            min_pixels=pixels,
            max_pixels=pixels,
            label_pixels=pixels,
        )

    # --- prompts -------------------------------------------------------------------------------
    def _pixels(self, training: bool) -> dict:
        if training:
            side = max(1, round(self.label_pixels**0.5 / TOKEN_PIXELS)) * TOKEN_PIXELS
            return {"shortest_edge": side * side, "longest_edge": side * side}
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    def _layout(self, images: list[Image.Image], training: bool) -> list[Image.Image]:
        """What the processor sees: gray-padded squares resized to exactly the label grid for training (the
        processor's own rounding could miss it by a token); else the image, grown to one token if smaller."""
        if training:
            side = max(1, round(self.label_pixels**0.5 / TOKEN_PIXELS)) * TOKEN_PIXELS
            return [pad_to_square(image, PAD_GRAY).resize((side, side), Image.BICUBIC) for image in images]
        return [_at_least_one_token(image) for image in images]

    def _geometries(self, images: list[Image.Image], grid_thw: torch.Tensor, training: bool) -> list[Geometry]:
        merge = self.processor.image_processor.merge_size
        geometries = []
        for image, (_, rows, cols) in zip(images, grid_thw.tolist()):
            grid = (rows // merge, cols // merge)
            make = Geometry.pad_to_square if training else Geometry.identity
            geometries.append(make(*image.size, *grid))
        return geometries

    def prepare(
        self, images: list[Image.Image], conversations: list[list[str]], *, training: bool = False
    ) -> PromptBatch:
        self._check_conversations(images, conversations)
        prompts = [self._prompt(c, len(c)) for c in conversations]
        inputs = self._process(self._layout(images, training), prompts, training)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        is_visual = input_ids == self.model.config.image_token_id
        counts = is_visual.sum(-1).tolist()
        geometries = self._geometries(images, inputs["image_grid_thw"], training)
        expected = [g.grid_height * g.grid_width for g in geometries]
        if counts != expected:
            raise SdrpnError(f"every prompt needs exactly one image, got image-token counts {counts}")
        position_ids, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=attention_mask,
        )
        return PromptBatch(
            inputs=inputs,
            position_ids=position_ids,
            visual_positions=pad_visual_positions([row.nonzero()[:, 0] for row in is_visual]),
            query_positions=self._query_positions(conversations, attention_mask, counts),
            geometries=geometries,
            images=list(images),
            conversations=[list(c) for c in conversations],
        )

    def _process(self, images: list[Image.Image], prompts: list[str], training: bool) -> dict:
        try:
            inputs = self.processor(
                images=images, text=prompts, size=self._pixels(training), return_tensors="pt", padding=True
            )
        except ValueError as error:  # e.g. an aspect ratio the processor refuses
            raise SdrpnError(f"the Qwen2.5-VL processor refused an image: {str(error).splitlines()[0]}") from None
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if "mm_token_type_ids" not in inputs:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.model.config.image_token_id).int()
        return inputs

    # --- layers --------------------------------------------------------------------------------
    def position_qk(self, q: torch.Tensor, k: torch.Tensor, batch: PromptBatch, query_index: torch.Tensor):
        """M-RoPE at the real 3-D positions of the query tokens and of the visual tokens, as the layer applies it."""
        rows = torch.arange(batch.size, device=q.device)[:, None]
        positions = batch.position_ids.to(q.device)
        rotary = self._language_model.rotary_emb
        cos_q, sin_q = rotary(q, positions[:, rows, query_index.to(q.device)])
        cos_k, sin_k = rotary(k, positions[:, rows, batch.visual_positions.to(q.device)])
        q, _ = apply_rotary_pos_emb(q, q, cos_q, sin_q)
        k, _ = apply_rotary_pos_emb(k, k, cos_k, sin_k)
        return q, k

    # --- images and generation -----------------------------------------------------------------
    def _image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(pixel_values.to(self.device, self.dtype), grid_thw.to(self.device))
        return list(out.pooler_output)

    def input_size(self, geometry: Geometry) -> tuple[int, int]:
        return geometry.grid_width * TOKEN_PIXELS, geometry.grid_height * TOKEN_PIXELS

    def encode_crops(
        self, crops: list[Image.Image], *, stretch: bool = False
    ) -> tuple[list[CropTokens], list[Geometry]]:
        """Each crop at the image's own pixel budget, aspect kept (a crop under one token is grown to it)."""
        grown = self._layout(crops, training=False)
        try:
            processed = self.processor.image_processor(grown, size=self._pixels(False), return_tensors="pt")
        except ValueError as error:
            raise SdrpnError(f"the Qwen2.5-VL processor refused a crop: {str(error).splitlines()[0]}") from None
        grid_thw = processed["image_grid_thw"]
        features = self._image_features(processed["pixel_values"], grid_thw)
        geometries = self._geometries(crops, grid_thw, training=False)
        tokens = [CropTokens(f, (g.grid_height, g.grid_width)) for f, g in zip(features, geometries)]
        return tokens, geometries

    @torch.no_grad()
    def input_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        if batch.embeddings is None:
            input_ids = batch.inputs["input_ids"]
            embeds = self.model.get_input_embeddings()(input_ids)
            visual = torch.cat(self._image_features(batch.inputs["pixel_values"], batch.inputs["image_grid_thw"]))
            mask = (input_ids == self.model.config.image_token_id).unsqueeze(-1)
            batch.embeddings = embeds.masked_scatter(mask, visual.to(embeds.dtype))
        return batch.embeddings

    def _image_end(self, batch: PromptBatch, index: int) -> int:
        """Where a sample's crops go in its unpadded row: right after its image's vision end marker."""
        ids = batch.inputs["input_ids"][index][batch.inputs["attention_mask"][index].bool()]
        return int((ids == self.model.config.vision_end_token_id).nonzero()[0, 0]) + 1

    def _with_crops(self, batch: PromptBatch, index: int, crops: list[CropTokens]):
        """One sample's unpadded (embeds, 3-D positions) with its crops as further images right after its
        image: ids and rope index as the processor and model build them for [image, crop, ...]; then the
        masked-out crop tokens are removed, so kept tokens keep their positions."""
        config = self.model.config
        keep_row = batch.inputs["attention_mask"][index].bool()
        ids = batch.inputs["input_ids"][index][keep_row]
        embeds = self.input_embeddings(batch)[index][keep_row]
        cut = self._image_end(batch, index)
        embed_tokens = self.model.get_input_embeddings()
        markers = embed_tokens(
            torch.tensor([config.vision_start_token_id, config.vision_end_token_id], device=ids.device)
        )
        own = batch.row_keep(index)  # the image's own tokens stage 2 drops (high-resolution pruning), if any
        own = torch.ones(len(ids), dtype=torch.bool) if own is None else own
        id_parts, embed_parts, keep_parts = [ids[:cut]], [embeds[:cut]], [own[:cut]]
        merge = self.processor.image_processor.merge_size
        grids = [batch.inputs["image_grid_thw"][index]]
        for crop in crops:
            n = crop.features.shape[0]
            id_parts.append(
                torch.tensor(
                    [config.vision_start_token_id, *[config.image_token_id] * n, config.vision_end_token_id],
                    device=ids.device,
                )
            )
            embed_parts.append(torch.cat([markers[:1], crop.features.to(embeds.dtype), markers[1:]]))
            kept = crop.keep.cpu() if crop.keep is not None else torch.ones(n, dtype=torch.bool)
            keep_parts.append(torch.cat([torch.ones(1, dtype=torch.bool), kept, torch.ones(1, dtype=torch.bool)]))
            grids.append(torch.tensor([1, crop.grid[0] * merge, crop.grid[1] * merge], device=ids.device))
        id_parts.append(ids[cut:])
        embed_parts.append(embeds[cut:])
        keep_parts.append(torch.ones(len(ids) - cut, dtype=torch.bool))
        full_ids = torch.cat(id_parts)[None]
        positions, _ = self.model.model.get_rope_index(
            full_ids,
            mm_token_type_ids=(full_ids == config.image_token_id).int(),
            image_grid_thw=torch.stack(grids),
        )
        keep = torch.cat(keep_parts).to(ids.device)
        return torch.cat(embed_parts)[keep], positions[:, 0, keep]

    def answer_rows(self, batch: PromptBatch, crops: list[list[CropTokens]]) -> list[AnswerRow]:
        rows = []
        for index, sample in enumerate(crops):
            if sample:
                shared = unchanged_prefix(batch.row_keep(index), self._image_end(batch, index))
                rows.append(AnswerRow(*self._with_crops(batch, index, sample), shared))
                continue
            keep = batch.inputs["attention_mask"][index].bool()
            embeds = self.input_embeddings(batch)[index][keep]
            rows.append(AnswerRow(embeds, batch.position_ids[:, index, keep], len(embeds)))
        return rows

    def generation_positions(self, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Our 3-D positions under the stock 4th row (text positions, from the mask only). `generate` extends
        them by one per new token from the last prompt token's, which (text, after every image) holds the
        largest position: decoding continues where the stock model's would (its rope deltas), also after
        pruned crop tokens."""
        text_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.model.model.rope_deltas = None  # positions are given: no stale deltas from another call
        return torch.cat([text_positions[None], positions])


def _at_least_one_token(image: Image.Image) -> Image.Image:
    """Grow an image under 28 px on a side to 28 px there (aspect kept where it can be), as the processor's
    resize would need; the grid still covers the whole original image."""
    width, height = image.size
    if min(width, height) >= TOKEN_PIXELS:
        return image
    scale = TOKEN_PIXELS / min(width, height)
    return image.resize((max(TOKEN_PIXELS, round(width * scale)), max(TOKEN_PIXELS, round(height * scale))))
