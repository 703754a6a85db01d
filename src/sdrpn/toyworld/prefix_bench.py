"""What `sdrpn train --cache-prefix` saves, measured in one run:

    python -m sdrpn.toyworld.prefix_bench --model toy --samples 128 --epochs 3 --repeats 3

Labels come from the model's own attention on fresh toy scenes (as `sdrpn demo --train-rpn` makes them); then, in
turn and `--repeats` times, the same training runs without a cache, with an empty cache (its first epoch fills
it) and with the full cache. Medians of whole runs are printed, and how far the RPNs trained the three ways differ.

`--model llava7b-shape` is a randomly initialised LLaVA-1.5 built offline with the 7B checkpoint's proportions
and a width cut 8x so that it runs on a CPU: 32 text layers x 32 heads (hidden 512, MLP 1376), a 24-layer CLIP
tower (hidden 128, 16 heads) on 336 px images in 14 px patches (576 visual tokens); B = 15, R = 3 as released.
Its labels mean nothing (random weights, flat attention): only cost is measured, and a sample without labels costs
the same forward and backward pass.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from sdrpn.labeling import LabelSettings, generate_labels
from sdrpn.models import FamilyAdapter, wrap_model
from sdrpn.models.shapes import SHAPES, build_shape_model
from sdrpn.toyworld.pipeline import (
    TOY_TRAIN,
    as_samples,
    label_scenes,
    load_toy_model,
    open_toy_image,
    toy_aspects,
    toy_label_settings,
    toy_model_dir,
)
from sdrpn.train import TrainSettings, train_rpn

MODES = ("no cache", "empty cache", "full cache")


def shaped_model(name: str) -> FamilyAdapter:
    """A 7B-proportioned model of `sdrpn.models.shapes` (random weights, the toy world's words)."""
    model, processor = build_shape_model(name)
    return wrap_model(model.eval(), processor, name)


def run_prefix_bench(model: str, samples: int, epochs: int, repeats: int, work: Path) -> dict:
    shaped = model in SHAPES
    adapter = shaped_model(model) if shaped else load_toy_model(model)
    labels = work / "labels"
    scenes = as_samples(label_scenes(samples, aspects=toy_aspects(adapter)))
    if shaped:
        settings, training = LabelSettings(max_new_tokens=2, max_box_frac=1.0), TrainSettings(batch_size=4)
    else:
        settings, training = toy_label_settings(toy_model_dir(model)), TOY_TRAIN
    generate_labels(adapter, scenes, labels, settings, batch_size=8, progress=False, open_image=open_toy_image)
    training = replace(training, epochs=float(epochs), grad_accumulation=1, mixed_precision="no")
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    networks = {}
    for _ in range(repeats):
        shutil.rmtree(work / "cache", ignore_errors=True)
        for mode in MODES:
            cache = None if mode == "no cache" else work / "cache"
            start = time.perf_counter()
            networks[mode] = train_rpn(
                adapter, labels, work / "rpn", training, progress=False, open_image=open_toy_image, prefix_cache=cache
            )
            seconds[mode].append(time.perf_counter() - start)
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    reference = networks["no cache"].state_dict()
    return {
        "model": model,
        "samples": samples,
        "epochs": epochs,
        "repeats": repeats,
        "frozen_layers": networks["no cache"].config.frozen_layers,
        "rpn_layers": networks["no cache"].config.rpn_layers,
        "seconds": seconds,
        "median_seconds": median,
        "speedup_full_cache": median["no cache"] / median["full cache"],
        "speedup_empty_cache": median["no cache"] / median["empty cache"],
        "max_weight_difference": max(
            (tensor - reference[name]).abs().max().item()
            for mode in MODES[1:]
            for name, tensor in networks[mode].state_dict().items()
        ),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy", choices=("toy", "toy-qwen", *SHAPES))
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="sdrpn-prefix-bench")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--json", default=None, help="write the result here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_prefix_bench(args.model, args.samples, args.epochs, args.repeats, Path(args.work))
    for mode in MODES:
        per_epoch = result["median_seconds"][mode] / args.epochs
        print(f"{mode:12s} {result['median_seconds'][mode]:7.2f} s per run ({per_epoch:.2f} s per epoch)")
    print(f"speed-up, full cache:  {result['speedup_full_cache']:.2f}x")
    print(f"speed-up, empty cache: {result['speedup_empty_cache']:.2f}x (its first epoch fills the cache)")
    print(f"largest RPN weight difference to no cache: {result['max_weight_difference']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
