"""Rank every (layer, head) by how well its answer->image attention localises, to pick label heads.

The paper's label heads were hand-picked per checkpoint, and such lists do not transfer to another model. Here
the model answers a small sample; every head's attention from the positions that predict the answer (averaged
over them as labels are) is kept per sample, and scored:

- concentration: 1 - spatial entropy / log N of the map once sink tokens are zeroed (a head that looks
  everywhere says nothing about where);
- consistency: how steady that concentration is across samples, mean / (mean + std);
- variety: 1 - cosine similarity of a sample's map with the head's mean map over the sample (a head that looks at
  the same tokens whatever the image is positional, not localising);
- sink-free: 1 - the share of its attention on sink tokens (outlying hidden-state norms entering its layer, the
  paper's rule), which label making throws away;
- with target boxes: box mass (the share of the sink-free map inside the box) and peak on box.

The score is box mass x sink-free when every sample has a box, else concentration x consistency x variety x
sink-free. Every head is ranked; `min_layer` leaves the heads of lower layers out of the pick. Without boxes the
`top` best are picked. With boxes, each prefix of the eligible ranking (at most `top` heads) is weighed by what an
RPN that learnt its labels would give in stage 1 (`stage_one_on_box`): the labels are made as `sdrpn label` makes
them (heads averaged alike, sinks removed by the norms entering the first picked layer, `assign_labels`), each
label's foreground is taken as the RPN's map and goes through the model's stage-1 rule (`find_regions` with its
RoI settings), and a sample counts as clean when regions are kept, every one lies on the box, and no token of the
box is labelled background. The prefix with the most clean samples is picked; rates less than one standard error
below the best count as equal, and among equals the one whose label map peaks on the box most often, then holds
most inside it, then has fewer heads. Why: how often a head's map peaks on the box did not tell how well an RPN
distils from it. On the toy, head 0:1 alone peaked on the target more often than the recipe's layer, yet its RPN
kept no region on one fine question in eight while its own map peaked on the target; its one-token labels mark
12% of the target's tokens background (three times the recipe's share), the likely cause (docs/benchmarks.md).

Label measures did not tell the toy's candidates apart reliably either, so `validate_candidates` (`--validate K`)
settles it by distillation: the K best candidates in the pick's own order each get labels on training data
(`generate_labels`, as `sdrpn label`) and an RPN (`train_rpn`, as `sdrpn train`), and the one whose RPN's stage 1
keeps a region on the box most often is picked. It costs K label and training runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from sdrpn.attention import QUERIES, _mean_over_steps, capture_hidden_norms, capture_rows, response_lengths
from sdrpn.data import Sample
from sdrpn.errors import SdrpnError
from sdrpn.files import atomic_write, atomic_write_json
from sdrpn.images import load_image
from sdrpn.labeling import LabelSettings
from sdrpn.labels import assign_labels, remove_sinks, sink_threshold
from sdrpn.models.base import FamilyAdapter, LayerHeads
from sdrpn.roi import Geometry, RoiSettings, find_regions, image_cells

if TYPE_CHECKING:
    from sdrpn.infer import Zoom
    from sdrpn.train import TrainSettings

BOX_SHARE_OF_TOKEN = 0.2  # a token is on the box when the box covers this much of it ...
BOX_SHARE_OF_BOX = 0.25  # ... or it holds this much of the box (a box smaller than a token still has one)


@dataclass
class SampleMaps:
    """One answered sample: every head's attention map and what scoring needs beside it, on the sample's grid."""

    sample_id: str
    maps: torch.Tensor  # (L, H, h, w) attention of the answer-predicting positions, averaged over them
    norms: torch.Tensor  # (L, h, w) L2 norms of the visual hidden states entering each layer (prompt pass)
    box: torch.Tensor | None  # (h, w) bool: the tokens on the sample's target box
    on_image: np.ndarray | None = None  # (h, w) bool: the cells stage 1 may put a region on (None: every cell)


@dataclass
class HeadScore:
    layer: int
    head: int
    score: float
    concentration: float
    consistency: float
    variety: float
    sink_free: float
    box_mass: float | None = None
    peak_on_box: float | None = None


@dataclass
class HeadRanking:
    """Every head, best first, and the heads picked for labels."""

    scores: list[HeadScore]
    label_heads: LayerHeads
    samples: int
    with_boxes: bool
    peak_on_box: float | None  # how often the picked heads' label map peaks on the box (sample with boxes)
    grid: tuple[int, int]  # (layers, heads)
    min_layer: int = 0  # the lowest layer heads were picked from
    clean_on_box: float | None = None  # how often stage 1 on the picked heads' labels keeps clean regions on the box
    candidates: list[Candidate] = field(default_factory=list)  # every prefix weighed (samples with boxes)
    roi: RoiSettings = field(default_factory=RoiSettings)  # the stage-1 rule they were weighed by
    validated: list[Validation] = field(default_factory=list)  # candidates whose distilled RPN was tried (--validate)


def box_tokens(box: tuple[float, float, float, float], geometry: Geometry) -> torch.Tensor:
    """(h, w) bool: the grid tokens a pixel box lies on (a token is a cell of the canvas the image is placed on)."""
    x0, y0, x1, y1 = box
    x0, x1 = max(x0, 0.0), min(x1, float(geometry.image_width))
    y0, y1 = max(y0, 0.0), min(y1, float(geometry.image_height))
    if x1 <= x0 or y1 <= y0:
        raise SdrpnError(f"box {list(box)} lies outside the {geometry.image_width} x {geometry.image_height} image")
    left = np.arange(geometry.grid_width) * geometry.cell_width - geometry.offset_x
    top = np.arange(geometry.grid_height) * geometry.cell_height - geometry.offset_y
    overlap_x = np.clip(np.minimum(x1, left + geometry.cell_width) - np.maximum(x0, left), 0, None)
    overlap_y = np.clip(np.minimum(y1, top + geometry.cell_height) - np.maximum(y0, top), 0, None)
    overlap = overlap_y[:, None] * overlap_x[None, :]
    cell_area = geometry.cell_width * geometry.cell_height
    on = (overlap >= BOX_SHARE_OF_TOKEN * cell_area) | (overlap >= BOX_SHARE_OF_BOX * (x1 - x0) * (y1 - y0))
    return torch.from_numpy(on & (overlap > 0))


def _open_images(samples: list[Sample], open_image: Callable) -> tuple[list[Sample], list, list[str]]:
    """The samples whose image opens, their images, and one line per sample whose image does not."""
    chunk, images, bad = [], [], []
    for sample in samples:
        try:
            images.append(open_image(sample.image_path))
            chunk.append(sample)
        except SdrpnError as error:
            bad.append(f"{sample.sample_id}: {error}")
    return chunk, images, bad


@torch.no_grad()
def collect_maps(
    adapter: FamilyAdapter,
    samples: list[Sample],
    *,
    queries: str = "answer",
    max_new_tokens: int = 32,
    batch_size: int = 4,
    open_image: Callable = load_image,
    progress: bool = True,
) -> tuple[list[SampleMaps], list[str]]:
    """The model answers each sample (greedy, on the grid labels use); returns every head's map per sample, and one
    line per sample that could not be used (unreadable image, bad box, an answer with no query row)."""
    if queries not in QUERIES:
        raise SdrpnError(f"queries must be one of {QUERIES}, got {queries!r}")
    shape = adapter.attention_shape
    layers = list(range(shape.num_layers))
    collected: list[SampleMaps] = []
    bad: list[str] = []
    bar = tqdm(total=len(samples), desc="heads", unit="sample", disable=not progress)
    for start in range(0, len(samples), batch_size):
        chunk, images, unreadable = _open_images(samples[start : start + batch_size], open_image)
        bad += unreadable
        if chunk:
            batch = adapter.prepare(images, [[s.question] for s in chunk], training=True)
            with ExitStack() as stack:
                recorders = stack.enter_context(
                    capture_rows(adapter, dict.fromkeys(layers), batch.visual_positions, per_head=True)
                )
                norms = [
                    stack.enter_context(capture_hidden_norms(adapter, layer, batch.visual_positions))
                    for layer in layers
                ]
                token_ids = adapter.generate(batch, max_new_tokens=max_new_tokens)
            lengths = response_lengths(token_ids, adapter.eos_token_ids)
            rows = [
                _mean_over_steps([recorders[layer]], lengths, shape.num_heads, queries, "layer") for layer in layers
            ]
            maps = batch.per_sample(torch.stack(rows, -1).permute(0, 2, 3, 1).float().cpu())  # each (h, w, L, H)
            sample_norms = batch.per_sample(torch.stack([n[0] for n in norms], -1).cpu())  # each (h, w, L)
            for index, sample in enumerate(chunk):
                head_maps = maps[index].permute(2, 3, 0, 1).contiguous()
                if not head_maps.sum() > 0:
                    bad.append(f"{sample.sample_id}: the answer has no query position ({queries!r}); try --queries")
                    continue
                try:
                    box = None if sample.box is None else box_tokens(sample.box, batch.geometries[index])
                except SdrpnError as error:
                    bad.append(f"{sample.sample_id}: {error}")
                    continue
                norms = sample_norms[index].permute(2, 0, 1)
                on_image = image_cells(batch.geometries[index])
                collected.append(SampleMaps(sample.sample_id, head_maps, norms, box, on_image))
        bar.update(len(samples[start : start + batch_size]))
    bar.close()
    return collected, bad


def _per_sample_stats(sample: SampleMaps) -> dict[str, torch.Tensor]:
    """(L, H) statistics of one sample's maps: sink mass, concentration, box mass and peak on box."""
    raw = sample.maps.flatten(2)  # (L, H, N)
    norms = sample.norms.flatten(1)  # (L, N)
    sinks = norms > sink_threshold(norms, batched=True)[:, None]
    total = raw.sum(-1).clamp_min(1e-12)
    sink_mass = (raw * sinks[:, None]).sum(-1) / total
    clean = raw.masked_fill(sinks[:, None], 0)
    mass = clean.sum(-1, keepdim=True)
    p = torch.where(mass > 0, clean / mass.clamp_min(1e-12), torch.full_like(clean, 1 / raw.shape[-1]))
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    tokens = raw.shape[-1]
    concentration = 1 - entropy / math.log(tokens) if tokens > 1 else torch.ones_like(entropy)
    stats = {"sink_mass": sink_mass, "concentration": concentration, "p": p}
    if sample.box is not None:
        box = sample.box.flatten().to(p.dtype)
        stats["box_mass"] = (p * box).sum(-1)
        stats["peak_on_box"] = box[p.argmax(-1)]
    return stats


def _variety(stats: list[dict], grids: list[tuple[int, ...]]) -> torch.Tensor:
    """1 - mean cosine similarity of each sample's map with the head's mean map, over samples on the same grid
    (1 where no grid holds two samples: nothing to compare)."""
    similarities = []
    for grid in set(grids):
        group = torch.stack([s["p"] for s, g in zip(stats, grids) if g == grid])  # (S, L, H, N)
        if len(group) < 2:
            continue
        mean = group.mean(0, keepdim=True)
        similarities.append(torch.nn.functional.cosine_similarity(group, mean.expand_as(group), dim=-1))
    if not similarities:
        return torch.ones(stats[0]["p"].shape[:2])
    return 1 - torch.cat(similarities).mean(0)


def label_map_on_box(samples: list[SampleMaps], heads: list[tuple[int, int]]) -> tuple[float, float]:
    """How often the map labels would be made from (these heads' maps averaged alike, sinks zeroed by the norms
    entering the first of their layers) peaks on the sample's box, and the mean share of that map inside the box;
    samples without a box are left out."""
    with_box = [s for s in samples if s.box is not None]
    if not with_box:
        raise SdrpnError("no sample has a target box")
    norm_layer = min(layer for layer, _ in heads)
    hits, inside = 0, 0.0
    for sample in with_box:
        averaged = torch.stack([sample.maps[layer, head] for layer, head in heads]).mean(0)
        cleaned = remove_sinks(averaged, sample.norms[norm_layer]).flatten()
        box = sample.box.flatten()
        hits += bool(box[cleaned.argmax()])
        inside += float(cleaned[box].sum() / cleaned.sum().clamp_min(1e-12))
    return hits / len(with_box), inside / len(with_box)


@dataclass
class StageOne:
    """What stage 1 makes of label foregrounds taken as the RPN's map (see `stage_one_on_box`); shares of the
    samples with a box."""

    clean_on_box: float  # regions kept, every one on the box, and no token of the box labelled background
    region_on_box: float  # a kept region on the box (a dropped label keeps none)
    no_region: float  # no region kept (dropped labels included)
    dropped: float  # the label is dropped (all ignored)


def sample_labels(sample: SampleMaps, heads: list[tuple[int, int]], labels: LabelSettings) -> torch.Tensor:
    """(h, w) labels in {-1, 0, 1} as `sdrpn label` would make them from these heads (maps averaged alike, sinks
    zeroed by the norms entering the first of their layers)."""
    averaged = torch.stack([sample.maps[layer, head] for layer, head in heads]).mean(0)
    cleaned = remove_sinks(averaged, sample.norms[min(layer for layer, _ in heads)], labels.tau_norm)
    return assign_labels(cleaned, labels.fg, labels.bg, labels.max_box_frac)


def _regions_on_box(mask: np.ndarray, box: np.ndarray) -> tuple[bool, bool]:
    """(a kept region touches the box, every kept region does); regions are the mask's 8-connected parts."""
    parts, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    touching = np.unique(parts[box & mask]).size
    return touching > 0, count > 0 and touching == count


def stage_one_on_box(
    samples: list[SampleMaps], heads: list[tuple[int, int]], roi: RoiSettings, labels: LabelSettings
) -> StageOne:
    """How an RPN that learnt these heads' labels would fare in stage 1: each label's foreground (1 on it, 0
    elsewhere) goes through the model's stage-1 rule (`find_regions` with `roi`). Why: the RPN learns to
    reproduce the foreground; a foreground the rule throws away gives no crop, one off the box a wrong crop, and
    a box token labelled background teaches the RPN to doubt the target (an RPN distilled from such labels kept
    no region on one fine toy question in eight while its map peaked on the target: docs/benchmarks.md).
    Samples without a box are left out."""
    with_box = [s for s in samples if s.box is not None]
    if not with_box:
        raise SdrpnError("no sample has a target box")
    clean = on_box = none = dropped = 0
    for sample in with_box:
        label = sample_labels(sample, heads, labels)
        foreground = (label == 1).numpy()
        box = sample.box.numpy()
        dropped += not foreground.any()
        regions = find_regions(foreground.astype(np.float64), roi, allowed=sample.on_image)
        touches, all_on = _regions_on_box(regions.mask, box)
        none += regions.empty
        on_box += touches
        clean += all_on and not bool(((label == 0).numpy() & box).any())
    count = len(with_box)
    return StageOne(clean / count, on_box / count, none / count, dropped / count)


def label_map_peaks_on_box(samples: list[SampleMaps], heads: list[tuple[int, int]]) -> float:
    """The share of samples whose label map from these heads peaks on the box (see `label_map_on_box`)."""
    return label_map_on_box(samples, heads)[0]


def rank_heads(
    samples: list[SampleMaps],
    top: int = 8,
    min_layer: int = 0,
    roi: RoiSettings | None = None,
    labels: LabelSettings | None = None,
) -> HeadRanking:
    """Score every head over the answered samples (see the module docstring) and pick the label heads from layer
    `min_layer` up; `roi` is the stage-1 rule the labels' foregrounds are weighed by (default: sdrpn's), `labels`
    the thresholds labels are made with (default: `sdrpn label`'s)."""
    roi = roi or RoiSettings()
    labels = labels or LabelSettings()
    if not samples:
        raise SdrpnError("no sample could be used to rank heads")
    num_layers = samples[0].maps.shape[0]
    if not 0 <= min_layer < num_layers:
        raise SdrpnError(f"the lowest label layer must be in 0..{num_layers - 1} for this model, got {min_layer}")
    stats = [_per_sample_stats(s) for s in samples]
    grids = [tuple(s.maps.shape[2:]) for s in samples]
    concentration = torch.stack([s["concentration"] for s in stats])  # (S, L, H)
    mean_concentration = concentration.mean(0)
    spread = concentration.std(0, correction=0)
    consistency = mean_concentration / (mean_concentration + spread).clamp_min(1e-12)
    variety = _variety(stats, grids)
    sink_free = 1 - torch.stack([s["sink_mass"] for s in stats]).mean(0)
    with_boxes = all(s.box is not None for s in samples)
    box_mass = peak_on_box = None
    if with_boxes:
        box_mass = torch.stack([s["box_mass"] for s in stats]).mean(0)
        peak_on_box = torch.stack([s["peak_on_box"] for s in stats]).mean(0)
        score = box_mass * sink_free
    else:
        score = mean_concentration * consistency * variety * sink_free
    layers, heads = score.shape
    scores = [
        HeadScore(
            layer=layer,
            head=head,
            score=round(float(score[layer, head]), 4),
            concentration=round(float(mean_concentration[layer, head]), 4),
            consistency=round(float(consistency[layer, head]), 4),
            variety=round(float(variety[layer, head]), 4),
            sink_free=round(float(sink_free[layer, head]), 4),
            box_mass=None if box_mass is None else round(float(box_mass[layer, head]), 4),
            peak_on_box=None if peak_on_box is None else round(float(peak_on_box[layer, head]), 4),
        )
        for layer in range(layers)
        for head in range(heads)
    ]
    order = sorted(range(len(scores)), key=lambda i: (-float(score.flatten()[i]), -scores[i].concentration, i))
    ranked = [scores[i] for i in order]
    eligible = [s for s in ranked if s.layer >= min_layer]
    picked, candidates = _pick(samples, eligible, top, with_boxes, roi, labels)
    chosen = next((c for c in candidates if c.heads == picked), None)
    return HeadRanking(
        scores=ranked,
        label_heads=label_heads_of(picked),
        samples=len(samples),
        with_boxes=with_boxes,
        peak_on_box=None if chosen is None else chosen.peak_on_box,
        grid=(layers, heads),
        min_layer=min_layer,
        clean_on_box=None if chosen is None else chosen.clean_on_box,
        candidates=candidates,
        roi=roi,
    )


def label_heads_of(heads: list[tuple[int, int]]) -> LayerHeads:
    """(layer, head) pairs as {layer: [heads]}, layers and heads in order."""
    label_heads: LayerHeads = {}
    for layer, head in sorted(heads):
        label_heads.setdefault(layer, []).append(head)
    return label_heads


@dataclass
class Candidate:
    """A prefix of the ranking the pick weighed, and the label measures it was weighed by (samples with boxes)."""

    heads: list[tuple[int, int]]
    clean_on_box: float  # stage 1 on the labels' foregrounds keeps regions, all on the box, none of it background
    region_on_box: float  # ... keeps a region on the box (`stage_one_on_box`)
    no_region: float
    dropped: float
    peak_on_box: float  # the label map peaks on the box (`label_map_on_box`)
    box_share: float  # the label map's mean share inside the box


def weigh_candidate(
    samples: list[SampleMaps], heads: list[tuple[int, int]], roi: RoiSettings, labels: LabelSettings
) -> Candidate:
    stage_one = stage_one_on_box(samples, heads, roi, labels)
    peak, share = label_map_on_box(samples, heads)
    return Candidate(heads, **asdict(stage_one), peak_on_box=peak, box_share=share)


def _pick(
    samples: list[SampleMaps],
    ranked: list[HeadScore],
    top: int,
    with_boxes: bool,
    roi: RoiSettings,
    labels: LabelSettings,
) -> tuple[list[tuple[int, int]], list[Candidate]]:
    heads = [(s.layer, s.head) for s in ranked[:top]]
    if not with_boxes:
        return heads, []
    candidates = [weigh_candidate(samples, heads[:k], roi, labels) for k in range(1, len(heads) + 1)]
    return best_candidate(candidates, sum(s.box is not None for s in samples)).heads, candidates


def best_candidate(candidates: list[Candidate], samples: int) -> Candidate:
    """The most clean regions on the box, where rates less than one standard error apart (sqrt(p (1 - p) / n) at
    the best rate p) count as equal, so that one sample more or less does not decide; among equals the label map's
    peak on the box, then its share inside it, then fewer heads."""
    top = max(c.clean_on_box for c in candidates)
    margin = math.sqrt(top * (1 - top) / samples)
    equal = [c for c in candidates if c.clean_on_box >= top - margin - 1e-9]
    return max(equal, key=lambda c: (c.peak_on_box, c.box_share))  # the first (fewest heads) among equals


# --- validation by distilled RPNs ------------------------------------------------------------------


@dataclass
class Validation:
    """A candidate whose labels were made and whose RPN was trained: how its stage 1 fares on the boxed samples."""

    heads: list[tuple[int, int]]
    region_on_box: float  # a kept region lies on the box
    no_region: float  # stage 1 keeps no region
    samples: int
    rpn: str  # the folder the RPN is saved in


def weighed_order(candidates: list[Candidate], samples: int) -> list[Candidate]:
    """The candidates best first by the pick's own criterion (`best_candidate` on those left), distinct head sets."""
    left = list({frozenset(c.heads): c for c in reversed(candidates)}.values())[::-1]
    ordered = []
    while left:
        best = best_candidate(left, samples)
        ordered.append(best)
        left.remove(best)
    return ordered


def best_validated(validated: list[Validation]) -> Validation:
    """The most kept regions on the box; ties: fewer samples without a region, then the earlier (weighed) one."""
    return max(validated, key=lambda v: (v.region_on_box, -v.no_region))  # the first among equals


def heads_slug(heads: list[tuple[int, int]]) -> str:
    return "-".join(f"{layer}_{head}" for layer, head in heads)


def rpn_on_box(
    zoom: Zoom, samples: list[Sample], open_image: Callable = load_image, batch_size: int = 4
) -> tuple[int, int, int]:
    """(kept regions on the box, no region kept, samples) for the RPN's stage 1 (`Zoom.predict_roi`, its RoI
    settings) on the samples with a box; unreadable images are left out."""
    on_box = none = count = 0
    with_box = [s for s in samples if s.box is not None]
    for start in range(0, len(with_box), batch_size):
        chunk, images, _ = _open_images(with_box[start : start + batch_size], open_image)
        if not chunk:
            continue
        for sample, prediction in zip(chunk, zoom.predict_roi(images, [s.question for s in chunk])):
            target = box_tokens(sample.box, prediction.geometry).numpy()
            none += prediction.regions.empty
            on_box += bool((prediction.regions.mask & target).any())
            count += 1
    return on_box, none, count


@dataclass(frozen=True)
class DistillationRule:
    """What labels and RPNs are judged and made by: the stage-1 RoI rule, the label thresholds the pick weighs
    labels with, and the label (heads aside) and training settings `validate_candidates` distils with."""

    roi: RoiSettings
    thresholds: LabelSettings
    labels: LabelSettings
    training: TrainSettings


def distillation_rule(
    adapter: FamilyAdapter, rpn: str | Path | None, queries: str, max_new_tokens: int
) -> DistillationRule:
    """An RPN's own settings (a folder, or a shipped name), read once; else the model's RoI rule and `sdrpn label`'s
    and `sdrpn train`'s defaults, labels on the queries and answer length heads were ranked by."""
    from sdrpn.rpn import read_rpn_config
    from sdrpn.shipped import resolve
    from sdrpn.train import TrainSettings

    own = LabelSettings(queries=queries, max_new_tokens=max_new_tokens)
    if rpn is None:
        return DistillationRule(adapter.defaults().roi, LabelSettings(), own, TrainSettings())
    config = read_rpn_config(resolve(str(rpn), "rpn"))
    roi = RoiSettings(**config.roi_settings) if config.roi_settings else adapter.defaults().roi
    recorded = config.label_settings or {}
    thresholds = {name: recorded[name] for name in ("fg", "bg", "max_box_frac", "tau_norm") if name in recorded}
    labels = LabelSettings(**recorded) if recorded else own
    training = TrainSettings(**(config.training.get("settings") or {}))
    return DistillationRule(roi, LabelSettings(**thresholds), labels, training)


def validate_candidates(
    adapter: FamilyAdapter,
    ranking: HeadRanking,
    count: int,
    train_samples: list[Sample],
    boxed_samples: list[Sample],
    work: str | Path,
    labels: LabelSettings,
    training: TrainSettings,
    *,
    batch_size: int = 4,
    open_image: Callable = load_image,
    progress: bool = True,
) -> HeadRanking:
    """Labels from each of the `count` best candidates on `train_samples` (`generate_labels`, as `sdrpn label`),
    an RPN trained on them (`train_rpn`, as `sdrpn train`), and its stage 1 scored on `boxed_samples`; the
    ranking comes back with the best of them picked. Why: on the toy, how the labels' own foreground fares in
    stage 1 did not tell which heads give the RPN that finds the target (docs/benchmarks.md). The work folder
    keeps one folder per candidate; labelling resumes and a saved RPN is reused, so a run resumes per candidate."""
    from sdrpn.infer import InferSettings, Zoom
    from sdrpn.labeling import generate_labels
    from sdrpn.rpn import CONFIG_NAME, WEIGHTS_NAME, load_rpn
    from sdrpn.train import train_rpn

    if not ranking.candidates:
        raise SdrpnError("--validate needs a target box on every sample of --data")
    ordered = weighed_order(ranking.candidates, ranking.samples)[:count]
    work = Path(work)
    validated = []
    for candidate in tqdm(ordered, desc="validate", unit="candidate", disable=not progress):
        folder = work / heads_slug(candidate.heads)
        settings = replace(labels, label_heads=label_heads_of(candidate.heads), norm_layer=None, head_weighting="head")
        generate_labels(
            adapter,
            train_samples,
            folder / "labels",
            settings,
            batch_size=batch_size,
            progress=progress,
            open_image=open_image,
        )
        rpn_dir = folder / "rpn"
        if (rpn_dir / CONFIG_NAME).is_file() and (rpn_dir / WEIGHTS_NAME).is_file():
            rpn = load_rpn(rpn_dir, adapter)
        else:
            rpn = train_rpn(adapter, folder / "labels", rpn_dir, training, progress=progress, open_image=open_image)
            rpn.config.roi_settings = asdict(ranking.roi)
            rpn.save(rpn_dir)
        zoom = Zoom(adapter, rpn, InferSettings(method="sdrpn", roi=ranking.roi))
        on_box, none, scored = rpn_on_box(zoom, boxed_samples, open_image, batch_size)
        if not scored:
            raise SdrpnError("no boxed sample could be scored by the candidates' RPNs")
        validated.append(Validation(candidate.heads, on_box / scored, none / scored, scored, str(rpn_dir)))
    best = best_validated(validated)
    chosen = next(c for c in ranking.candidates if c.heads == best.heads)
    return replace(
        ranking,
        label_heads=label_heads_of(best.heads),
        peak_on_box=chosen.peak_on_box,
        clean_on_box=chosen.clean_on_box,
        validated=validated,
    )


# --- files ---------------------------------------------------------------------------------------


def ranking_json(ranking: HeadRanking, model: str, queries: str, asked: int) -> dict:
    """What `sdrpn heads` writes: the label heads (what `--label-heads FILE.json` reads) and the whole ranking."""
    return {
        "label_heads": {str(layer): heads for layer, heads in ranking.label_heads.items()},
        "model": model,
        "queries": queries,
        "samples": ranking.samples,
        "samples_asked": asked,
        "with_boxes": ranking.with_boxes,
        "peak_on_box": ranking.peak_on_box,
        "layers": ranking.grid[0],
        "heads_per_layer": ranking.grid[1],
        "min_layer": ranking.min_layer,
        "clean_on_box": ranking.clean_on_box,
        "roi_settings": asdict(ranking.roi),
        "candidates": [
            {
                "heads": " ".join(f"{layer}:{head}" for layer, head in c.heads),
                **{k: round(v, 4) for k, v in asdict(c).items() if k != "heads"},
            }
            for c in ranking.candidates
        ],
        "validated": [
            {
                "heads": " ".join(f"{layer}:{head}" for layer, head in v.heads),
                "region_on_box": round(v.region_on_box, 4),
                "no_region": round(v.no_region, 4),
                "samples": v.samples,
                "rpn": v.rpn,
            }
            for v in ranking.validated
        ],
        "ranking": [asdict(score) for score in ranking.scores],
    }


def read_head_list(path: str | Path) -> LayerHeads:
    """The label heads of a file `sdrpn heads` wrote, as {layer: [heads]}."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SdrpnError(f"head list '{path}' not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SdrpnError(f"head list '{path}' is not readable JSON ({' '.join(str(error).split())})") from None
    heads = payload.get("label_heads") if isinstance(payload, dict) else None
    try:
        if not isinstance(heads, dict) or not heads:
            raise TypeError
        parsed = {int(layer): [int(h) for h in listed] for layer, listed in heads.items()}
        if any(not listed for listed in parsed.values()):
            raise TypeError
    except (TypeError, ValueError):
        raise SdrpnError(
            f'head list \'{path}\' has no "label_heads" of the form {{"layer": [heads, ...]}} '
            "(write it with sdrpn heads)"
        ) from None
    return parsed


def save_heat_map(ranking: HeadRanking, path: str | Path) -> Path:
    """A layer x head picture of the score, the picked heads outlined."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    layers, heads = ranking.grid
    grid = np.zeros((layers, heads))
    for score in ranking.scores:
        grid[score.layer, score.head] = score.score
    figure = Figure(figsize=(min(max(4.5, 2 + 0.3 * heads), 14), min(max(3.5, 1.5 + 0.3 * layers), 12)), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(grid, cmap="inferno", aspect="auto", interpolation="nearest")
    for layer, listed in ranking.label_heads.items():
        for head in listed or []:
            axes.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(f"head score on {ranking.samples} samples (picked: outlined)", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return atomic_write(path, lambda file: figure.savefig(file, format="png"))


def write_ranking(ranking: HeadRanking, out: str | Path, model: str, queries: str, asked: int) -> tuple[Path, Path]:
    """heads.json and, beside it, heads.png."""
    out = Path(out)
    atomic_write_json(out, ranking_json(ranking, model, queries, asked))
    return out, save_heat_map(ranking, out.with_suffix(".png"))


def format_table(ranking: HeadRanking, rows: int = 20) -> str:
    """The best `rows` heads as a plain-text table."""
    picked = {(layer, head) for layer, listed in ranking.label_heads.items() for head in listed or []}
    header = "rank layer head  score  conc  cons  vari  sinkfree"
    if ranking.with_boxes:
        header += "  boxmass  peak"
    lines = [header]
    for rank, s in enumerate(ranking.scores[:rows], start=1):
        line = (
            f"{rank:>4} {s.layer:>5} {s.head:>4} {s.score:6.3f} {s.concentration:5.2f} {s.consistency:5.2f} "
            f"{s.variety:5.2f} {s.sink_free:9.2f}"
        )
        if ranking.with_boxes:
            line += f" {s.box_mass:8.2f} {s.peak_on_box:5.2f}"
        lines.append(line + ("  *" if (s.layer, s.head) in picked else ""))
    return "\n".join(lines)
