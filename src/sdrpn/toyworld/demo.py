"""`sdrpn demo`: the shipped tiny MLLM misses a small detail; SD-RPN finds it, zooms, reads it.

`sdrpn demo --train-rpn` first redoes the whole self-distillation from scratch (labels from the model's
own attention, then RPN training), so the comparison uses an RPN made on this machine.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from sdrpn.overlay import save_overlay
from sdrpn.toyworld import pipeline, world


def run_demo(
    *,
    model: str = "toy",
    out_dir: str | Path = "sdrpn-demo",
    scenes: int = 4,
    eval_scenes: int = 100,
    seed: int | None = None,
    train_rpn: bool = False,
    label_samples: int = 2000,
) -> dict:
    out_dir = Path(out_dir)
    seed = random.randrange(10**6) if seed is None else seed
    started = time.perf_counter()
    if train_rpn:
        adapter = pipeline.load_toy_model(model)
        network = pipeline.self_distill(adapter, out_dir / "self-distillation", samples=label_samples)
        print(f"self-distillation done in {time.perf_counter() - started:.0f} s -> {out_dir / 'self-distillation'}")
    else:
        adapter, network = pipeline.load_toy(model)
    zoom = pipeline.make_zoom(adapter, network)
    print(f"scenes from seed {seed} (reproduce: sdrpn demo --seed {seed})\n")
    aspects = pipeline.toy_aspects(adapter)
    shown = world.make_samples(scenes, seed, qtypes="fine", aspects=aspects)
    base = zoom.ask_batch([s.image for s in shown], [s.question for s in shown], method="base")
    zoomed = zoom.ask_batch([s.image for s in shown], [s.question for s in shown], method="sdrpn")
    for index, (sample, plain, looked) in enumerate(zip(shown, base, zoomed)):
        picture = save_overlay(
            out_dir / f"scene-{index}.png",
            sample.image,
            looked.roi_map,
            looked.geometry,
            looked.boxes,
            show_crops=True,
        )
        print(f"Q: {sample.question}")
        print(
            f"   base: {plain.answer:<8} sdrpn: {looked.answer:<8} truth: {sample.answer:<8} "
            f"looked at {looked.boxes or 'nothing'} -> {picture}"
        )
    table = _accuracy_table(zoom, world.make_samples(eval_scenes, seed + 1, aspects=aspects))
    print(f"\naccuracy on {eval_scenes} more scenes (seed {seed + 1}):\n{table}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s; overlays in {out_dir}/")
    return {"seed": seed}


def _accuracy_table(zoom, samples) -> str:
    runners = pipeline.method_runners()
    chosen = {name: runners[name] for name in ("base", "sdrpn_mask", "oracle_crop")}
    runs = pipeline.run_methods(zoom, samples, chosen, timing_samples=0, progress=False)
    rows = ["| method | fine | coarse | yesno |", "|---|---|---|---|"]
    for name, run in runs.items():
        accuracy = pipeline.accuracy_by_type(samples, run.answers)
        rows.append(f"| {name} | " + " | ".join(f"{100 * accuracy.get(q, 0):.0f}%" for q in world.QTYPES) + " |")
    return "\n".join(rows)
