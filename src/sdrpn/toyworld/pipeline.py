"""The whole paper on the toy world: self-distil an RPN for the shipped MLLM, then compare methods.

Toy images are rendered from their seed, never written to disk: a sample's image reference is
"toy:<seed>:<qtype>" (or "toy:<seed>:<qtype>:<objects>" for a scene of several objects), which
`open_toy_image` turns back into the scene.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from PIL import Image

from sdrpn.data import Sample
from sdrpn.errors import SdrpnError
from sdrpn.infer import InferSettings, Zoom
from sdrpn.labeling import LabelSettings, generate_labels
from sdrpn.models import FamilyAdapter, load_model
from sdrpn.roi import PixelBox, RoiSettings
from sdrpn.rpn import RegionProposalNetwork, load_rpn
from sdrpn.shipped import SHIPPED, shipped_dir, shipped_name
from sdrpn.toyworld import world
from sdrpn.train import TrainSettings, train_rpn

# The toy grid is 7 x 7 (73 px per token on a 512 px scene) and a target covers one or two tokens, so the
# released filters, made for 24 x 24 grids, would drop most true regions (1-token components) or blow them up
# to 3 x 3 tokens (220 px, where the mark is hard to read again). On this grid: keep single tokens, do not
# grow, smooth less, and drop regions wider than half the scene. A token (73 px) is nearly twice the target, so
# a region's token box puts the mark anywhere in the crop; a one-token window centred on the region's mass keeps
# it near the crop's centre. tau and window were chosen on seed 99, not a bench seed.
TOY_ROI = RoiSettings(tau=0.5, sigma=0.5, min_tokens=1, grow_below=0, max_side_frac=0.5, window=1.0)
TOY_TRAIN = TrainSettings(
    learning_rate=1e-3, batch_size=16, grad_accumulation=1, epochs=2, mixed_precision="no", final_norm=False
)
TOY_LABEL_SEED = 1000  # training scenes; evaluation uses other seeds
TOY_BINDING_FRAC = 0.0  # share of self-distillation scenes with three objects, the target named by colour
ACCURACY_BATCH = 16


def toy_model_dir(model: str | Path = "toy") -> Path:
    """A shipped toy model's name ('toy', 'toy-qwen') -> its folder; a folder made by a recipe stays itself."""
    return shipped_dir("mllm", str(model)) if str(model) in SHIPPED else Path(model)


def label_layers_from_recipe(model_dir: Path, min_top1_hit: float = 0.8) -> dict[int, None]:
    """The toy's label layers, by a rule on the recipe's attention log (recipe.json, metrics.attention.fine),
    not by hand: the layers whose teacher map (the answer-predicting positions' attention, all heads, as the
    labels average it) puts its top on the target in >= 80% of fresh scenes; the best layer alone if none
    does. A retrained model thus brings its own label layers."""
    recipe = json.loads((Path(model_dir) / "recipe.json").read_text())
    hits = recipe["metrics"]["attention"]["fine"]["teacher"]["top1_hit"]
    chosen = [layer for layer, hit in enumerate(hits) if hit >= min_top1_hit]
    return dict.fromkeys(chosen or [max(range(len(hits)), key=hits.__getitem__)])


def toy_label_settings(model_dir: Path) -> LabelSettings:
    """The toy's own label settings, with which the shipped RPN was made: its label layers, the paper's norm sink
    rule, the prefill row among the queries (the toy's answers are one or two words), layers weighed alike."""
    return LabelSettings(
        label_heads=label_layers_from_recipe(model_dir),
        max_new_tokens=4,
        sink_rule="norm",
        queries="prompt+answer",
        head_weighting="layer",
    )


TOY_LABELS = toy_label_settings(toy_model_dir())


def load_toy(model: str = "toy", rpn: str | Path | None = None) -> tuple[FamilyAdapter, RegionProposalNetwork]:
    """A shipped toy model and its shipped RPN (or the RPN folder given)."""
    adapter = load_toy_model(model)
    network = load_rpn(rpn or shipped_dir("rpn", model), adapter)
    return adapter, network


def load_toy_model(model: str | Path = "toy") -> FamilyAdapter:
    """A shipped toy model by name, or a toy MLLM folder written by a toy recipe."""
    model_dir = toy_model_dir(model)
    if not (model_dir / "recipe.json").is_file():
        raise SdrpnError(
            f"'{model_dir}' is not a toy model folder: no recipe.json (make one with sdrpn.toyworld.recipe)"
        )
    return load_model(str(model_dir))


def toy_reference(sample: world.ToySample) -> str:
    """'toy:<seed>:<qtype>', then ':<objects>' for several objects and ':<w>x<h>' for a scene that is not square."""
    objects = sample.attrs.get("objects", 1)
    aspect = sample.attrs.get("aspect")
    reference = f"toy:{sample.seed}:{sample.qtype}" + (f":{objects}" if objects > 1 or aspect else "")
    return reference + (f":{aspect[0]}x{aspect[1]}" if aspect else "")


def open_toy_image(reference: str | Path) -> Image.Image:
    _, seed, _, *rest = str(reference).split(":")
    objects = int(rest[0]) if rest else 1
    aspect = tuple(int(v) for v in rest[1].split("x")) if len(rest) > 1 else (1, 1)
    return world.render_scene(int(seed), objects=objects, aspect=aspect).image


def toy_aspects(adapter: FamilyAdapter) -> list[tuple[int, int]] | None:
    """The scene shapes a toy model is shown: every aspect ratio of the world for a family whose resolution
    follows the image (Qwen2.5-VL), square scenes for a fixed square input (LLaVA)."""
    return world.ASPECTS if adapter.defaults().min_pixels is not None else None


def label_scenes(
    samples: int, seed: int = TOY_LABEL_SEED, binding_frac: float = TOY_BINDING_FRAC, aspects=None
) -> list:
    """The self-distillation scenes: one object each, and a ``binding_frac`` share of scenes of three objects
    whose questions name the target by its colour; ``aspects`` cycles their shapes (None: square)."""
    named = int(round(samples * binding_frac))
    single = world.make_samples(samples - named, seed, aspects=aspects)
    return single + world.make_samples(named, seed + 1, objects=world.MAX_OBJECTS) if named else single


def as_samples(samples: list[world.ToySample]) -> list[Sample]:
    return [Sample(toy_reference(s), Path(toy_reference(s)), s.question, s.answer) for s in samples]


def self_distill(
    adapter: FamilyAdapter,
    work_dir: str | Path,
    *,
    samples: int = 2000,
    seed: int = TOY_LABEL_SEED,
    label_settings: LabelSettings | None = None,
    train_settings: TrainSettings = TOY_TRAIN,
    label_dir: str | Path | None = None,
    binding_frac: float = TOY_BINDING_FRAC,
    progress: bool = True,
) -> RegionProposalNetwork:
    """Labels from the model's own attention on fresh scenes, then RPN training (paper Algorithm 1). The label
    layers default to those the model's own recipe log gives (`toy_label_settings`)."""
    work_dir = Path(work_dir)
    label_dir = Path(label_dir) if label_dir else work_dir / "labels"
    toy = label_scenes(samples, seed, binding_frac, toy_aspects(adapter))
    generate_labels(
        adapter,
        as_samples(toy),
        label_dir,
        label_settings or toy_label_settings(Path(adapter.name_or_path)),
        batch_size=32,
        progress=progress,
        open_image=open_toy_image,
    )
    rpn = train_rpn(adapter, label_dir, work_dir / "rpn", train_settings, progress=progress, open_image=open_toy_image)
    rpn.config.roi_settings = asdict(TOY_ROI)  # so `sdrpn ask --rpn` uses the grid's settings too
    name = shipped_name(adapter.name_or_path)
    if name:
        rpn.config.base_model = name  # the CLI's name for the shipped model, not this machine's install path
    rpn.save(work_dir / "rpn")
    return rpn


@dataclass
class MethodRun:
    """Answers of one method on an evaluation set, and its per-sample latency (batch 1)."""

    answers: list[str]
    seconds: list[float] = field(default_factory=list)
    roi_seconds: list[float] = field(default_factory=list)
    boxes: list[list[PixelBox]] = field(default_factory=list)


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def tiles(size: tuple[int, int], per_side: int = 4) -> list[PixelBox]:
    """The scene (width, height) cut into per_side x per_side tiles: 'full resolution' as extra visual tokens."""
    dx, dy = size[0] // per_side, size[1] // per_side
    return [(c * dx, r * dy, (c + 1) * dx, (r + 1) * dy) for r in range(per_side) for c in range(per_side)]


Runner = Callable[[Zoom, list[world.ToySample]], list]


def method_runners(oracle_scale: float = 2.0) -> dict[str, Runner]:
    """Every compared method as: (zoom, samples) -> ZoomResults, all through `Zoom`."""

    def images(samples):
        return [s.image for s in samples]

    def questions(samples):
        return [s.question for s in samples]

    def zoom_method(method: str, upscale: str = "mask") -> Runner:
        return lambda zoom, s: zoom.ask_batch(images(s), questions(s), method=method, upscale=upscale)

    return {
        "base": zoom_method("base"),
        "full_resolution": lambda zoom, s: zoom.ask_with_boxes(
            images(s), questions(s), [tiles(x.image.size) for x in s]
        ),
        "oracle_crop": lambda zoom, s: zoom.ask_with_boxes(
            images(s), questions(s), [[world.oracle_crop_box(x, oracle_scale)] for x in s]
        ),
        "raw_attention": zoom_method("raw-attention"),
        "vicrop": zoom_method("vicrop"),
        "sdrpn_box": zoom_method("sdrpn", "box"),
        "sdrpn_mask": zoom_method("sdrpn", "mask"),
        "sdrpn_token_boxes": lambda zoom, s: without_window(zoom).ask_batch(images(s), questions(s), method="sdrpn"),
    }


def without_window(zoom: Zoom) -> Zoom:
    """The same model and RPN cropping each region's token box, as the released post-processing does."""
    return Zoom(zoom.adapter, zoom.rpn, replace(zoom.settings, roi=replace(zoom.settings.roi, window=0.0)))


def run_methods(
    zoom: Zoom,
    samples: list[world.ToySample],
    runners: dict[str, Runner],
    *,
    timing_samples: int = 40,
    progress: bool = True,
) -> dict[str, MethodRun]:
    """Accuracy runs batched (answers equal batch-1 answers, as tested); latency runs batch 1, methods
    interleaved per sample so machine noise hits all of them alike."""
    from tqdm.auto import tqdm

    runs = {name: MethodRun(answers=[]) for name in runners}
    for name, runner in tqdm(runners.items(), desc="methods", disable=not progress):
        for chunk in _batched(samples, ACCURACY_BATCH):
            results = runner(zoom, chunk)
            runs[name].answers += [r.answer for r in results]
            runs[name].boxes += [r.boxes for r in results]
    for sample in tqdm(samples[:timing_samples], desc="latency (batch 1)", disable=not progress):
        for name, runner in runners.items():
            started = time.perf_counter()
            result = runner(zoom, [sample])[0]
            runs[name].seconds.append(time.perf_counter() - started)
            runs[name].roi_seconds.append(result.timings.get("roi", 0.0))
    return runs


def accuracy_by_type(samples: list[world.ToySample], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy per question type and overall; coarse questions also per kind ("coarse/where"),
    as a crop can help one kind (shape) and hurt another (where)."""
    scores: dict[str, list[bool]] = {}
    for sample, answer in zip(samples, answers):
        correct = answer.strip().lower() == sample.answer.strip().lower()
        scores.setdefault(sample.qtype, []).append(correct)
        scores.setdefault("overall", []).append(correct)
        if sample.qtype == "coarse":
            scores.setdefault(f"coarse/{sample.attrs['subtype']}", []).append(correct)
    return {qtype: round(sum(v) / len(v), 4) for qtype, v in sorted(scores.items())}


def summarise(samples: list[world.ToySample], runs: dict[str, MethodRun]) -> dict:
    base_latency = statistics.median(runs["base"].seconds) if runs.get("base") and runs["base"].seconds else None
    summary = {}
    for name, run in runs.items():
        latency = statistics.median(run.seconds) if run.seconds else None
        summary[name] = {
            "accuracy": accuracy_by_type(samples, run.answers),
            "median_latency_s": None if latency is None else round(latency, 5),
            "relative_throughput": None if not (latency and base_latency) else round(base_latency / latency, 3),
            "median_roi_stage_s": round(statistics.median(run.roi_seconds), 5) if run.roi_seconds else None,
        }
    return summary


def make_zoom(adapter: FamilyAdapter, rpn: RegionProposalNetwork | None, roi: RoiSettings = TOY_ROI) -> Zoom:
    return Zoom(adapter, rpn, InferSettings(method="sdrpn" if rpn else "base", roi=roi, max_new_tokens=4))
