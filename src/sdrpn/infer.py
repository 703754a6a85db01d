"""Two-stage inference (paper 3.4) and the baselines that share its code path.

Stage 1 finds where to look: `sdrpn` runs the B frozen + R RPN layers once; `raw-attention` decodes an
answer and uses its attention; `vicrop` divides the last prompt token's attention by the same map for a
generic prompt and picks one window. Stage 2 crops the ORIGINAL image there, encodes the crop with the
model's own vision tower, inserts its tokens right after the original visual tokens, and decodes.
No region -> no extra tokens -> exactly the base model's answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from sdrpn.attention import prompts_attention, teacher_attention
from sdrpn.errors import SdrpnError
from sdrpn.images import FRAMES_WARNING, load_image
from sdrpn.labeling import LabelSettings
from sdrpn.models import CropTokens, FamilyAdapter, PromptBatch, load_model
from sdrpn.models.base import LayerHeads
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
    vicrop_window,
    windows_px,
)
from sdrpn.rpn import RegionProposalNetwork, load_rpn
from sdrpn.shipped import resolve
from sdrpn.tiles import stitch_maps, stitched_geometry, tile_boxes

UPSCALES = ("mask", "box")
GENERIC_PROMPT = "Write a general description of the image."
VICROP_SUFFIX = " Answer the question using a single word or phrase."


def _with_suffix(turn: str, index: int) -> str:
    """A user turn as ViCrop asks it (the suffix once, also when the turn already ends with it after a newline, as
    benchmark prompts do); assistant turns unchanged."""
    return turn if index % 2 or turn.rstrip().endswith(VICROP_SUFFIX.strip()) else turn + VICROP_SUFFIX


@dataclass
class InferSettings:
    method: str = "sdrpn"
    upscale: str = "mask"  # masked upscaling (one crop, tokens under the mask) or one crop per box
    roi: RoiSettings = field(default_factory=RoiSettings)
    max_new_tokens: int = 128
    vicrop_layer: int | None = None  # None: the adapter's first default label layer
    vicrop_rule: str = "released"  # "released": ViCrop's official window search; "sdrpn": `sdrpn.roi.best_window`
    # ViCrop's high-resolution variant (the official `rel_att_high`): the map is stitched from tiles of at most
    # 1024 px height, each asked as its own image (`sdrpn.tiles`)
    vicrop_high_res: bool = False
    # Stage 2 continues stage 1's frozen layers over [system, image] (exact); False computes the whole prompt again,
    # as the released code does.
    prefix_reuse: bool = True

    def __post_init__(self) -> None:
        _check_choice(self.method, self.upscale)
        if self.vicrop_rule not in ("released", "sdrpn"):
            raise SdrpnError(f"vicrop_rule must be 'released' or 'sdrpn', got {self.vicrop_rule!r}")
        if not isinstance(self.vicrop_high_res, bool):
            raise SdrpnError(f"vicrop_high_res must be True or False, got {self.vicrop_high_res!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SdrpnError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")


def _check_choice(method: str, upscale: str) -> None:
    """Reject an unknown method/upscale, also when given per call (else they would silently fall through)."""
    if method not in METHODS or not METHODS[method].askable:
        raise SdrpnError(f"method must be one of {askable_methods()}, got {method!r}")
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
    released_mask: np.ndarray | None = None  # the released masked upscaling's mask: the whole smoothed map > tau


@dataclass
class ZoomResult:
    answer: str
    method: str
    boxes: list[PixelBox]
    roi_map: np.ndarray | None
    extra_tokens: int
    timings: dict[str, float]
    pruned_tokens: int = 0  # the image's own tokens stage 2 dropped (high-resolution pruning)
    geometry: Geometry | None = None  # how roi_map lies on the image (for overlays)
    input_size: tuple[int, int] | None = None  # (width, height) px the vision tower saw (resolution budgets resize)
    warnings: list[str] = field(default_factory=list)  # e.g. a multi-frame image of which one frame was read

    def to_json(self) -> dict:
        grid = None if self.geometry is None else [self.geometry.grid_height, self.geometry.grid_width]
        return {
            "answer": self.answer,
            "method": self.method,
            "boxes": [list(b) for b in self.boxes],
            "roi_map": None if self.roi_map is None else np.round(self.roi_map, 5).tolist(),
            "grid": grid,
            "input_size": None if self.input_size is None else list(self.input_size),
            "extra_tokens": self.extra_tokens,
            "pruned_tokens": self.pruned_tokens,
            "warnings": list(self.warnings),
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
    def roi_maps(self, batch: PromptBatch, method: str) -> list[np.ndarray] | None:
        """Each sample's (H_i, W_i) map in [0, 1] for the method, or None for one that never looks closer."""
        return METHODS[method].maps(self, batch)

    def teacher_settings(self) -> LabelSettings:
        """The label settings the RPN was distilled from (heads, queries, weighting), else the model's defaults:
        raw attention is then exactly the map the RPN learnt to predict."""
        recorded = self.rpn.config.label_settings if self.rpn is not None else None
        settings = LabelSettings(**recorded) if recorded else LabelSettings()
        if not (isinstance(settings.label_heads, dict) and settings.label_heads):
            settings = replace(settings, label_heads=None)
        return settings.resolved(self.adapter)

    def teacher_heads(self) -> LayerHeads:
        return self.teacher_settings().label_heads

    def regions(self, maps: list[np.ndarray], batch: PromptBatch, method: str) -> list[RoiPrediction]:
        """Post-process each map on its own grid into regions and original-image boxes."""
        predictions = []
        released = self.settings.roi.crop_rule == "released" and not METHODS[method].one_window
        for probability, geometry in zip(maps, batch.geometries):
            if released:  # the released code, padding included
                predictions.append(self._released_regions(probability, geometry))
                continue
            if METHODS[method].one_window:
                predictions.append(self._one_window(probability, geometry))
                continue
            on_image = image_cells(geometry)  # never a region on pad-to-square padding
            probability = np.where(on_image, probability, 0.0)
            regions = find_regions(probability, self.settings.roi, allowed=on_image)
            windowed = self.settings.roi.window > 0
            if windowed:
                boxes = windows_px(regions, geometry, self.settings.roi.window)
                union = union_px(boxes) if boxes else None
            else:
                boxes = [grid_box_to_pixels(b, geometry) for b in regions.boxes]
                union = grid_box_to_pixels(regions.union_box, geometry) if regions.boxes else None
            predictions.append(RoiPrediction(probability, regions, boxes, union, geometry, windowed))
        return predictions

    def _one_window(self, probability: np.ndarray, geometry: Geometry) -> RoiPrediction:
        """ViCrop's single window: its official search in original pixels (`vicrop_rule="released"`), or sdrpn's
        `best_window` on the grid. The map may lie on a grid stitched from tiles (`vicrop_high_res`). The window's
        base side is the family's (ViCrop's official 224 px for Qwen2.5-VL), else the model's input side for the
        whole image (336 px for LLaVA-1.5)."""
        base = self.adapter.defaults().vicrop_window_px or max(self.adapter.input_size(geometry))
        geometry = _vicrop_geometry(self, geometry, probability.shape)
        on_image = image_cells(geometry)  # never a window on pad-to-square padding
        probability = np.where(on_image, probability, 0.0)
        released = self.settings.vicrop_rule == "released"
        if released:
            box, window = vicrop_window(probability, geometry, base)
        else:
            box = best_window(probability)
            window = grid_box_to_pixels(box, geometry)
        mask = np.zeros_like(probability, dtype=bool)
        mask[box[0] : box[2], box[1] : box[3]] = True
        regions = RoiRegions(probability=probability, mask=mask & on_image, boxes=[box])
        return RoiPrediction(probability, regions, [window], window, geometry, windowed=released)

    def _released_regions(self, probability: np.ndarray, geometry: Geometry) -> RoiPrediction:
        """The released stage 1 and the mask its masked upscaling crops: every cell of the smoothed map above tau
        (not only the kept components), its bounding box the crop."""
        roi = self.settings.roi
        probability = np.asarray(probability, dtype=np.float64)
        if roi.zero_corner_above and probability.size > roi.zero_corner_above:  # the released Qwen sink strip
            probability = probability.copy()
            probability[: probability.shape[0] // 4, :1] = 0.0
            probability[:1, : probability.shape[1] // 4] = 0.0
        regions = find_regions(probability, roi)
        mask = regions.probability > roi.tau
        union = None
        if mask.any():
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            whole = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
            union = grid_box_to_pixels(whole, geometry)
            if not roi.components:  # one region: every cell above tau
                regions = RoiRegions(regions.probability, mask, [whole])
        elif not roi.components:
            regions = RoiRegions(regions.probability, mask, [])
        boxes = [grid_box_to_pixels(b, geometry) for b in regions.boxes]
        return RoiPrediction(regions.probability, regions, boxes, union, geometry, released_mask=mask)

    @torch.no_grad()
    def predict_roi(self, images, questions, method: str | None = None) -> list[RoiPrediction]:
        """Boxes and maps without generating (to put in front of another serving stack)."""
        method, _ = self._resolve(method, None)
        if not _as_list(images, "images") and not _as_list(questions, "questions"):
            return []
        batch = self._prepare(images, questions)
        maps = self.roi_maps(batch, method)
        if maps is None:
            return []
        return self.regions(maps, batch, method)

    # --- stage 2 -------------------------------------------------------------------------------
    def crop_tokens(self, image: Image.Image, prediction: RoiPrediction, upscale: str) -> list[CropTokens]:
        """The crops of one image: one per box with all its tokens, or one crop of all regions whose tokens
        outside the RoI are marked as not kept (masked upscaling)."""
        if prediction.released_mask is not None:
            return self._released_crops(image, prediction, upscale)
        if upscale == "box":
            crops, _ = self.adapter.encode_crops([image.crop(box) for box in prediction.boxes])
            return crops
        box = prediction.union_box
        crops, geometries = self.adapter.encode_crops([image.crop(box)])
        if prediction.windowed:  # windows are pixel regions: keep the tokens inside them
            keep = crop_tokens_in_boxes(prediction.boxes, prediction.geometry, box, geometries[0])
        else:
            keep = crop_token_mask(prediction.regions.mask, prediction.geometry, box, geometries[0])
        return [replace(crops[0], keep=torch.from_numpy(keep.reshape(-1)))]

    def _released_crops(self, image: Image.Image, prediction: RoiPrediction, upscale: str) -> list[CropTokens]:
        """The released stage 2 (LLaVA `get_batched_sub_images`): one region, or box upscaling, -> each box
        stretched to the encoder's square input, all its tokens (more than two boxes -> no crop); two or more
        regions with masked upscaling -> the box around the whole mask, stretched, and the mask cut to it, resized
        bilinearly to the crop's grid, kept where > 0.5. Without components (Qwen2.5-VL) always the latter, the
        crop at the image's own pixel budget."""
        boxes = prediction.boxes
        if self.settings.roi.components and (upscale == "box" or len(boxes) < 2):
            if len(boxes) > 2:
                return []
            crops, _ = self.adapter.encode_crops([image.crop(box) for box in boxes], stretch=True)
            return crops
        (crop,), _ = self.adapter.encode_crops([image.crop(prediction.union_box)], stretch=True)
        mask = prediction.released_mask
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        cut = torch.from_numpy(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32))
        resized = torch.nn.functional.interpolate(cut[None, None], size=crop.grid, mode="bilinear", align_corners=False)
        return [replace(crop, keep=(resized[0, 0] > 0.5).reshape(-1))]

    @torch.no_grad()
    def ask_batch(
        self,
        images,
        questions,
        method: str | None = None,
        upscale: str | None = None,
        *,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
    ) -> list[ZoomResult]:
        """Answer a batch; every sample's answer equals what it gets alone (left padding, real positions).
        `max_new_tokens` and `stop` (answers cut before the first stop string) are per call, as evaluation
        harnesses ask them per task, without touching the settings."""
        method, upscale = self._resolve(method, upscale)
        stop = _check_generation(max_new_tokens, stop)
        if not _as_list(images, "images") and not _as_list(questions, "questions"):
            return []
        started = self._clock()
        batch = self._prepare(images, questions)
        maps = self.roi_maps(batch, method)
        predictions = self.regions(maps, batch, method) if maps is not None else [None] * batch.size
        upscale = METHODS[method].upscale or upscale
        results = self._answer(batch, predictions, method, upscale, started, max_new_tokens)
        for result in results:
            result.answer = cut_at_stop(result.answer, stop)
        return results

    @torch.no_grad()
    def ask_with_boxes(self, images, questions, boxes: list[list[PixelBox]]) -> list[ZoomResult]:
        """Answer with crops of given pixel boxes (one crop each, e.g. from an external detector)."""
        images, questions = _as_list(images, "images"), _as_list(questions, "questions")
        boxes = _as_list(boxes, "boxes")
        if not len(images) == len(questions) == len(boxes):
            raise SdrpnError(f"got {len(images)} images, {len(questions)} questions and {len(boxes)} box lists")
        if not images:
            return []
        started = self._clock()
        batch = self._prepare(images, questions)
        predictions = []
        for image_boxes, geometry in zip(boxes, batch.geometries):
            checked = _check_boxes(image_boxes, geometry.image_width, geometry.image_height)
            predictions.append(RoiPrediction(None, None, checked, None, geometry))
        return self._answer(batch, predictions, "given-boxes", METHODS["given-boxes"].upscale, started)

    def _answer(
        self, batch, predictions, method: str, upscale: str, started: float, max_new_tokens: int | None = None
    ) -> list[ZoomResult]:
        """Stage 2: crops after the image tokens, decode. Timings are per sample: its own crop encoding, and
        the wall time of the batch's stages it shared (`batch_size` says with how many)."""
        roi_done = self._clock()
        crops, encode_seconds = [], []
        for image, prediction in zip(batch.images, predictions):
            began = self._clock()
            crops.append(self.crop_tokens(image, prediction, upscale) if prediction and prediction.boxes else [])
            encode_seconds.append(self._clock() - began)
        encoded = self._clock()
        if not self.settings.prefix_reuse:
            batch.prefix = None
        limit = max_new_tokens or self.settings.max_new_tokens
        if batch.decoded is not None and not any(crops) and limit == self.settings.max_new_tokens:
            token_ids = batch.decoded  # nothing to add: the first pass's answers (decoded to this limit) stand
        else:
            token_ids = self.adapter.generate(batch, crops, max_new_tokens=limit)
        answers = self.adapter.decode(token_ids)
        finished = self._clock()
        return [
            ZoomResult(
                answer=answer,
                method=method,
                boxes=p.boxes if p is not None else [],
                roi_map=p.probability if p is not None else None,
                extra_tokens=sum(c.kept for c in sample_crops),
                pruned_tokens=_pruned(batch, index) if sample_crops else 0,
                timings={
                    "roi": roi_done - started,
                    "encode_crops": seconds,
                    "generate": finished - encoded,
                    "total": finished - started,
                    "batch_size": batch.size,
                },
                geometry=p.geometry if p is not None else geometry,  # a stitched map lies on its own grid
                input_size=self.adapter.input_size(geometry),
                warnings=[image.info[FRAMES_WARNING]] if FRAMES_WARNING in image.info else [],
            )
            for index, (answer, p, sample_crops, seconds, geometry, image) in enumerate(
                zip(answers, predictions, crops, encode_seconds, batch.geometries, batch.images)
            )
        ]

    def _clock(self) -> float:
        """Wall time; on CUDA after the queued kernels finished, so per-stage timings are the stages' own."""
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)
        return time.perf_counter()

    def _resolve(self, method: str | None, upscale: str | None) -> tuple[str, str]:
        """Per-call choices fall back to the settings and are checked like them."""
        method, upscale = method or self.settings.method, upscale or self.settings.upscale
        _check_choice(method, upscale)
        if METHODS[method].needs_rpn and self.rpn is None:
            raise SdrpnError(f"method {method!r} needs an RPN checkpoint (--rpn); or choose another --method")
        return method, upscale

    def ask(self, image, question: str, method: str | None = None, upscale: str | None = None) -> ZoomResult:
        return self.ask_batch([image], [question], method, upscale)[0]

    def _prepare(self, images, questions) -> PromptBatch:
        images, questions = _as_list(images, "images"), _as_list(questions, "questions")
        if len(images) != len(questions):
            raise SdrpnError(f"got {len(images)} images for {len(questions)} questions")
        images = [load_image(image) for image in images]
        return self.adapter.prepare(images, [_conversation(q) for q in questions])


# --- methods: where stage 1 looks -----------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A source of regions. `maps` gives each sample's map in [0, 1] (None: the method never looks closer);
    `one_window` picks a single best window instead of thresholded regions; `upscale` forces how its crops
    are fed; `askable` is False for methods that need more than an image and a question (given boxes)."""

    name: str
    maps: Callable[[Zoom, PromptBatch], list[np.ndarray] | None]
    needs_rpn: bool = False
    one_window: bool = False
    upscale: str | None = None
    askable: bool = True


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def _no_maps(zoom: Zoom, batch: PromptBatch) -> None:
    return None


@torch.no_grad()
def _rpn_maps(zoom: Zoom, batch: PromptBatch) -> list[np.ndarray]:
    """The RPN's map for the last user turn of each sample, on the sample's grid."""
    prefix = zoom.adapter.prefix_state(batch, zoom.rpn.frozen_layers)  # kept on the batch for stage 2
    hidden = zoom.rpn.trunk(batch, prefix.hidden)
    last = zoom.rpn.logits_at(hidden, batch, torch.tensor([[q[-1]] for q in batch.query_positions]))[:, 0]
    roi = zoom.settings.roi
    if roi.prune_above and max(batch.visual_counts) > roi.prune_above:  # the released high-resolution pruning
        scores = zoom.rpn.question_scores(hidden, batch)
        batch.visual_keep = [
            score > roi.prune_score if count > roi.prune_above else None
            for score, count in zip(scores, batch.visual_counts)
        ]
    return [probability_grid(grid.cpu().numpy(), *grid.shape) for grid in batch.per_sample(last)]


def _raw_attention_maps(zoom: Zoom, batch: PromptBatch) -> list[np.ndarray]:
    """The paper's ablation 1: the model decodes once and its answer-to-image attention is the map."""
    settings = zoom.teacher_settings()
    output = teacher_attention(
        zoom.adapter,
        batch,
        settings.label_heads,
        max_new_tokens=zoom.settings.max_new_tokens,
        queries=settings.queries,
        head_weighting=settings.head_weighting,
    )
    batch.decoded = output.token_ids  # the base model's answer: a sample without a region keeps it
    return [_max_normalised(m) for m in output.roi_maps]


def _vicrop_maps(zoom: Zoom, batch: PromptBatch) -> list[np.ndarray]:
    """ViCrop's relative attention on each sample's grid, or, with `vicrop_high_res`, stitched from its tiles'
    when some image is split into several."""
    if zoom.settings.vicrop_high_res and any(len(tile_boxes(*image.size)) > 1 for image in batch.images):
        return _tiled_vicrop_maps(zoom, batch)
    return [_max_normalised(ratio) for ratio in _relative_attention(zoom, batch)]


def _tiled_vicrop_maps(zoom: Zoom, batch: PromptBatch) -> list[np.ndarray]:
    """ViCrop's high-resolution variant (`sdrpn.tiles`): every tile of every sample, a separate image asked the
    sample's conversation, goes through `_relative_attention` in one batch; each sample's tile maps are stitched
    unnormalised (as the official code does), then the whole map is normalised."""
    tiles = [tile_boxes(*image.size) for image in batch.images]
    tile_batch = zoom.adapter.prepare(
        [image.crop(box) for image, boxes in zip(batch.images, tiles) for box in boxes],
        [conversation for conversation, boxes in zip(batch.conversations, tiles) for _ in boxes],
    )
    ratios = [ratio.float().cpu().numpy() for ratio in _relative_attention(zoom, tile_batch)]
    maps, start = [], 0
    for image, boxes in zip(batch.images, tiles):
        end = start + len(boxes)
        stitched = stitch_maps(ratios[start:end], tile_batch.geometries[start:end], boxes, *image.size)
        maps.append(_max_normalised(torch.from_numpy(stitched)))
        start = end
    return maps


def _vicrop_geometry(zoom: Zoom, geometry: Geometry, shape: tuple[int, int]) -> Geometry:
    """How a sample's vicrop map lies on its image: on the sample's grid, or on the grid stitched over the whole
    image when `vicrop_high_res` split the image into several tiles."""
    width, height = geometry.image_width, geometry.image_height
    if zoom.settings.vicrop_high_res and len(tile_boxes(width, height)) > 1:
        return stitched_geometry(width, height, shape)
    return geometry


def _relative_attention(zoom: Zoom, batch: PromptBatch) -> list[torch.Tensor]:
    """ViCrop's relative attention, unnormalised: the last prompt token's map divided by the same for a generic
    prompt. As cheap as it honestly gets: the vision tower runs once, the [system, image] prefix both prompts
    share runs once, only the recording layer computes an attention row, and nothing runs past it."""
    layer = zoom.settings.vicrop_layer
    layer = min(zoom.adapter.defaults().label_heads) if layer is None else layer
    if not 0 <= layer < zoom.adapter.attention_shape.num_layers:
        raise SdrpnError(
            f"vicrop_layer {layer} does not exist in a {zoom.adapter.attention_shape.num_layers}-layer model"
        )
    heads = {layer: None}
    if zoom.settings.vicrop_rule == "released":  # both prompts end as ViCrop's official code asks them
        questions = [[_with_suffix(turn, i) for i, turn in enumerate(c)] for c in batch.conversations]
        specific_batch = zoom.adapter.reprompt(batch, questions)
        generic_prompt = GENERIC_PROMPT + VICROP_SUFFIX
    else:
        specific_batch, generic_prompt = batch, GENERIC_PROMPT
    generic_batch = zoom.adapter.reprompt(batch, [[generic_prompt]] * batch.size)
    specific, generic = prompts_attention(zoom.adapter, [specific_batch, generic_batch], heads)
    return [s / g.clamp(min=1e-12) for s, g in zip(specific, generic)]


register_method(Method("base", _no_maps))
register_method(Method("sdrpn", _rpn_maps, needs_rpn=True))
register_method(Method("raw-attention", _raw_attention_maps))
register_method(Method("vicrop", _vicrop_maps, one_window=True, upscale="box"))  # its one crop fed whole
register_method(Method("given-boxes", _no_maps, upscale="box", askable=False))  # `Zoom.ask_with_boxes`


def askable_methods() -> tuple[str, ...]:
    """What `ask` and `--method` offer."""
    return tuple(name for name, method in METHODS.items() if method.askable)


def _pruned(batch: PromptBatch, index: int) -> int:
    keep = batch.visual_keep[index] if batch.visual_keep is not None else None
    return 0 if keep is None else int((~keep).sum())


def _as_list(items, what: str) -> list:
    if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
        raise SdrpnError(f"{what} must be a list (one per sample), got {type(items).__name__}")
    return list(items)


def _conversation(question) -> list[str]:
    """A question (str) or a conversation (list of str alternating user/assistant, ending with the user)."""
    turns = [question] if isinstance(question, str) else question
    if not isinstance(turns, (list, tuple)) or not all(isinstance(t, str) for t in turns):
        raise SdrpnError(f"a question must be a string (or a list of strings for a chat), got {question!r:.60}")
    return list(turns)


def _check_boxes(image_boxes, width: int, height: int) -> list[PixelBox]:
    """Given boxes: lists of 4 numbers (x0, y0, x1, y1) in pixels, non-empty, inside the image."""
    if isinstance(image_boxes, (str, bytes)) or not hasattr(image_boxes, "__iter__"):
        raise SdrpnError(f"boxes of an image must be a list of (x0, y0, x1, y1), got {image_boxes!r:.60}")
    checked = []
    for box in image_boxes:
        values = list(box) if hasattr(box, "__iter__") and not isinstance(box, (str, bytes)) else None
        if values is None or len(values) != 4 or not all(isinstance(v, (int, float, np.number)) for v in values):
            raise SdrpnError(f"a box must be 4 numbers (x0, y0, x1, y1), got {box!r:.60}")
        x0, y0, x1, y1 = (int(round(float(v))) if np.isfinite(float(v)) else -1 for v in values)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise SdrpnError(f"box {tuple(values)} is empty or outside the {width} x {height} image")
        checked.append((x0, y0, x1, y1))
    return checked


def _check_generation(max_new_tokens: int | None, stop: Sequence[str]) -> list[str]:
    """Per-call generation limits: a positive token count, stop strings as a list of non-empty strings."""
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise SdrpnError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise SdrpnError(f"stop must be a list of non-empty strings, got {stop!r:.60}")
    return list(stop)


def cut_at_stop(answer: str, stop: Sequence[str]) -> str:
    """The answer before the first stop string (greedy decoding would give the same text stopping there)."""
    cut = min((i for i in (answer.find(s) for s in stop) if i >= 0), default=len(answer))
    return answer[:cut].strip()


def _max_normalised(grid: torch.Tensor) -> np.ndarray:
    grid = grid.float()
    return (grid / grid.max().clamp(min=1e-12)).cpu().numpy()


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
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    task: str | None = None,
    prune: bool = True,
    vicrop_high_res: bool = False,
) -> Zoom:
    """`sdrpn.load(model="llava-hf/llava-1.5-7b-hf", rpn="path")` -> a Zoom ready to `ask`. `model="toy",
    rpn="toy"` is the shipped demo pair. min/max_pixels: the resolution of families that choose it (Qwen2.5-VL).
    `task` ("textvqa", "docvqa", ...) takes the released RoI threshold for that benchmark; `tau` overrides it.
    `prune=False` keeps every token of a high-resolution image in stage 2 (the released Qwen2.5-VL code prunes).
    `vicrop_high_res`: the `vicrop` method stitches its map from tiles (ViCrop's `rel_att_high`)."""
    if isinstance(model, FamilyAdapter):
        adapter = model
    else:
        adapter = load_model(model, dtype=dtype, device=device, min_pixels=min_pixels, max_pixels=max_pixels)
    if isinstance(rpn, RegionProposalNetwork) or rpn is None:
        network = rpn
    else:
        network = load_rpn(resolve(str(rpn), "rpn"), adapter)
    if network is not None:
        network.to(adapter.device, adapter.dtype).eval()
    roi = adapter.defaults().roi  # the family's (or known checkpoint's), then the RPN's own, then the caller's
    roi = RoiSettings(**network.config.roi_settings) if network is not None and network.config.roi_settings else roi
    if task is not None:  # the released per-benchmark threshold of this family
        presets = adapter.defaults().task_tau
        if task not in presets:
            raise SdrpnError(f"unknown task {task!r} for this model; known: {', '.join(sorted(presets)) or 'none'}")
        roi = replace(roi, tau=presets[task])
    roi = roi if tau is None else replace(roi, tau=tau)  # the RPN's own defaults, then the caller's choices
    roi = roi if prune else replace(roi, prune_above=0)
    if window:  # windows are sdrpn's own crops: they take its stage 2
        roi = replace(roi, window=window, crop_rule="sdrpn")
    elif window is not None:
        roi = replace(roi, window=window)
    settings = InferSettings(
        method=method or ("sdrpn" if network is not None else "base"),
        upscale=upscale,
        roi=roi,
        max_new_tokens=max_new_tokens,
        vicrop_high_res=vicrop_high_res,
    )
    return Zoom(adapter, network, settings)


__all__ = ["METHODS", "InferSettings", "Method", "RoiPrediction", "Zoom", "ZoomResult", "load", "register_method"]
