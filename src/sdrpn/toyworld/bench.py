"""`sdrpn bench toy`: every method, the ablation ladder and a data-size sweep on fresh toy scenes.

Each finished part is written atomically to the work folder and reused when the same command runs
again, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

from sdrpn.errors import SdrpnError
from sdrpn.files import atomic_write_json
from sdrpn.rpn import load_rpn, weights_digest
from sdrpn.shipped import SHIPPED
from sdrpn.toyworld import pipeline, world
from sdrpn.train import train_rpn

SDRPN_DIR = "rpn_label_assignment_sink_removal"  # the full recipe: the ladder's last rung is SD-RPN itself
LADDER = {  # the paper's ablation order (Table 4a): what each RPN is trained on
    "rpn_raw_mse": "raw-mse",
    "rpn_label_assignment": "labels-no-sinks",
    SDRPN_DIR: "labels",
}


def _cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    payload = compute()
    atomic_write_json(path, payload)
    return payload


def _accuracy(zoom, samples, runner) -> dict:
    runs = pipeline.run_methods(zoom, samples, {"m": runner}, timing_samples=0, progress=False)
    return pipeline.accuracy_by_type(samples, runs["m"].answers)


def _train(adapter, label_dir: Path, out: Path, **overrides):
    if (out / "rpn_config.json").is_file():
        return load_rpn(out, adapter)
    settings = replace(pipeline.TOY_TRAIN, **overrides)
    return train_rpn(adapter, label_dir, out, settings, open_image=pipeline.open_toy_image)


def _claim(work: Path, adapter, model_dir: Path) -> None:
    """A work folder caches one model's results: refuse to mix in another model's."""
    owner = {
        "model": str(model_dir.resolve()),
        "weights": weights_digest(adapter, adapter.attention_shape.num_layers),
        "fingerprint": adapter.fingerprint(),
    }
    path = work / "model.json"
    if path.is_file():
        if json.loads(path.read_text()) != owner:
            raise SdrpnError(f"'{work}' holds results of another model than '{model_dir}'; use another --work")
        return
    atomic_write_json(path, owner)


def run_toy_bench(
    *,
    seed: int = 7,
    n: int = 300,
    work_dir: str | Path = "sdrpn-bench",
    model: str | Path = "toy",
    rpn: str | Path | None = None,
    label_samples: int = 2000,
    sweep: tuple[int, ...] = (250, 1000),
    rpn_seeds: tuple[int, ...] = (1, 2),
    ablations: bool = True,
    timing_samples: int = 40,
    binding: int = 0,
    released: bool = False,
) -> dict:
    """``model``: a shipped toy model ('toy', 'toy-qwen') or a toy MLLM folder made by a recipe. Without ``rpn``,
    a shipped model uses its shipped RPN and any other model gets an SD-RPN self-distilled here first."""
    work = Path(work_dir)
    model_dir = pipeline.toy_model_dir(model)
    adapter = pipeline.load_toy_model(model)
    _claim(work, adapter, model_dir)
    label_dir = work / "labels"

    def labelled() -> Path:
        pipeline.generate_labels(
            adapter,
            pipeline.as_samples(pipeline.label_scenes(label_samples, aspects=pipeline.toy_aspects(adapter))),
            label_dir,
            pipeline.toy_label_settings(model_dir),
            batch_size=32,
            open_image=pipeline.open_toy_image,
        )
        return label_dir

    if rpn or str(model) in SHIPPED:
        network = load_rpn(rpn or pipeline.shipped_dir("rpn", str(model)), adapter)
    else:
        network = _train(adapter, labelled(), work / SDRPN_DIR)
    zoom = pipeline.make_zoom(adapter, network)
    aspects = pipeline.toy_aspects(adapter)
    samples = world.make_samples(n, seed, aspects=aspects)
    tag = f"seed{seed}-n{n}"

    def main_methods() -> dict:
        runs = pipeline.run_methods(zoom, samples, pipeline.method_runners(), timing_samples=timing_samples)
        return pipeline.summarise(samples, runs)

    methods = _cached(work / f"methods-{tag}.json", main_methods)
    result = {
        "seed": seed,
        "n": n,
        "question_types": {q: sum(s.qtype == q for s in samples) for q in world.QTYPES},
        "methods": methods,
        "roi_stage_cost_sdrpn_over_vicrop": _ratio(methods, "sdrpn_mask", "vicrop"),
        "roi_settings": asdict(pipeline.TOY_ROI),
        "aspects": [list(a) for a in aspects] if aspects else [[1, 1]],
    }
    if binding:
        result["binding"] = _cached(work / f"binding-seed{seed}-n{binding}.json", lambda: _binding(zoom, seed, binding))
    if released:
        result["released_vs_toy"] = _released_vs_toy(
            adapter, network, model_dir, work, samples, tag, label_samples, labelled()
        )
    if ablations or sweep:
        labelled()
        sdrpn_runner = pipeline.method_runners()["sdrpn_mask"]

        def _accuracy_of(trained) -> dict:
            return _accuracy(pipeline.make_zoom(adapter, trained), samples, sdrpn_runner)

    if ablations:
        ladder = {"raw_attention": methods["raw_attention"]["accuracy"]}
        for name, target in LADDER.items():
            trained = _train(adapter, label_dir, work / name, target=target)
            ladder[name] = _cached(work / f"{name}-{tag}.json", lambda rpn=trained: _accuracy_of(rpn))
        result["ablation_ladder"] = ladder
        # The same SD-RPN, trained with other seeds: how far apart two RPNs of one recipe land, the yardstick
        # for the ladder's steps.
        seeds = {}
        for rpn_seed in rpn_seeds:
            trained = _train(adapter, label_dir, work / f"rpn_seed{rpn_seed}", seed=rpn_seed)
            path = work / f"seed{rpn_seed}-{tag}.json"
            seeds[str(rpn_seed)] = _cached(path, lambda rpn=trained: _accuracy_of(rpn))
        result["rpn_training_seeds"] = seeds
    if sweep:
        sizes = {}
        for size in sorted({*sweep, label_samples}):
            full = size >= label_samples  # the full-data RPN is the ladder's last rung: train it once
            folder = work / (SDRPN_DIR if full else f"rpn_{size}")
            trained = _train(adapter, label_dir, folder, max_samples=None if full else size)
            sizes[str(size)] = _cached(work / f"sweep{size}-{tag}.json", lambda rpn=trained: _accuracy_of(rpn))
        result["data_size_sweep"] = sizes
    return result


def _released_vs_toy(
    adapter, network, model_dir: Path, work: Path, samples, tag: str, label_samples: int, toy_labels: Path
) -> dict:
    """The released code's choices, one at a time, against the toy's own (SD-RPN, masked upscaling): labels from
    the generated tokens only (a new RPN distilled from them), the RPN with the released LLaVA final-norm copy
    (distilled from the toy's labels), labels with the released sink rule, the released stage 2, the released
    stage 1 + 2."""
    runner = pipeline.method_runners()["sdrpn_mask"]
    released_labels = replace(pipeline.toy_label_settings(model_dir), queries="answer", head_weighting="head")
    label_dir = work / "labels-released-queries"
    pipeline.generate_labels(
        adapter,
        pipeline.as_samples(pipeline.label_scenes(label_samples, aspects=pipeline.toy_aspects(adapter))),
        label_dir,
        released_labels,
        batch_size=32,
        open_image=pipeline.open_toy_image,
    )
    answer_rpn = _train(adapter, label_dir, work / "rpn_released_queries")
    # The released sink rule: mean attention of the family's sink heads >= its threshold, or no removal where the
    # family names no sink heads (released Qwen text-rich lists); the toys' own labels use the paper's norm rule.
    sink_rule = "attention" if adapter.defaults().sink_heads else "none"
    sink_dir = work / f"labels-released-sinks-{sink_rule}"
    pipeline.generate_labels(
        adapter,
        pipeline.as_samples(pipeline.label_scenes(label_samples, aspects=pipeline.toy_aspects(adapter))),
        sink_dir,
        replace(pipeline.toy_label_settings(model_dir), sink_rule=sink_rule),
        batch_size=32,
        open_image=pipeline.open_toy_image,
    )
    sink_rpn = _train(adapter, sink_dir, work / f"rpn_released_sinks_{sink_rule}")
    norm_rpn = _train(adapter, toy_labels, work / "rpn_final_norm", final_norm=True)
    variants = {
        "toy settings": (network, pipeline.TOY_ROI),
        "labels: generated tokens only": (answer_rpn, pipeline.TOY_ROI),
        "RPN: a copy of the final norm in its head": (norm_rpn, pipeline.TOY_ROI),
        f"labels: the released sink rule ({sink_rule})": (sink_rpn, pipeline.TOY_ROI),
        "stage 2: released crops": (network, replace(pipeline.TOY_ROI, crop_rule="released")),
        "stage 1 + 2: the family's released rule (tau 0.5)": (network, replace(adapter.defaults().roi, tau=0.5)),
    }
    return {
        name: _cached(
            work / f"released-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}-{tag}.json",
            lambda rpn=rpn, roi=roi: _accuracy(pipeline.make_zoom(adapter, rpn, roi), samples, runner),
        )
        for name, (rpn, roi) in variants.items()
    }


BINDING_METHODS = ("base", "oracle_crop", "raw_attention", "vicrop", "sdrpn_mask")


def _binding(zoom, seed: int, n: int) -> dict:
    """Scenes of three objects, the question naming the target by its colour: accuracy per method."""
    samples = world.make_samples(n, seed, qtypes=["fine", "coarse"], objects=world.MAX_OBJECTS)
    runners = {name: pipeline.method_runners()[name] for name in BINDING_METHODS}
    runs = pipeline.run_methods(zoom, samples, runners, timing_samples=0)
    return {name: pipeline.accuracy_by_type(samples, run.answers) for name, run in runs.items()}


def _ratio(methods: dict, numerator: str, denominator: str) -> float | None:
    top, bottom = methods[numerator]["median_roi_stage_s"], methods[denominator]["median_roi_stage_s"]
    return None if not top or not bottom else round(top / bottom, 3)


def format_table(result: dict) -> str:
    """A markdown table of accuracy per question type and relative throughput."""
    qtypes = ["fine", "coarse", "coarse/where", "yesno", "overall"]
    lines = ["| method | " + " | ".join(qtypes) + " | relative throughput |", "|---" * (len(qtypes) + 2) + "|"]
    for name, row in result["methods"].items():
        cells = [f"{100 * row['accuracy'].get(q, float('nan')):.1f}" for q in qtypes]
        throughput = row["relative_throughput"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {throughput if throughput else '-'} |")
    for section in ("ablation_ladder", "rpn_training_seeds", "data_size_sweep", "binding", "released_vs_toy"):
        for name, accuracy in result.get(section, {}).items():
            cells = [f"{100 * accuracy.get(q, float('nan')):.1f}" for q in qtypes]
            lines.append(f"| {section}: {name} | " + " | ".join(cells) + " | - |")
    return "\n".join(lines)
