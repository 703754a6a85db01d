"""`sdrpn selftest`: the whole pipeline on a tiny offline LLaVA, in about a minute on a CPU.

It proves the installation works (label -> train -> ask with every method), not that the tiny random
model is any good: its answers are noise.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "what colour is the square red green blue where".split()


def write_image_folder(directory: Path, count: int, seed: int = 0) -> Path:
    """Noisy images with one coloured square, and a JSONL of questions about them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        pixels = rng.integers(0, 60, (96, 128, 3), dtype=np.uint8)
        x, y = rng.integers(0, 100), rng.integers(0, 70)
        pixels[y : y + 24, x : x + 24] = [(220, 30, 30), (30, 200, 30), (30, 30, 220)][index % 3]
        Image.fromarray(pixels).save(directory / f"{index:03d}.png")
        lines.append(json.dumps({"image": f"{index:03d}.png", "question": "what colour is the square ?"}))
    data = directory / "questions.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def run_selftest() -> int:
    from sdrpn.data import read_samples
    from sdrpn.infer import METHODS, load
    from sdrpn.labeling import LabelSettings, generate_labels
    from sdrpn.models import load_model
    from sdrpn.models.tiny import TinyLlavaSpec, build_tiny_llava
    from sdrpn.overlay import save_overlay
    from sdrpn.train import TrainSettings, train_rpn

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdrpn-selftest-") as workdir:
        root = Path(workdir)
        model, processor = build_tiny_llava(TinyLlavaSpec(words=WORDS))
        model.save_pretrained(root / "model")
        processor.save_pretrained(root / "model")
        data = write_image_folder(root / "images", 12)
        adapter = load_model(str(root / "model"))
        samples = read_samples(data).samples
        report = generate_labels(adapter, samples, root / "labels", LabelSettings(max_new_tokens=4), progress=False)
        print(f"label: {report.labelled} samples labelled, {report.dropped} dropped (box too large)")
        train_rpn(adapter, root / "labels", root / "rpn", TrainSettings(batch_size=4, epochs=1), progress=False)
        print("train: RPN saved")
        zoom = load(adapter, str(root / "rpn"), max_new_tokens=4, tau=0.5)
        image = Image.open(samples[0].image_path).convert("RGB")
        for method in METHODS:
            result = zoom.ask(image, samples[0].question, method=method)
            save_overlay(root / f"{method}.png", image, result.roi_map, result.geometry, result.boxes)
            print(
                f"ask --method {method}: {len(result.boxes)} boxes, {result.extra_tokens} extra tokens, "
                f"{result.timings['total'] * 1000:.0f} ms"
            )
    print(f"selftest passed in {time.perf_counter() - started:.1f} s")
    return 0
