"""`sdrpn heads` on the toy world, against the recipe's hand rule for label layers.

    python -m sdrpn.toyworld.heads_check export --model toy --n 64 --seed 3000 --out toy-heads-data
    sdrpn heads --model toy --data toy-heads-data/data.jsonl --queries prompt+answer --max-new-tokens 4 --out heads.json
    python -m sdrpn.toyworld.heads_check compare --model toy --heads heads.json --n 1000 --seed 5000
    python -m sdrpn.toyworld.heads_check distill --model toy --heads heads.json --out heads-rpn
    python -m sdrpn.toyworld.heads_check bench --model toy --rpn heads-rpn/rpn --n 300 --seed 7
    python -m sdrpn.toyworld.heads_check predict --model toy --rpn heads-rpn/rpn toy --n 300 --seed 99
    python -m sdrpn.toyworld.heads_check export --model toy --n 2000 --seed 1000 --out toy-train   # distill's scenes
    sdrpn heads ... --rpn toy --validate 4 --train-data toy-train/data.jsonl --work heads-work   # RPNs decide

`export` writes toy scenes as PNG files and a JSONL with each target's box, so the ranking runs through the same
command as for any data (`--qtype fine`: fine questions only). `compare` answers fresh scenes once and measures how
often the label map (the heads' maps averaged alike, sinks zeroed by the paper's norm rule, as labels are made)
peaks on the target, and what labels it gives (dropped samples, foreground tokens and their share on the target, the
shares of the target's tokens labelled foreground, ignored and background, the labels' certainty on the target, and
how often stage 1 keeps a region on the target when the foreground is taken as the RPN's map:
`sdrpn.heads.stage_one_on_box` with the toy's RoI settings), for the recipe's label layers
(`label_layers_from_recipe`) and for the heads in the file. `distill` self-distils an RPN from the file's heads with
everything else as the shipped RPN was made (`sdrpn demo --train-rpn`). `bench` runs SD-RPN (masked upscaling, the
toy's RoI settings) with that RPN and with the shipped one on the scenes `sdrpn bench toy` uses for the same seed
and size. `predict` shows where RPNs look on the fine questions of those scenes, without answering.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from sdrpn.data import Sample
from sdrpn.files import atomic_write
from sdrpn.heads import (
    SampleMaps,
    box_tokens,
    collect_maps,
    label_map_peaks_on_box,
    read_head_list,
    sample_labels,
    stage_one_on_box,
)
from sdrpn.labeling import LabelSettings
from sdrpn.models.base import LayerHeads
from sdrpn.rpn import load_rpn
from sdrpn.shipped import resolve, shipped_dir
from sdrpn.toyworld import pipeline, world


def toy_samples_with_boxes(samples: list[world.ToySample]) -> list[Sample]:
    return [replace(s, box=tuple(map(float, t.target_box))) for s, t in zip(pipeline.as_samples(samples), samples)]


def export(model: str, n: int, seed: int, out: Path, qtype: str | None = None) -> Path:
    """Scenes as PNGs plus data.jsonl of {id, image, question, answer, box}; `qtype` keeps one question type (the
    fine questions are the ones the RPN is for)."""
    adapter = pipeline.load_toy_model(model)
    lines = []
    scenes = world.make_samples(n, seed, qtypes=qtype, aspects=pipeline.toy_aspects(adapter))
    for index, sample in enumerate(scenes):
        name = f"scene-{index:04d}.png"
        atomic_write(out / name, lambda file, image=sample.image: image.save(file, format="PNG"))
        record = {"id": pipeline.toy_reference(sample), "image": name, "question": sample.question}
        lines.append(json.dumps({**record, "answer": sample.answer, "box": list(sample.target_box)}))
    return atomic_write(out / "data.jsonl", lambda file: file.write(("\n".join(lines) + "\n").encode()))


def hand_rule_heads(model: str, num_heads: int) -> list[tuple[int, int]]:
    layers = pipeline.label_layers_from_recipe(pipeline.toy_model_dir(model))
    return [(layer, head) for layer in layers for head in range(num_heads)]


def as_pairs(label_heads: LayerHeads, num_heads: int) -> list[tuple[int, int]]:
    return [(layer, head) for layer, heads in label_heads.items() for head in (heads or range(num_heads))]


def compare(model: str, heads_files: list[Path], n: int, seed: int, prompt_row: bool = False) -> dict:
    """Label-map peak on the target: the recipe's label layers against each file's heads, on fresh scenes.
    `prompt_row`: the maps of the question's last token alone (the prefill row, no answer token), the position the
    RPN predicts from."""
    adapter = pipeline.load_toy_model(model)
    toy = world.make_samples(n, seed, aspects=pipeline.toy_aspects(adapter))
    settings = pipeline.toy_label_settings(pipeline.toy_model_dir(model))
    maps, bad = collect_maps(
        adapter,
        toy_samples_with_boxes(toy),
        queries="prompt+answer" if prompt_row else settings.queries,
        max_new_tokens=1 if prompt_row else settings.max_new_tokens,
        batch_size=32,
        open_image=pipeline.open_toy_image,
    )
    qtypes = {pipeline.toy_reference(t): t.qtype for t in toy}
    fine = [m for m in maps if qtypes[m.sample_id] == "fine"]
    num_heads = adapter.attention_shape.num_heads
    chosen = {"recipe rule": hand_rule_heads(model, num_heads)}
    for path in heads_files:
        chosen["sdrpn heads" if len(heads_files) == 1 else str(path)] = as_pairs(read_head_list(path), num_heads)
    return {
        "model": model,
        "seed": seed,
        "queries": "prompt row" if prompt_row else settings.queries,
        "scenes": len(maps),
        "fine_scenes": len(fine),
        "failed": len(bad),
        "peak_on_target": {
            name: {
                "heads": " ".join(f"{layer}:{head}" for layer, head in pairs),
                "all": round(label_map_peaks_on_box(maps, pairs), 4),
                "fine": round(label_map_peaks_on_box(fine, pairs), 4),
                "labels": label_statistics(maps, pairs, settings),
                "labels_fine": label_statistics(fine, pairs, settings),
                "stage_one": asdict(stage_one_on_box(maps, pairs, pipeline.TOY_ROI, settings)),
                "stage_one_fine": asdict(stage_one_on_box(fine, pairs, pipeline.TOY_ROI, settings)),
            }
            for name, pairs in chosen.items()
        },
    }


def label_statistics(maps: list[SampleMaps], heads: list[tuple[int, int]], settings: LabelSettings) -> dict:
    """The labels these heads give: how many samples are dropped, how many foreground tokens the others have, which
    share of those lies on the target's box, and how the target's own tokens are labelled (foreground, ignored,
    background; `target_certainty` is the foreground share of the target's labelled tokens over all kept samples,
    the rate an RPN that cannot tell one target token from another is taught for them)."""
    foreground, on_box, dropped = [], [], 0
    box_split = {"foreground": [], "ignored": [], "background": []}
    target_fg = target_bg = 0
    for sample in maps:
        labels = sample_labels(sample, heads, settings)
        if (labels == -1).all():
            dropped += 1
            continue
        is_fg = labels == 1
        foreground.append(int(is_fg.sum()))
        on_box.append(float((is_fg & sample.box).sum() / is_fg.sum()))
        for name, value in (("foreground", 1), ("ignored", -1), ("background", 0)):
            box_split[name].append(float(((labels == value) & sample.box).sum() / sample.box.sum()))
        target_fg += int((is_fg & sample.box).sum())
        target_bg += int(((labels == 0) & sample.box).sum())
    kept = max(len(foreground), 1)
    return {
        "dropped": dropped,
        "mean_foreground_tokens": round(sum(foreground) / kept, 3),
        "foreground_share_on_box": round(sum(on_box) / kept, 4),
        "box_share_labelled_background": round(sum(box_split["background"]) / kept, 4),
        "box_share_labelled_foreground": round(sum(box_split["foreground"]) / kept, 4),
        "box_share_ignored": round(sum(box_split["ignored"]) / kept, 4),
        "target_certainty": round(target_fg / max(target_fg + target_bg, 1), 4),
    }


def distill(
    model: str, heads_file: Path, out: Path, samples: int = 2000, train_seed: int = 0, labels: Path | None = None
):
    """The shipped RPN's self-distillation (`sdrpn demo --train-rpn`) with the file's label heads, heads alike;
    `train_seed` other than the shipped 0 measures the spread between RPNs of one pick, `labels` reuses a label
    folder made before (the samples already labelled there are skipped)."""
    adapter = pipeline.load_toy_model(model)
    settings = replace(
        pipeline.toy_label_settings(pipeline.toy_model_dir(model)),
        label_heads=read_head_list(heads_file),
        head_weighting="head",
    )
    training = replace(pipeline.TOY_TRAIN, seed=train_seed)
    return pipeline.self_distill(
        adapter, out, samples=samples, label_settings=settings, train_settings=training, label_dir=labels
    )


def bench(model: str, rpn: Path, n: int, seed: int) -> dict:
    """Accuracy per question type of SD-RPN with the given RPN and with the shipped one, on the same scenes (each
    printed as soon as it is measured)."""
    adapter = pipeline.load_toy_model(model)
    samples = world.make_samples(n, seed, aspects=pipeline.toy_aspects(adapter))
    runner = {"sdrpn_mask": pipeline.method_runners()["sdrpn_mask"]}
    result = {"model": model, "seed": seed, "n": n}
    for name, folder in (("RPN from sdrpn heads", rpn), ("shipped RPN", shipped_dir("rpn", model))):
        zoom = pipeline.make_zoom(adapter, load_rpn(folder, adapter))
        runs = pipeline.run_methods(zoom, samples, runner, timing_samples=0)
        result[name] = pipeline.accuracy_by_type(samples, runs["sdrpn_mask"].answers)
        print(json.dumps({name: result[name]}), flush=True)
    return result


def predict(model: str, rpns: list[Path], n: int, seed: int) -> dict:
    """What each RPN predicts on the fine questions of the bench scenes (no answers generated): how often stage 1
    (the toy's RoI settings) keeps no region or one on the target, how often the RPN's map peaks on the target,
    and its peak probability overall and on the target."""
    adapter = pipeline.load_toy_model(model)
    fine = [s for s in world.make_samples(n, seed, aspects=pipeline.toy_aspects(adapter)) if s.qtype == "fine"]
    result = {"model": model, "seed": seed, "n": n, "fine_scenes": len(fine)}
    for folder in rpns:
        zoom = pipeline.make_zoom(adapter, load_rpn(resolve(str(folder), "rpn"), adapter))
        counts = {"no_region": 0, "region_on_target": 0, "peak_on_target": 0, "max_p": 0.0, "max_p_on_target": 0.0}
        for chunk in pipeline._batched(fine, pipeline.ACCURACY_BATCH):
            predictions = zoom.predict_roi([s.image for s in chunk], [s.question for s in chunk])
            for sample, prediction in zip(chunk, predictions):
                target = box_tokens(tuple(map(float, sample.target_box)), prediction.geometry).numpy()
                probability = prediction.probability
                counts["no_region"] += prediction.regions.empty
                counts["region_on_target"] += bool((prediction.regions.mask & target).any())
                counts["peak_on_target"] += bool(target.flatten()[probability.argmax()])
                counts["max_p"] += float(probability.max())
                counts["max_p_on_target"] += float(probability[target].max())
        result[str(folder)] = {name: round(value / len(fine), 4) for name, value in counts.items()}
        print(json.dumps({str(folder): result[str(folder)]}), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("export", "compare", "distill", "bench", "predict"))
    parser.add_argument("--model", default="toy", choices=("toy", "toy-qwen"))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=3000)
    parser.add_argument("--heads", type=Path, nargs="+", default=[Path("heads.json")])
    parser.add_argument("--qtype", choices=world.QTYPES, default=None, help="export: one question type only")
    parser.add_argument("--prompt-row", action="store_true", help="compare the maps of the question's last token")
    parser.add_argument("--out", type=Path, default=Path("toy-heads-data"))
    parser.add_argument("--label-samples", type=int, default=2000)
    parser.add_argument("--train-seed", type=int, default=0, help="distill: the RPN's training seed")
    parser.add_argument("--labels", type=Path, default=None, help="distill: a label folder to reuse")
    parser.add_argument("--rpn", type=Path, nargs="+", default=[Path("heads-rpn/rpn")])
    args = parser.parse_args(argv)
    if args.step == "export":
        print(export(args.model, args.n, args.seed, args.out, args.qtype))
    elif args.step == "compare":
        print(json.dumps(compare(args.model, args.heads, args.n, args.seed, args.prompt_row), indent=2))
    elif args.step == "distill":
        distill(args.model, args.heads[0], args.out, args.label_samples, args.train_seed, args.labels)
        print(args.out / "rpn")
    elif args.step == "predict":
        print(json.dumps(predict(args.model, args.rpn, args.n, args.seed), indent=2))
    else:
        print(json.dumps(bench(args.model, args.rpn[0], args.n, args.seed), indent=2))


if __name__ == "__main__":
    main()
