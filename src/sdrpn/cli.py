"""The `sdrpn` command: parse, call the library, print. Problems a user can fix print one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from sdrpn.errors import SdrpnError
from sdrpn.files import atomic_write_json

DTYPES = ("float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch of 0 or -1 tokens is a typo, not a setting)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_device(device: str | None) -> None:
    from sdrpn.models import check_device

    check_device(device)


def check_output_file(path: str | None, option: str) -> None:
    """A file the command will write: not a directory, under a writable folder (missing folders are made)."""
    if path is None:
        return
    target = Path(path)
    if not str(path).strip():
        raise SdrpnError(f"{option} is empty")
    if target.is_dir():
        raise SdrpnError(f"{option} '{path}' is a directory; give a file name")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:  # missing folders are made when writing
        folder = folder.parent
    if not folder.is_dir():
        raise SdrpnError(f"{option} '{path}': '{folder}' is not a folder")
    if not os.access(folder, os.W_OK):
        raise SdrpnError(f"{option} '{path}': folder '{folder}' is not writable")


def check_output_folder(path: str, option: str = "--out") -> None:
    """A folder the command will fill: it may exist (to resume) but must not be a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise SdrpnError(f"{option} '{path}' is a file, not a folder")


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="hub name (Qwen/Qwen2.5-VL-7B-Instruct), local directory, or 'toy'"
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default float32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where it loads)")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit to pin the model to")
    parser.add_argument(
        "--prompt-style",
        default=None,
        help="LLaVA-1.5: vicuna_v1 (the released prompt, default for the known checkpoints) or chat_template",
    )
    parser.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help="Qwen2.5-VL: fewest pixels an image is resized to (default: 576x28x28)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="Qwen2.5-VL: most pixels an image is resized to (default: 576x28x28)",
    )


def _load_adapter(args):
    import torch

    from sdrpn.models import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(
        args.model,
        dtype=dtype,
        device=args.device,
        revision=args.revision,
        prompt_style=args.prompt_style,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )


def _add_vicrop_high_res(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vicrop-high-res",
        action="store_true",
        help="vicrop: stitch the map from tiles of at most 1024 px height (ViCrop's rel_att_high)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrpn", description="Self-distilled region proposal for multimodal LLMs.")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    label = commands.add_parser("label", help="pseudo-labels from the model's own answer->image attention")
    _add_model(label)
    label.add_argument("--data", required=True, help="LLaVA instruction JSON or JSONL of {image, question}")
    label.add_argument("--out", required=True, help="label folder (re-running resumes)")
    label.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the data's)")
    label.add_argument(
        "--source",
        default=None,
        help="keep only these image folders of the data, e.g. 'gqa,ocr_vqa' (the released labels' sources)",
    )
    label.add_argument(
        "--answers",
        choices=("model", "dataset"),
        default="model",
        help="label from the model's own answers (the paper's) or the data's answers (the paper's ablation)",
    )
    label.add_argument("--max-samples", type=positive_int, default=None, help="seeded random subset (e.g. 10000)")
    label.add_argument("--seed", type=int, default=0)
    label.add_argument("--batch-size", type=positive_int, default=4)
    label.add_argument("--shard-size", type=positive_int, default=256)
    label.add_argument(
        "--label-heads",
        "--layers",
        default=None,
        help="label layers:heads, e.g. '14:24,13,26;15', a named set of the model ('text-rich', 'natural'), or "
        "a heads.json written by sdrpn heads; default: the model's",
    )
    label.add_argument("--sink-rule", choices=("norm", "attention", "none"), default=None, help="default: the model's")
    label.add_argument("--sink-threshold", type=float, default=None, help="attention sink rule threshold")
    label.add_argument(
        "--queries",
        choices=("answer", "prompt+answer"),
        default=None,
        help="rows averaged: the generated tokens (released, default) or also the last prompt token",
    )
    label.add_argument(
        "--head-weighting",
        choices=("head", "layer"),
        default=None,
        help="every listed head weighs the same (released, default) or every layer does",
    )
    label.add_argument("--tau-norm", type=float, default=None, help="sink norm threshold (default: median + 5 MAD)")
    label.add_argument("--fg", type=float, default=0.2)
    label.add_argument("--bg", type=float, default=0.1)
    label.add_argument("--max-box-frac", type=float, default=0.5)
    label.add_argument("--max-new-tokens", type=positive_int, default=128)
    label.add_argument(
        "--force", action="store_true", help="add the samples of another data file to an existing label folder"
    )

    train = commands.add_parser("train", help="train the RPN on a label folder")
    _add_model(train)
    train.add_argument("--labels", required=True)
    train.add_argument("--out", required=True, help="RPN checkpoint folder")
    train.add_argument("--frozen-layers", "-B", type=int, default=None, help="B (default: the model's)")
    train.add_argument("--rpn-layers", "-R", type=int, default=None, help="R (default: 3)")
    train.add_argument("--lr", type=float, default=None, help="default: the family's (LLaVA-1.5 5e-5, Qwen 1e-4)")
    train.add_argument("--batch-size", type=positive_int, default=8)
    train.add_argument(
        "--grad-accumulation",
        type=positive_int,
        default=None,
        help="batches per update (default: reach the family's effective batch, LLaVA-1.5 512, Qwen 128)",
    )
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-samples", type=positive_int, default=None)
    train.add_argument("--max-steps", type=positive_int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints")
    train.add_argument(
        "--mixed-precision",
        choices=("auto", "bf16", "fp16", "no"),
        default="auto",
        help="auto: bf16 on a GPU that has it (released), else no; fp16 needs a GPU",
    )
    train.add_argument(
        "--cache-prefix",
        default=None,
        metavar="DIR",
        help="keep the frozen layers' output of every sample here (on disk, memory-mapped): epochs after the "
        "first run only the RPN's layers",
    )
    train.add_argument("--target", choices=("labels", "labels-no-sinks", "raw-mse"), default="labels")
    train.add_argument(
        "--final-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a trainable copy of the final norm in the RPN's head (default: the family's; LLaVA-1.5 yes, as released)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT")

    ask = commands.add_parser("ask", help="answer a question about an image, zooming where the RPN points")
    _add_model(ask)
    ask.add_argument("--rpn", default=None, help="RPN checkpoint folder, or 'toy' (needed for --method sdrpn)")
    ask.add_argument("--image", required=True)
    ask.add_argument("--question", required=True)
    ask.add_argument(
        "--method", default=None, help="sdrpn, base, raw-attention or vicrop (default: sdrpn with --rpn, else base)"
    )
    ask.add_argument("--upscale", choices=("mask", "box"), default="mask")
    ask.add_argument("--tau", type=float, default=None, help="RoI threshold in (0, 1) (default: the model's)")
    ask.add_argument(
        "--task", default=None, help="released per-benchmark threshold: textvqa, docvqa, infovqa, chartqa, pope, ..."
    )
    ask.add_argument(
        "--window",
        type=float,
        default=None,
        help="crop a square of this many tokens centred on each region's mass (0 = the region's token box)",
    )
    ask.add_argument(
        "--no-prune",
        action="store_true",
        help="keep every token of a high-resolution image in stage 2 (Qwen2.5-VL prunes above 1024 tokens)",
    )
    ask.add_argument("--max-new-tokens", type=positive_int, default=128)
    _add_vicrop_high_res(ask)
    ask.add_argument("--save-overlay", default=None, help="write a PNG of the image, RoI map and boxes")
    ask.add_argument(
        "--overlay-crops", action="store_true", help="add a strip of the cropped regions to the overlay's right"
    )
    ask.add_argument("--json", action="store_true", help="print the whole result as JSON")

    heads = commands.add_parser("heads", help="rank every head by how well its attention localises; pick label heads")
    _add_model(heads)
    heads.add_argument("--data", required=True, help="JSON/JSONL of {image, question}; an optional box scores heads")
    heads.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the data's)")
    heads.add_argument("--samples", type=positive_int, default=64, help="seeded random sample the model answers")
    heads.add_argument("--seed", type=int, default=0)
    heads.add_argument("--out", default="heads.json", help="head list for --label-heads (a heat map PNG beside it)")
    heads.add_argument("--top", type=positive_int, default=8, help="most heads to pick")
    heads.add_argument("--min-layer", type=int, default=0, help="lowest layer heads are picked from")
    heads.add_argument(
        "--rpn",
        default=None,
        help="RPN folder (or 'toy') whose RoI settings and label thresholds labels are weighed by (default: the "
        "model's RoI rule, sdrpn label's thresholds)",
    )
    heads.add_argument(
        "--queries",
        choices=("answer", "prompt+answer"),
        default=None,
        help="rows averaged, as in sdrpn label (default: the model's)",
    )
    heads.add_argument("--batch-size", type=positive_int, default=4)
    heads.add_argument("--max-new-tokens", type=positive_int, default=32)
    heads.add_argument("--show", type=int, default=20, help="table rows printed")
    heads.add_argument(
        "--validate",
        type=int,
        default=0,
        help="make labels and train an RPN for each of the K best candidate head sets, pick the one whose RPN puts "
        "a stage-1 region on the box most often (0: off)",
    )
    heads.add_argument("--train-data", default=None, help="--validate: JSON/JSONL the labels and RPNs are made from")
    heads.add_argument("--train-samples", type=positive_int, default=None, help="--validate: seeded subset of it")
    heads.add_argument("--work", default="heads-work", help="--validate: labels and RPNs, one folder per candidate")

    commands.add_parser("selftest", help="label, train and ask end to end on a tiny offline model (~1 min)")

    demo = commands.add_parser("demo", help="the shipped tiny MLLM with and without SD-RPN on fresh toy scenes")
    demo.add_argument("--model", choices=("toy", "toy-qwen"), default="toy", help="which shipped toy model")
    demo.add_argument("--train-rpn", action="store_true", help="redo the self-distillation from scratch first")
    demo.add_argument("--scenes", type=int, default=4)
    demo.add_argument("--eval-scenes", type=positive_int, default=100)
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--label-samples", type=positive_int, default=2000)
    demo.add_argument("--out", default="sdrpn-demo", help="folder for overlays (and the retrained RPN)")

    bench = commands.add_parser("bench", help="benchmarks")
    bench.add_argument(
        "suite",
        choices=("toy", "speed"),
        help="toy: the synthetic fine-detail world; speed: time per answer of every method (--model toy, toy-qwen, "
        "llava7b-shape, qwen7b-shape or a checkpoint with --rpn)",
    )
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--n", type=positive_int, default=300)
    bench.add_argument("--json", default=None, help="write the results here")
    bench.add_argument("--work", default="sdrpn-bench", help="resumable work folder")
    bench.add_argument(
        "--model", default="toy", help="a shipped toy model (toy, toy-qwen) or a toy MLLM folder made by a recipe"
    )
    bench.add_argument(
        "--rpn", default=None, help="RPN to benchmark (default: the shipped one; for --model, one self-distilled first)"
    )
    bench.add_argument("--label-samples", type=positive_int, default=2000)
    bench.add_argument("--sweep", default="250,1000", help="data sizes for the sweep ('' to skip)")
    bench.add_argument(
        "--rpn-seeds", default="1,2", help="train the SD-RPN again with these seeds, to show the spread ('' to skip)"
    )
    bench.add_argument("--no-ablations", action="store_true")
    bench.add_argument("--timing-samples", type=int, default=40)
    bench.add_argument(
        "--binding", type=int, default=0, help="also N scenes of three objects, the target named by colour (0 = skip)"
    )
    bench.add_argument(
        "--released",
        action="store_true",
        help="also the released code's label queries, stage 2 and stage 1 + 2 against the toy's own settings",
    )
    bench.add_argument("--batch", default="1", help="speed: batch sizes, comma-separated (e.g. 1,8)")
    bench.add_argument("--new-tokens", type=positive_int, default=8, help="speed: tokens decoded per answer")
    bench.add_argument(
        "--samples",
        type=positive_int,
        default=2,
        help="speed: questions each variant answers (--pieces: calls of each piece)",
    )
    bench.add_argument("--device", default=None, help="speed: cpu, cuda, ...")
    bench.add_argument(
        "--pieces", action="store_true", help="speed: time each piece of one answer (base and SD-RPN mask) instead"
    )
    evaluate = commands.add_parser("eval", help="score methods on benchmarks (official metrics) with throughput")
    _add_model(evaluate)
    evaluate.add_argument(
        "--rpn",
        default=None,
        help="RPN checkpoint folder (needed for --method sdrpn; a shipped toy model's by default)",
    )
    evaluate.add_argument(
        "--bench",
        required=True,
        help="comma-separated: textvqa, docvqa, infovqa, chartqa, ocrbench, pope, vstar, "
        "hrbench4k, hrbench8k, jsonl, toy",
    )
    evaluate.add_argument("--data-root", default=None, help="folder holding one folder per benchmark (<root>/textvqa/)")
    evaluate.add_argument("--method", default="base,sdrpn", help="comma-separated: base, sdrpn, vicrop, raw-attention")
    evaluate.add_argument(
        "--task-presets", action="store_true", help="the model family's per-benchmark RoI threshold (released tau)"
    )
    evaluate.add_argument("--limit", type=positive_int, default=None, help="the first N samples of each benchmark")
    evaluate.add_argument("--batch-size", type=positive_int, default=1, help="samples per forward (the paper: 1)")
    evaluate.add_argument("--seed", type=int, default=7, help="toy benchmark: the scenes' seed")
    _add_vicrop_high_res(evaluate)
    evaluate.add_argument("--out", default="sdrpn-eval", help="results folder (re-running resumes)")
    return parser


def cmd_label(args) -> int:
    from sdrpn.data import file_fingerprint, read_samples, shuffled_subset
    from sdrpn.distributed import process_device, run_state
    from sdrpn.labeling import LabelSettings, generate_labels

    settings = LabelSettings(
        label_heads=label_heads_option(args.label_heads) if args.label_heads else None,
        sink_rule=args.sink_rule,
        sink_threshold=args.sink_threshold,
        queries=args.queries,
        head_weighting=args.head_weighting,
        answers=args.answers,
        tau_norm=args.tau_norm,
        fg=args.fg,
        bg=args.bg,
        max_box_frac=args.max_box_frac,
        max_new_tokens=args.max_new_tokens,
    )
    check_output_folder(args.out)
    _check_device(args.device)
    args.device = process_device(args.device)
    sources = [part.strip() for part in args.source.split(",") if part.strip()] if args.source else None
    report = read_samples(args.data, args.image_root, sources=sources)
    samples = shuffled_subset(report.samples, args.max_samples, args.seed)
    adapter = _load_adapter(args)
    result = generate_labels(
        adapter,
        samples,
        args.out,
        settings,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        data=file_fingerprint(args.data),
        force=args.force,
        image_root=report.root,
    )
    if not run_state().is_main_process:  # every process holds the whole run's report: one prints it
        return 0
    bad = report.bad + result.bad
    for reason in bad:
        print(f"skipped: {reason}", file=sys.stderr)
    print(
        f"labelled {result.labelled}, already done {result.skipped_done}, bad {len(bad)}, "
        f"dropped (foreground box too large) {result.dropped} -> {args.out}"
    )
    return 0


def label_heads_option(text: str):
    """--label-heads: a file written by `sdrpn heads`, or layers:heads / a head set's name."""
    from sdrpn.labeling import label_heads_from_text

    if text.strip().lower().endswith(".json"):
        from sdrpn.heads import read_head_list

        return read_head_list(text)
    return label_heads_from_text(text)


def cmd_heads(args) -> int:
    from sdrpn.data import read_samples, shuffled_subset
    from sdrpn.heads import (
        collect_maps,
        distillation_rule,
        format_table,
        rank_heads,
        validate_candidates,
        write_ranking,
    )
    from sdrpn.shipped import shipped_name

    check_output_file(args.out, "--out")
    _check_device(args.device)
    train_samples = _validation_samples(args)
    report = read_samples(args.data, args.image_root)
    samples = shuffled_subset(report.samples, args.samples, args.seed)
    if not samples:
        first = f" (first: {report.bad[0]})" if report.bad else ""
        raise SdrpnError(f"no usable sample in '{args.data}'{first}")
    if args.validate and any(s.box is None for s in samples):
        raise SdrpnError("--validate needs a target box on every sample of --data (RPNs are scored on them)")
    adapter = _load_adapter(args)
    queries = args.queries or adapter.defaults().label_queries
    maps, bad = collect_maps(
        adapter,
        samples,
        queries=queries,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    for reason in report.bad + bad:
        print(f"skipped: {reason}", file=sys.stderr)
    if not maps:
        raise SdrpnError(f"every one of the {len(samples)} samples failed (first: {bad[0]})")
    if len(maps) < args.samples:
        print(f"note: ranked on {len(maps)} samples, fewer than the {args.samples} asked", file=sys.stderr)
    rule = distillation_rule(adapter, args.rpn, queries, args.max_new_tokens)
    ranking = rank_heads(maps, top=args.top, min_layer=args.min_layer, roi=rule.roi, labels=rule.thresholds)
    if args.validate:
        boxed = [s for s in samples if s.sample_id in {m.sample_id for m in maps}]
        ranking = validate_candidates(
            adapter,
            ranking,
            args.validate,
            train_samples,
            boxed,
            args.work,
            rule.labels,
            rule.training,
            batch_size=args.batch_size,
        )
        for v in ranking.validated:
            heads = " ".join(f"{layer}:{head}" for layer, head in v.heads)
            print(f"validated {heads}: region on box {v.region_on_box:.1%}, no region {v.no_region:.1%} ({v.rpn})")
    model = shipped_name(adapter.name_or_path) or adapter.name_or_path  # 'toy', not this machine's install path
    json_path, picture = write_ranking(ranking, args.out, model, queries, args.samples)
    print(format_table(ranking, args.show))
    label_heads = ";".join(f"{layer}:{','.join(map(str, heads))}" for layer, heads in ranking.label_heads.items())
    peak = ""
    if ranking.with_boxes:
        peak = (
            f"; their label map peaks on the box in {ranking.peak_on_box:.0%}, stage 1 keeps clean regions on it "
            f"in {ranking.clean_on_box:.0%}"
        )
    print(f"picked (*): {label_heads}{peak} -> {json_path} (heat map {picture})")
    print(f"use: sdrpn label --label-heads {json_path} --queries {queries} ...")
    return 0


def _validation_samples(args) -> list:
    """--validate's training samples (checked before the model answers anything), or [] when it is off."""
    from sdrpn.data import read_samples, shuffled_subset

    if args.validate < 0:
        raise SdrpnError(f"--validate must be 0 (off) or a number of candidates, got {args.validate}")
    if not args.validate:
        if args.train_data or args.train_samples:
            raise SdrpnError("--train-data and --train-samples are options of --validate K")
        return []
    if not args.train_data:
        raise SdrpnError("--validate needs --train-data (the samples labels and RPNs are made from)")
    check_output_folder(args.work, "--work")
    report = read_samples(args.train_data)  # image paths relative to the training file's folder
    samples = shuffled_subset(report.samples, args.train_samples, args.seed)
    if not samples:
        first = f" (first: {report.bad[0]})" if report.bad else ""
        raise SdrpnError(f"no usable sample in --train-data '{args.train_data}'{first}")
    return samples


def cmd_train(args) -> int:
    from sdrpn.distributed import process_device, run_state
    from sdrpn.train import TrainSettings, train_rpn

    settings = TrainSettings(
        frozen_layers=args.frozen_layers,
        rpn_layers=args.rpn_layers,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accumulation=args.grad_accumulation,
        epochs=args.epochs,
        max_samples=args.max_samples,
        seed=args.seed,
        save_every=args.save_every,
        mixed_precision=args.mixed_precision,
        target=args.target,
        final_norm=args.final_norm,
    )
    check_output_folder(args.out)
    if args.cache_prefix:
        check_output_folder(args.cache_prefix, "--cache-prefix")
    _check_device(args.device)
    args.device = process_device(args.device)
    adapter = _load_adapter(args)
    rpn = train_rpn(
        adapter,
        args.labels,
        args.out,
        settings,
        resume=args.resume,
        max_steps=args.max_steps,
        prefix_cache=args.cache_prefix,
    )
    if run_state().is_main_process:
        print(f"RPN (B={rpn.config.frozen_layers}, R={rpn.config.rpn_layers}) saved to {args.out}")
    return 0


def cmd_ask(args) -> int:
    from sdrpn.images import load_image
    from sdrpn.infer import load
    from sdrpn.overlay import save_overlay

    _check_device(args.device)
    if args.vicrop_high_res and args.method != "vicrop":
        raise SdrpnError("--vicrop-high-res is an option of --method vicrop")
    check_output_file(args.save_overlay, "--save-overlay")
    image = load_image(args.image)
    adapter = _load_adapter(args)
    zoom = load(
        adapter,
        args.rpn,
        method=args.method,
        upscale=args.upscale,
        tau=args.tau,
        task=args.task,
        window=args.window,
        max_new_tokens=args.max_new_tokens,
        prune=not args.no_prune,
        vicrop_high_res=args.vicrop_high_res,
    )
    result = zoom.ask(image, args.question)
    for warning in result.warnings:
        print(f"sdrpn ask: warning: {warning}", file=sys.stderr)
    if args.save_overlay:
        save_overlay(
            args.save_overlay, image, result.roi_map, result.geometry, result.boxes, show_crops=args.overlay_crops
        )
    if args.json:
        print(json.dumps({**result.to_json(), "overlay": args.save_overlay}, indent=2))
    else:
        print(result.answer)
        print(
            f"method {result.method}, boxes {result.boxes}, extra visual tokens {result.extra_tokens}, "
            + (f"pruned image tokens {result.pruned_tokens}, " if result.pruned_tokens else "")
            + f"{result.timings['total'] * 1000:.0f} ms",
            file=sys.stderr,
        )
    return 0


def cmd_selftest(args) -> int:
    from sdrpn.selftest import run_selftest

    return run_selftest()


def cmd_demo(args) -> int:
    from sdrpn.toyworld.demo import run_demo

    run_demo(
        model=args.model,
        out_dir=args.out,
        scenes=args.scenes,
        eval_scenes=args.eval_scenes,
        seed=args.seed,
        train_rpn=args.train_rpn,
        label_samples=args.label_samples,
    )
    return 0


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise SdrpnError(f"{option} takes comma-separated integers, got {text!r}") from None


def cmd_bench(args) -> int:
    if args.suite == "speed":
        return cmd_bench_speed(args)
    from sdrpn.toyworld.bench import format_table, run_toy_bench

    sweep = _int_list(args.sweep, "--sweep")
    rpn_seeds = _int_list(args.rpn_seeds, "--rpn-seeds")
    result = run_toy_bench(
        seed=args.seed,
        n=args.n,
        work_dir=args.work,
        model=args.model,
        rpn=args.rpn,
        label_samples=args.label_samples,
        sweep=sweep,
        rpn_seeds=rpn_seeds,
        ablations=not args.no_ablations,
        timing_samples=args.timing_samples,
        binding=args.binding,
        released=args.released,
    )
    print(format_table(result))
    print(f"SD-RPN RoI stage / ViCrop RoI stage: {result['roi_stage_cost_sdrpn_over_vicrop']}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_eval(args) -> int:
    from sdrpn.evaluation.runner import EvalSettings, evaluate
    from sdrpn.shipped import SHIPPED

    settings = EvalSettings(
        benchmarks=_names(args.bench),
        methods=_names(args.method),
        out=args.out,
        data_root=args.data_root,
        task_presets=args.task_presets,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        vicrop_high_res=args.vicrop_high_res,
    )
    _check_device(args.device)
    rpn = args.model if args.rpn is None and args.model in SHIPPED else args.rpn  # a shipped toy comes with its RPN
    evaluate(_load_adapter(args), rpn, settings)
    print((Path(args.out) / "table.md").read_text(), end="")
    print(f"predictions, summary.json and table.md in {args.out}", file=sys.stderr)
    return 0


def cmd_bench_speed(args) -> int:
    from sdrpn.benchmark_speed import format_pieces, format_speed_table, run_pieces, run_speed_bench, targets

    if args.pieces:
        result = run_pieces(
            args.model, args.rpn, new_tokens=args.new_tokens, repeats=args.samples, seed=args.seed, device=args.device
        )
        print(format_pieces(result))
        if args.json:
            atomic_write_json(args.json, result)
        return 0
    batch_sizes = _int_list(args.batch, "--batch")
    if not batch_sizes or min(batch_sizes) < 1:
        raise SdrpnError(f"--batch takes positive batch sizes, got {args.batch!r}")
    result = run_speed_bench(
        args.model,
        args.rpn,
        batch_sizes=batch_sizes,
        new_tokens=args.new_tokens,
        samples=args.samples,
        seed=args.seed,
        device=args.device,
    )
    result["targets"] = {str(size): targets(result, size) for size in batch_sizes}
    print(format_speed_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


COMMANDS = {
    "label": cmd_label,
    "train": cmd_train,
    "ask": cmd_ask,
    "heads": cmd_heads,
    "selftest": cmd_selftest,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "eval": cmd_eval,
}


def main(argv: list[str] | None = None) -> int:
    """Any failure ends in one line naming the problem: 2 for bad input or settings, 1 for anything else
    (`--debug` shows the traceback)."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except SdrpnError as error:
        if args.debug:
            traceback.print_exc()
        print(f"sdrpn {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdrpn {args.command}: interrupted (finished work is saved; re-run to resume)", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence: never a traceback unless asked
        if args.debug:
            traceback.print_exc()
        print(
            f"sdrpn {args.command}: error: {type(error).__name__}: {_one_line(error)} (--debug shows where)",
            file=sys.stderr,
        )
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _quiet_libraries() -> None:
    """Only the CLI configures logging: keep transformers' notices out of the user's terminal."""
    import logging
    import warnings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
