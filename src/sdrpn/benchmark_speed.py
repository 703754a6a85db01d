"""`sdrpn bench speed`: time per answer of every method on the same inputs, in one run, and the paper's ratios.

Every variant answers the same toy-world questions (one warm-up answer first); times are medians over the
batches. Peak memory is the process's resident set (RSS, model included), sampled every millisecond from
/proc while one batch decodes. The RPN of a `*-shape` model is random: its map is computed, then replaced by a
given blob (or zeros, for the "no region" rows), so the box and mask paths really run whatever the weights.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdrpn.attention import teacher_attention
from sdrpn.errors import SdrpnError
from sdrpn.infer import GENERIC_PROMPT, VICROP_SUFFIX, InferSettings, Zoom, _max_normalised, _with_suffix
from sdrpn.models import FamilyAdapter, PromptBatch, check_device, load_model, wrap_model
from sdrpn.models.shapes import SHAPES, build_shape_model, stand_in_defaults
from sdrpn.roi import RoiSettings
from sdrpn.rpn import RegionProposalNetwork, load_rpn
from sdrpn.shipped import SHIPPED, resolve


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    upscale: str = "mask"
    prefix_reuse: bool = True
    region: str = "own"  # "own": the method's map; "none": no region (SD-RPN's map zeroed after it is computed)
    official_vicrop: bool = False


VARIANTS = (
    Variant("base", "base"),
    Variant("SD-RPN mask", "sdrpn", "mask"),
    Variant("SD-RPN mask, recompute", "sdrpn", "mask", prefix_reuse=False),
    Variant("SD-RPN box", "sdrpn", "box"),
    Variant("SD-RPN box, recompute", "sdrpn", "box", prefix_reuse=False),
    Variant("SD-RPN no region", "sdrpn", region="none"),
    Variant("SD-RPN no region, recompute", "sdrpn", prefix_reuse=False, region="none"),
    Variant("ViCrop (sdrpn)", "vicrop", "box"),
    Variant("ViCrop official", "vicrop", "box", official_vicrop=True),
    Variant("raw attention", "raw-attention"),
)


class SpeedZoom(Zoom):
    """A Zoom whose SD-RPN map can be replaced after it is computed (a given blob, or zeros), and whose ViCrop
    can run as its released code does."""

    given_maps: bool = False  # a random RPN: a fixed blob instead of its map, so regions exist
    region: str = "own"
    official_vicrop: bool = False

    def roi_maps(self, batch: PromptBatch, method: str):
        if method == "vicrop" and self.official_vicrop:
            return official_vicrop_maps(self, batch)
        maps = super().roi_maps(batch, method)
        if method != "sdrpn":
            return maps
        if self.region == "none":
            return [np.zeros_like(m) for m in maps]
        return [blob_map(m.shape) for m in maps] if self.given_maps else maps


def blob_map(shape: tuple[int, int]) -> np.ndarray:
    """Two smooth peaks (0.95), far apart: two regions, so masked upscaling really masks (the released stage 2
    crops one region whole, as box upscaling does)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    sigma = max(shape) / 14
    peaks = [(0.3, 0.25), (0.7, 0.7)]
    blobs = [np.exp(-((rows - shape[0] * r) ** 2 + (cols - shape[1] * c) ** 2) / (2 * sigma**2)) for r, c in peaks]
    return 0.95 * np.maximum(*blobs)


@torch.no_grad()
def official_vicrop_maps(zoom: Zoom, batch: PromptBatch) -> list[np.ndarray]:
    """ViCrop as its released code runs: the question prompt and the generic prompt each go through the whole
    model with eager attention and `output_attentions=True` (every layer's weights), the vision tower each time."""
    adapter = zoom.adapter
    layer = zoom.settings.vicrop_layer
    layer = min(adapter.defaults().label_heads) if layer is None else layer
    questions = [[_with_suffix(turn, i) for i, turn in enumerate(c)] for c in batch.conversations]
    maps = []
    for conversations in (questions, [[GENERIC_PROMPT + VICROP_SUFFIX]] * batch.size):
        prompt = adapter.prepare(batch.images, conversations)
        with adapter.text_attention("eager"):
            out = adapter.model(
                **prompt.inputs, position_ids=prompt.position_ids, output_attentions=True, use_cache=False
            )
        rows = torch.arange(prompt.size)[:, None]
        last = out.attentions[layer][:, :, -1, :].mean(1)[rows, prompt.visual_positions.to(out.attentions[0].device)]
        maps.append(prompt.per_sample(last))
    return [_max_normalised(s / g.clamp(min=1e-12)) for s, g in zip(*maps)]


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * _PAGE


_PAGE = 4096


@contextmanager
def peak_rss() -> Iterator[dict]:
    """The process's peak resident set while the block runs (sampled every millisecond), in bytes."""
    if not Path("/proc/self/statm").is_file():
        raise SdrpnError("peak memory is read from /proc/self/statm, which this system lacks")
    result = {"before": _resident_bytes(), "peak": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            result["peak"] = max(result["peak"], _resident_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak"] = max(result["peak"], _resident_bytes())


def load_for_speed(model: str, rpn: str | None, device: str | None, seed: int = 0):
    """(adapter, rpn, settings overrides) for a shape name, a shipped toy, or a checkpoint with `--rpn`."""
    check_device(device)
    if model.endswith("-shape") and model not in SHAPES:
        raise SdrpnError(f"unknown model shape {model!r}; known: {', '.join(SHAPES)}")
    if model in SHAPES:
        adapter = wrap_model(*build_shape_model(model, seed=seed), model)
        if device:
            adapter.model.to(device)
        released = stand_in_defaults(model)  # the 7B checkpoint's B, R and label heads (ViCrop's layer: the first)
        if rpn is None:
            torch.manual_seed(seed)
            network = RegionProposalNetwork(adapter, released.frozen_layers, released.rpn_layers)
            network.config.label_settings = {"label_heads": released.label_heads}
        else:
            network = load_rpn(rpn, adapter, allow_other_base=True)
        overrides = {"vicrop_layer": min(released.label_heads)}
        return adapter, network.to(adapter.device).eval(), overrides, rpn is None
    if rpn is None and model not in SHIPPED:
        raise SdrpnError("--rpn is needed for a model that is neither a shipped toy nor a *-shape model")
    adapter = load_model(resolve(model, "mllm"), device=device)
    network = load_rpn(resolve(rpn or model, "rpn"), adapter)
    return adapter, network.to(adapter.device).eval(), {}, False


def _inputs(count: int, seed: int):
    from sdrpn.toyworld.world import make_samples

    samples = make_samples(count, seed)
    return [s.image for s in samples], [s.question for s in samples]


def run_speed_bench(
    model: str,
    rpn: str | None = None,
    batch_sizes: tuple[int, ...] = (1,),
    new_tokens: int = 8,
    samples: int = 2,
    seed: int = 7,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Time every variant on the same `samples` toy-world questions at each batch size; one run, medians."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise SdrpnError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if new_tokens < 1 or samples < 1:
        raise SdrpnError("--new-tokens and --samples must be positive")
    adapter, network, overrides, given_maps = load_for_speed(model, rpn, device)
    zoom = speed_zoom(adapter, network, new_tokens, given_maps, **overrides)
    result = measure(zoom, batch_sizes, samples, seed, progress)
    result.update(model=model, shape=SHAPES[model].description if model in SHAPES else None)
    return result


def speed_zoom(
    adapter: FamilyAdapter, network: RegionProposalNetwork, new_tokens: int, given_maps: bool, **settings
) -> SpeedZoom:
    """A Zoom for the bench: the RPN's own RoI defaults, else the family's."""
    roi = adapter.defaults().roi
    if network.config.roi_settings:
        roi = RoiSettings(**network.config.roi_settings)
    zoom = SpeedZoom(adapter, network, InferSettings(roi=roi, max_new_tokens=new_tokens, **settings))
    zoom.given_maps = given_maps
    return zoom


def measure(zoom: SpeedZoom, batch_sizes: tuple[int, ...], samples: int, seed: int, progress: bool = True) -> dict:
    images, questions = _inputs(samples, seed)
    zoom.ask_batch(images[:1], questions[:1], method="base")  # warm-up: first-call costs
    rows = []
    for size in batch_sizes:  # variants take turns on each chunk
        chunks = [slice(start, start + size) for start in range(0, samples, size)]
        timed: dict[str, list[tuple]] = {variant.name: [] for variant in VARIANTS}
        # every other round in reverse order, so a load that drifts during the run favours no variant
        work = [(chunk, variant) for i, chunk in enumerate(chunks) for variant in VARIANTS[:: -1 if i % 2 else 1]]
        for chunk, variant in tqdm(work, desc=f"bench speed, batch {size}", disable=not progress):
            timed[variant.name].append(_time_chunk(zoom, variant, images[chunk], questions[chunk]))
        for variant in VARIANTS:
            per_answer, roi, extra = zip(*timed[variant.name])
            rows.append(
                {
                    "variant": variant.name,
                    "batch": size,
                    "seconds_per_answer": round(statistics.median(per_answer), 4),
                    "roi_seconds_per_answer": round(statistics.median(roi), 4),
                    "mean_extra_tokens": round(float(np.mean([t for chunk in extra for t in chunk])), 1),
                }
            )
    base = {row["batch"]: row["seconds_per_answer"] for row in rows if row["variant"] == "base"}
    for row in rows:
        row["throughput_vs_base"] = round(base[row["batch"]] / row["seconds_per_answer"], 3)
    return {
        "model": zoom.adapter.name_or_path,
        "shape": None,
        "device": str(zoom.adapter.device),
        "threads": torch.get_num_threads(),
        "new_tokens": zoom.settings.max_new_tokens,
        "samples": samples,
        "given_maps": zoom.given_maps,
        "rows": rows,
        "memory": memory_peaks(zoom, images[0], questions[0], zoom.settings.max_new_tokens),
    }


def _time_chunk(zoom: SpeedZoom, variant: Variant, images, questions) -> tuple[float, float, list[int]]:
    """(seconds per answer, RoI-stage seconds per answer, extra tokens of each answer) of one batch."""
    zoom.settings.prefix_reuse = variant.prefix_reuse
    zoom.region, zoom.official_vicrop = variant.region, variant.official_vicrop
    began = _now(zoom.adapter.device)
    results = zoom.ask_batch(images, questions, method=variant.method, upscale=variant.upscale)
    seconds = _now(zoom.adapter.device) - began
    return seconds / len(images), results[0].timings["roi"] / len(images), [r.extra_tokens for r in results]


def memory_peaks(zoom: Zoom, image, question: str, new_tokens: int) -> dict:
    """Peak RSS (MiB) of plain greedy decoding, of label capture (the teacher's rows at the label layers) and of
    eager attention with `output_attentions=True` (every layer's weights), each on the same prompt."""
    adapter: FamilyAdapter = zoom.adapter
    batch = adapter.prepare([image], [[question]])
    adapter.input_embeddings(batch)
    heads = zoom.teacher_heads()
    runs = {
        "greedy": lambda: adapter.generate(batch, max_new_tokens=new_tokens),
        "label_capture": lambda: teacher_attention(adapter, batch, heads, max_new_tokens=new_tokens),
        "eager_output_attentions": lambda: _eager_generate(adapter, batch, new_tokens),
    }
    peaks = {}
    for name, run in runs.items():
        with torch.no_grad(), peak_rss() as memory:
            run()
        peaks[name] = round(memory["peak"] / 2**20, 1)
    return peaks


def _eager_generate(adapter: FamilyAdapter, batch: PromptBatch, new_tokens: int):
    """Greedy decoding that returns every layer's attention weights at every step (what capture avoids)."""
    with adapter.text_attention("eager"):
        return adapter.model.generate(
            inputs_embeds=adapter.input_embeddings(batch),
            attention_mask=batch.inputs["attention_mask"],
            position_ids=adapter.generation_positions(batch.position_ids, batch.inputs["attention_mask"]),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_attentions=True,
            return_dict_in_generate=True,
            pad_token_id=adapter.tokenizer.pad_token_id,
        )


def _ratio(rows: list[dict], numerator: str, denominator: str, key: str, batch: int) -> float | None:
    found = {row["variant"]: row[key] for row in rows if row["batch"] == batch}
    if numerator not in found or denominator not in found or not found[numerator]:
        return None
    return round(found[denominator] / found[numerator], 3)


def targets(result: dict, batch: int = 1) -> dict:
    """The paper's comparisons as ratios of this run (higher is better for SD-RPN everywhere)."""
    rows = result["rows"]
    throughput = {row["variant"]: row["throughput_vs_base"] for row in rows if row["batch"] == batch}
    vicrops = [name for name in throughput if name.startswith("ViCrop")]
    memory = result["memory"]
    return {
        "sdrpn_mask_vs_base": throughput.get("SD-RPN mask"),
        "sdrpn_no_region_vs_base": throughput.get("SD-RPN no region"),
        "sdrpn_mask_faster_than_every_vicrop": all(
            throughput.get("SD-RPN mask", 0) > throughput[name] for name in vicrops
        ),
        "roi_stage_official_vicrop_over_sdrpn": _ratio(
            rows, "SD-RPN mask", "ViCrop official", "roi_seconds_per_answer", batch
        ),
        "roi_stage_sdrpn_vicrop_over_sdrpn": _ratio(
            rows, "SD-RPN mask", "ViCrop (sdrpn)", "roi_seconds_per_answer", batch
        ),
        "label_capture_memory_over_greedy": round(memory["label_capture"] / memory["greedy"], 3),
        "eager_attentions_memory_over_greedy": round(memory["eager_output_attentions"] / memory["greedy"], 3),
    }


def run_pieces(model: str, rpn: str | None = None, new_tokens: int = 8, repeats: int = 7, seed: int = 7, device=None):
    """Where one answer's time goes: each piece of base and of SD-RPN with masked upscaling, called on its own as
    `Zoom.ask_batch` calls it, on the bench's first question; medians of `repeats` calls after a warm-up answer."""
    adapter, network, overrides, given_maps = load_for_speed(model, rpn, device)
    zoom = speed_zoom(adapter, network, new_tokens, given_maps, **overrides)
    images, questions = _inputs(1, seed)
    zoom.ask_batch(images, questions, method="base")  # warm-up: first-call costs
    batch = zoom._prepare(images, questions)
    prediction = zoom.regions(zoom.roi_maps(batch, "sdrpn"), batch, "sdrpn")[0]
    crops = [zoom.crop_tokens(batch.images[0], prediction, "mask")] if prediction.boxes else [[]]
    prefix = batch.prefix

    def without_prefix(run):
        def call():
            batch.prefix = None
            run()
            batch.prefix = prefix

        return call

    pieces = {
        "vision tower, the image": lambda: adapter.input_embeddings(zoom._prepare(images, questions)),
        f"stage 1: {network.frozen_layers} frozen layers": lambda: adapter.prefix_state(batch, network.frozen_layers),
        "stage 1: the RPN": lambda: network(batch, prefix=prefix.hidden),
        "crop encoding": lambda: zoom.crop_tokens(batch.images[0], prediction, "mask"),
        "stage 2: generate 1 token": lambda: adapter.generate(batch, crops, max_new_tokens=1),
        f"stage 2: generate {new_tokens} tokens": lambda: adapter.generate(batch, crops, max_new_tokens=new_tokens),
        f"stage 2, no region: generate {new_tokens} tokens": lambda: adapter.generate(batch, max_new_tokens=new_tokens),
        "base: generate 1 token": without_prefix(lambda: adapter.generate(batch, max_new_tokens=1)),
        f"base: generate {new_tokens} tokens": without_prefix(
            lambda: adapter.generate(batch, max_new_tokens=new_tokens)
        ),
        "whole answer, base": lambda: zoom.ask_batch(images, questions, method="base"),
        "whole answer, SD-RPN mask": lambda: zoom.ask_batch(images, questions, method="sdrpn", upscale="mask"),
        "whole answer, SD-RPN no region": lambda: _without_region(zoom, images, questions),
    }
    seconds: dict[str, list[float]] = {name: [] for name in pieces}
    names = list(pieces)
    with torch.no_grad():  # pieces take turns, every other round reversed, so a drifting load favours none
        for round_ in tqdm(range(repeats), desc="bench speed pieces"):
            for name in names[:: -1 if round_ % 2 else 1]:
                began = _now(adapter.device)
                pieces[name]()
                seconds[name].append(_now(adapter.device) - began)
    timed = {name: round(statistics.median(values), 4) for name, values in seconds.items()}
    kept = sum(c.kept for c in crops[0])
    return {"model": model, "repeats": repeats, "kept_crop_tokens": kept, "seconds": timed}


def _without_region(zoom: SpeedZoom, images, questions) -> None:
    zoom.region = "none"
    try:
        zoom.ask_batch(images, questions, method="sdrpn")
    finally:
        zoom.region = "own"


def format_pieces(result: dict) -> str:
    lines = [
        f"sdrpn bench speed --pieces: {result['model']}, medians of {result['repeats']} calls "
        f"({result['kept_crop_tokens']} crop tokens kept)"
    ]
    lines += [f"{name:40} {seconds:8.3f} s" for name, seconds in result["seconds"].items()]
    whole = result["seconds"]
    for variant in ("mask", "no region"):
        ratio = whole["whole answer, base"] / whole[f"whole answer, SD-RPN {variant}"]
        lines.append(f"SD-RPN {variant} throughput / base: {ratio:.2f}x")
    return "\n".join(lines)


def format_speed_table(result: dict) -> str:
    lines = [
        f"sdrpn bench speed: {result['model']} on {result['device']} ({result['threads']} threads), "
        f"{result['new_tokens']} new tokens, {result['samples']} questions, medians",
    ]
    if result["shape"]:
        lines.append(f"shape: {result['shape']}; random RPN, regions from a given map")
    lines.append(f"{'variant':30} {'batch':>5} {'s/answer':>9} {'x base':>7} {'RoI s':>7} {'extra tok':>9}")
    for row in result["rows"]:
        lines.append(
            f"{row['variant']:30} {row['batch']:>5} {row['seconds_per_answer']:>9.3f} "
            f"{row['throughput_vs_base']:>7.2f} {row['roi_seconds_per_answer']:>7.3f} {row['mean_extra_tokens']:>9.1f}"
        )
    memory = result["memory"]
    lines.append(
        "peak RSS (MiB, model included): " + ", ".join(f"{name} {value:.1f}" for name, value in memory.items())
    )
    for batch in sorted({row["batch"] for row in result["rows"]}):
        lines.append(f"targets at batch {batch}:")
        for name, value in targets(result, batch).items():
            lines.append(f"  {name}: {value}")
    return "\n".join(lines)
