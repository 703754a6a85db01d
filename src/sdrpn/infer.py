"""Two-stage inference (paper 3.4) and the baselines that share its code path.

Stage 1 finds where to look: `sdrpn` runs the B frozen + R RPN layers once; `raw-attention` decodes an
answer and uses its attention; `vicrop` divides the last prompt token's attention by the same map for a
generic prompt and picks one window. Stage 2 crops the ORIGINAL image there, encodes the crop with the
model's own vision tower, inserts its tokens right after the original visual tokens, and decodes.
No region -> no extra tokens -> exactly the base model's answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from sdrpn.attention import prompt_attention, teacher_attention
from sdrpn.errors import SdrpnError
from sdrpn.images import load_image
from sdrpn.labeling import LabelSettings
from sdrpn.models import FamilyAdapter, PromptBatch, load_model
from sdrpn.roi import (
    Geometry,
    PixelBox,
    RoiRegions,
    RoiSettings,
    best_window,
    crop_token_mask,
    crop_tokens_in_boxes,
    find_regions,
    grid_box_to_pixels,
    image_cells,
    probability_grid,
    union_px,
    windows_px,
)
from sdrpn.rpn import RegionProposalNetwork, load_rpn

METHODS = ("sdrpn", "base", "raw-attention", "vicrop")
UPSCALES = ("mask", "box")
GENERIC_PROMPT = "Write a general description of the image."


@dataclass
class InferSettings:
    method: str = "sdrpn"
    upscale: str = "mask"  # masked upscaling (one crop, tokens under the mask) or one crop per box
    roi: RoiSettings = field(default_factory=RoiSettings)
    max_new_tokens: int = 128
    vicrop_layer: int | None = None  # None: the adapter's first default label layer

    def __post_init__(self) -> None:
        _check_choice(self.method, self.upscale)


def _check_choice(method: str, upscale: str) -> None:
    """Reject an unknown method/upscale, also when given per call (else they would silently fall through
    to vicrop / masked upscaling)."""
    if method not in METHODS:
        raise SdrpnError(f"method must be one of {METHODS}, got {method!r}")
    if upscale not in UPSCALES:
        raise SdrpnError(f"upscale must be one of {UPSCALES}, got {upscale!r}")


@dataclass
class RoiPrediction:
    """Where to look, for one image: the probability map on the token grid and boxes in pixels."""

    probability: np.ndarray | None  # (H, W), in [0, 1]; None for given boxes
    regions: RoiRegions | None
    boxes: list[PixelBox]  # one per region (box upscaling), original-image pixels
    union_box: PixelBox | None  # the masked-upscaling crop
    geometry: Geometry
    windowed: bool = False  # boxes are windows (pixel regions), not the regions' token boxes


@dataclass
class ZoomResult:
    answer: str
    method: str
    boxes: list[PixelBox]
    roi_map: np.ndarray | None
    extra_tokens: int
    timings: dict[str, float]
    geometry: Geometry | None = None  # how roi_map lies on the image (for overlays)

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "method": self.method,
            "boxes": [list(b) for b in self.boxes],
            "roi_map": None if self.roi_map is None else np.round(self.roi_map, 5).tolist(),
            "extra_tokens": self.extra_tokens,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }


class Zoom:
    """An MLLM that looks closer where its RPN (or a baseline) says, before answering."""

    def __init__(self, adapter: FamilyAdapter, rpn: RegionProposalNetwork | None = None, settings=None):
        self.adapter = adapter
        self.rpn = rpn
        self.settings = settings or InferSettings(method="sdrpn" if rpn is not None else "base")
        self._resolve(None, None)

    # --- stage 1 -------------------------------------------------------------------------------
    def roi_maps(self, batch: PromptBatch, method: str) -> np.ndarray | None:
        """(B, H, W) maps in [0, 1] for the method, or None for `base` (which never looks closer)."""
        if method == "base":
            return None
        if method == "sdrpn":
            with torch.no_grad():
                logits, _ = self.rpn(batch)
            last = logits[torch.arange(batch.size), [len(q) - 1 for q in batch.query_positions]]
            return np.stack([probability_grid(row.cpu().numpy(), *batch.grid) for row in last])
        if method == "raw-attention":
            output = teacher_attention(
                self.adapter, batch, self.teacher_heads(), max_new_tokens=self.settings.max_new_tokens
            )
            return _max_normalised(output.roi_maps)
        return self._vicrop_maps(batch)

    def teacher_heads(self) -> dict[int, list[int] | None]:
        """The heads the RPN was distilled from (its label settings), else the model's default label heads:
        raw attention is then exactly the map the RPN learnt to predict."""
        recorded = self.rpn.config.label_settings if self.rpn is not None else None
        heads = LabelSettings(**recorded).label_heads if recorded else None
        return heads or self.adapter.default_label_heads()

    def _vicrop_maps(self, batch: PromptBatch) -> np.ndarray:
        layer = self.settings.vicrop_layer
        layer = min(self.adapter.default_label_heads()) if layer is None else layer
        if not 0 <= layer < self.adapter.attention_shape.num_layers:
            raise SdrpnError(
                f"vicrop_layer {layer} does not exist in a {self.adapter.attention_shape.num_layers}-layer model"
            )
        heads = {layer: None}
        specific = prompt_attention(self.adapter, batch, heads)
        generic_batch = self.adapter.prepare(batch.images, [[GENERIC_PROMPT]] * batch.size)
        generic = prompt_attention(self.adapter, generic_batch, heads)
        return _max_normalised(specific / generic.clamp(min=1e-12))

    def _regions(self, maps: np.ndarray, batch: PromptBatch, method: str) -> list[RoiPrediction]:
        predictions = []
        for probability, geometry in zip(maps, batch.geometries):
            probability = np.where(image_cells(geometry), probability, 0.0)
            if method == "vicrop":
                box = best_window(probability)
                mask = np.zeros_like(probability, dtype=bool)
                mask[box[0] : box[2], box[1] : box[3]] = True
                regions = RoiRegions(probability=probability, mask=mask, boxes=[box])
            else:
                regions = find_regions(probability, self.settings.roi)
            windowed = self.settings.roi.window > 0 and method != "vicrop"
            if windowed:
                boxes = windows_px(regions, geometry, self.settings.roi.window)
                union = union_px(boxes) if boxes else None
            else:
                boxes = [grid_box_to_pixels(b, geometry) for b in regions.boxes]
                union = grid_box_to_pixels(regions.union_box, geometry) if regions.boxes else None
            predictions.append(RoiPrediction(probability, regions, boxes, union, geometry, windowed))
        return predictions

    def predict_roi(self, images, questions, method: str | None = None) -> list[RoiPrediction]:
        """Boxes and maps without generating (to put in front of another serving stack)."""
        method, _ = self._resolve(method, None)
        batch = self._prepare(images, questions)
        maps = self.roi_maps(batch, method)
        if maps is None:
            return []
        return self._regions(maps, batch, method)

    # --- stage 2 -------------------------------------------------------------------------------
    def crop_tokens(self, image: Image.Image, prediction: RoiPrediction, upscale: str) -> torch.Tensor:
        """Visual tokens of the crop(s) of one image: one crop per box, or one masked crop of all."""
        if upscale == "box":
            features, _ = self.adapter.encode_images([image.crop(box) for box in prediction.boxes])
            return torch.cat(features)
        return self._masked(image, prediction)

    def _masked(self, image: Image.Image, prediction: RoiPrediction) -> torch.Tensor:
        box = prediction.union_box
        features, geometries = self.adapter.encode_images([image.crop(box)])
        if prediction.windowed:  # windows are pixel regions: keep the tokens inside them
            keep = crop_tokens_in_boxes(prediction.boxes, prediction.geometry, box, geometries[0])
        else:
            keep = crop_token_mask(prediction.regions.mask, prediction.geometry, box, geometries[0])
        return features[0][torch.from_numpy(keep.reshape(-1)).to(features[0].device)]

    def ask_batch(self, images, questions, method: str | None = None, upscale: str | None = None) -> list[ZoomResult]:
        """Answer a batch; every sample's answer equals what it gets alone (left padding, real positions)."""
        method, upscale = self._resolve(method, upscale)
        started = time.perf_counter()
        batch = self._prepare(images, questions)
        maps = self.roi_maps(batch, method)
        predictions = self._regions(maps, batch, method) if maps is not None else [None] * batch.size
        roi_done = time.perf_counter()
        if method == "vicrop":  # ViCrop feeds its one crop whole, as a second image
            upscale = "box"
        return self._answer(batch, predictions, method, upscale, started, roi_done)

    def ask_with_boxes(self, images, questions, boxes: list[list[PixelBox]]) -> list[ZoomResult]:
        """Answer with crops of given pixel boxes (one crop each, e.g. from an external detector)."""
        if not len(images) == len(questions) == len(boxes):
            raise SdrpnError(f"got {len(images)} images, {len(questions)} questions and {len(boxes)} box lists")
        started = time.perf_counter()
        batch = self._prepare(images, questions)
        predictions = []
        for image_boxes, geometry in zip(boxes, batch.geometries):
            width, height = geometry.image_width, geometry.image_height
            for x0, y0, x1, y1 in image_boxes:
                if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                    raise SdrpnError(f"box {(x0, y0, x1, y1)} is empty or outside the {width} x {height} image")
            predictions.append(RoiPrediction(None, None, list(image_boxes), None, geometry))
        return self._answer(batch, predictions, "given-boxes", "box", started, started)

    def _answer(self, batch, predictions, method: str, upscale: str, started: float, roi_done: float):
        """Stage 2: crop tokens after the image tokens, decode; per-stage timings."""
        extra = [
            self.crop_tokens(image, p, upscale) if p is not None and p.boxes else None
            for image, p in zip(batch.images, predictions)
        ]
        dim = self.adapter.attention_shape.hidden_size
        extra = [t if t is not None else torch.zeros(0, dim, device=self.adapter.device) for t in extra]
        encoded = time.perf_counter()
        token_ids = self.adapter.generate(batch, extra, max_new_tokens=self.settings.max_new_tokens)
        answers = self.adapter.decode(token_ids)
        finished = time.perf_counter()
        timings = {
            "roi": roi_done - started,
            "encode_crops": encoded - roi_done,
            "generate": finished - encoded,
            "total": finished - started,
        }
        return [
            ZoomResult(
                answer=answer,
                method=method,
                boxes=p.boxes if p is not None else [],
                roi_map=p.probability if p is not None else None,
                extra_tokens=len(tokens),
                timings=timings,
                geometry=geometry,
            )
            for answer, p, tokens, geometry in zip(answers, predictions, extra, batch.geometries)
        ]

    def _resolve(self, method: str | None, upscale: str | None) -> tuple[str, str]:
        """Per-call choices fall back to the settings and are checked like them."""
        method, upscale = method or self.settings.method, upscale or self.settings.upscale
        _check_choice(method, upscale)
        if method == "sdrpn" and self.rpn is None:
            raise SdrpnError("method 'sdrpn' needs an RPN checkpoint (--rpn); or choose another --method")
        return method, upscale

    def ask(self, image, question: str, method: str | None = None, upscale: str | None = None) -> ZoomResult:
        return self.ask_batch([image], [question], method, upscale)[0]

    def _prepare(self, images, questions) -> PromptBatch:
        images = [load_image(image) for image in images]
        conversations = [[q] if isinstance(q, str) else list(q) for q in questions]
        return self.adapter.prepare(images, conversations)


def _max_normalised(maps: torch.Tensor) -> np.ndarray:
    maps = maps.float()
    peak = maps.flatten(1).amax(-1).clamp(min=1e-12)[:, None, None]
    return (maps / peak).cpu().numpy()


def load(
    model: str | FamilyAdapter,
    rpn: str | RegionProposalNetwork | None = None,
    *,
    method: str | None = None,
    upscale: str = "mask",
    tau: float | None = None,
    window: float | None = None,
    max_new_tokens: int = 128,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> Zoom:
    """`sdrpn.load(model="llava-hf/llava-1.5-7b-hf", rpn="path")` -> a Zoom ready to `ask`."""
    adapter = model if isinstance(model, FamilyAdapter) else load_model(model, dtype=dtype, device=device)
    network = rpn if isinstance(rpn, RegionProposalNetwork) or rpn is None else load_rpn(rpn, adapter)
    if network is not None:
        network.to(adapter.device, adapter.dtype).eval()
    roi = RoiSettings(**network.config.roi_settings) if network is not None else RoiSettings()
    roi = roi if tau is None else replace(roi, tau=tau)  # the RPN's own defaults, then the caller's choices
    roi = roi if window is None else replace(roi, window=window)
    settings = InferSettings(
        method=method or ("sdrpn" if network is not None else "base"),
        upscale=upscale,
        roi=roi,
        max_new_tokens=max_new_tokens,
    )
    return Zoom(adapter, network, settings)


__all__ = ["InferSettings", "RoiPrediction", "Zoom", "ZoomResult", "load"]
