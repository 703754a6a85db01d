"""Smoke-runs `sdrpn demo` (incl. --train-rpn) and `sdrpn bench toy` end to end on a small random toy model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from sdrpn.cli import main
from sdrpn.models import load_model
from sdrpn.models.tiny import TinyLlavaSpec, build_tiny_llava
from sdrpn.roi import grid_box_to_pixels
from sdrpn.rpn import RegionProposalNetwork
from sdrpn.toyworld import pipeline, world


@pytest.fixture()
def shipped(tmp_path, monkeypatch):
    """A random tiny LLaVA speaking the toy world's words, and an RPN for it, posing as the shipped pair."""
    model, processor = build_tiny_llava(
        TinyLlavaSpec(image_size=128, words=world.WORDS, text_layers=4, vision_hidden=32, text_hidden=32), seed=3
    )
    model.save_pretrained(tmp_path / "mllm")
    processor.save_pretrained(tmp_path / "mllm")
    attention_log = {"fine": {"teacher": {"top1_hit": [0.9, 0.85, 0.2, 0.1]}}}
    (tmp_path / "mllm" / "recipe.json").write_text(json.dumps({"metrics": {"attention": attention_log}}))
    RegionProposalNetwork(load_model(str(tmp_path / "mllm")), 1, 2).save(tmp_path / "rpn")
    monkeypatch.setattr(pipeline, "shipped_dir", lambda kind, name="toy": tmp_path / kind)
    return tmp_path


FAST_LABELS = pipeline.LabelSettings(label_heads={0: None, 1: None}, max_new_tokens=2, fg=0.9, bg=0.85)


def test_toy_images_round_trip_through_references():
    sample = world.render_sample(11, "fine")
    reference = pipeline.toy_reference(sample)
    assert pipeline.open_toy_image(reference).tobytes() == sample.image.tobytes()
    several = world.render_sample(11, "fine", objects=3)
    assert pipeline.open_toy_image(pipeline.toy_reference(several)).tobytes() == several.image.tobytes()
    mixed = pipeline.label_scenes(8, seed=3, binding_frac=0.25)
    assert [s.attrs["objects"] for s in mixed] == [1] * 6 + [3] * 2
    wide = world.render_sample(11, "fine", aspect=(16, 9))
    assert pipeline.toy_reference(wide).endswith(":1:16x9")
    assert pipeline.open_toy_image(pipeline.toy_reference(wide)).tobytes() == wide.image.tobytes()
    shapes = {s.image.size for s in pipeline.label_scenes(5, seed=3, aspects=world.ASPECTS)}
    assert len(shapes) == 5  # every aspect ratio of the world


def test_dynamic_resolution_toy_models_see_every_aspect_ratio(llava_adapter):
    from tests.conftest import build_tiny

    assert pipeline.toy_aspects(llava_adapter) is None
    model, processor = build_tiny("qwen")
    from sdrpn.models import wrap_model

    assert pipeline.toy_aspects(wrap_model(model, processor, "q")) == world.ASPECTS


def test_demo_runs_and_writes_overlays(shipped, tmp_path, capsys):
    assert main(["demo", "--scenes", "2", "--eval-scenes", "6", "--seed", "5", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and "| sdrpn_mask |" in out and "| oracle_crop |" in out
    assert (tmp_path / "demo" / "scene-0.png").is_file() and (tmp_path / "demo" / "scene-1.png").is_file()


def test_demo_train_rpn_redoes_self_distillation(shipped, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "toy_label_settings", lambda model_dir: FAST_LABELS)
    code = main(
        [
            "demo",
            "--train-rpn",
            "--label-samples",
            "16",
            "--scenes",
            "1",
            "--eval-scenes",
            "4",
            "--seed",
            "5",
            "--out",
            str(tmp_path / "demo"),
        ]
    )
    assert code == 0
    assert (tmp_path / "demo" / "self-distillation" / "rpn" / "rpn_config.json").is_file()
    assert "self-distillation done" in capsys.readouterr().out


def test_bench_toy_json_and_resume(shipped, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "toy_label_settings", lambda model_dir: FAST_LABELS)
    argv = [
        "bench",
        "toy",
        "--n",
        "6",
        "--seed",
        "3",
        "--work",
        str(tmp_path / "work"),
        "--label-samples",
        "12",
        "--sweep",
        "6",
        "--rpn-seeds",
        "1",
        "--timing-samples",
        "2",
        "--json",
        str(tmp_path / "bench.json"),
        "--released",
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert len(result["released_vs_toy"]) == 6
    expected = {
        "base",
        "full_resolution",
        "oracle_crop",
        "raw_attention",
        "vicrop",
        "sdrpn_box",
        "sdrpn_mask",
        "sdrpn_token_boxes",
    }
    assert set(result["methods"]) == expected
    for row in result["methods"].values():
        kinds = {f"coarse/{kind}" for kind in world.COARSE_TEMPLATES}
        assert set(row["accuracy"]) <= {"fine", "coarse", "yesno", "overall", *kinds} and "overall" in row["accuracy"]
        assert row["relative_throughput"] > 0
    assert result["methods"]["base"]["relative_throughput"] == 1.0
    assert set(result["ablation_ladder"]) == {
        "raw_attention",
        "rpn_raw_mse",
        "rpn_label_assignment",
        "rpn_label_assignment_sink_removal",
    }
    assert set(result["data_size_sweep"]) == {"6", "12"}
    assert set(result["rpn_training_seeds"]) == {"1"}
    first = capsys.readouterr().out
    assert main(argv) == 0  # everything cached: same table again
    assert capsys.readouterr().out.split("SD-RPN RoI stage")[0] == first.split("SD-RPN RoI stage")[0]


def test_toy_zoom_crops_one_token_windows_and_the_token_box_variant_does_not(shipped):
    adapter, network = pipeline.load_toy()
    zoom = pipeline.make_zoom(adapter, network, replace(pipeline.TOY_ROI, tau=0.01, max_side_frac=1.0))
    sample = world.render_sample(5, "fine")
    (windowed,) = zoom.predict_roi([sample.image], [sample.question])
    (boxed,) = pipeline.without_window(zoom).predict_roi([sample.image], [sample.question])
    assert windowed.boxes and boxed.boxes
    cell = sample.image.size[0] / windowed.geometry.grid_width
    for x0, y0, x1, y1 in windowed.boxes:
        assert x1 - x0 == y1 - y0 == math.ceil(pipeline.TOY_ROI.window * cell)
    assert boxed.boxes == [grid_box_to_pixels(b, boxed.geometry) for b in boxed.regions.boxes]


def test_bench_rejects_a_bad_list_with_one_line(capsys):
    assert main(["bench", "toy", "--sweep", "250,many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sweep" in err[0] and "many" in err[0]


def test_bench_of_another_toy_model_self_distils_its_rpn_first(shipped, tmp_path, capsys, monkeypatch):
    """`--model DIR`: a retrained toy MLLM is benchmarked with an SD-RPN distilled from its own attention, at
    the label layers its recipe log gives; a work folder never mixes two models' results."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tmp_path / "mllm", other)
    seen = []
    monkeypatch.setattr(pipeline, "toy_label_settings", lambda model_dir: seen.append(model_dir) or FAST_LABELS)
    work = tmp_path / "work"
    argv = ["bench", "toy", "--model", str(other), "--n", "4", "--work", str(work), "--label-samples", "8"]
    argv += ["--sweep", "", "--no-ablations", "--timing-samples", "1"]
    assert main(argv) == 0
    assert seen == [other]
    config = json.loads((work / "rpn_label_assignment_sink_removal" / "rpn_config.json").read_text())
    assert config["training"]["samples"] == 8
    assert "| sdrpn_mask |" in capsys.readouterr().out
    assert main([*argv[:3], str(tmp_path / "mllm"), *argv[4:]]) == 2  # the shipped stand-in, same work folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model" in err[0]
    assert main(["bench", "toy", "--model", str(tmp_path), "--work", str(tmp_path / "w2")]) == 2
    assert "no recipe.json" in capsys.readouterr().err


def test_accuracy_by_type_splits_coarse_questions_by_kind():
    samples = world.make_samples(40, seed=4)
    answers = [s.answer if s.attrs["subtype"] != "where" else "nowhere" for s in samples]
    accuracy = pipeline.accuracy_by_type(samples, answers)
    assert accuracy["coarse/where"] == 0.0 and accuracy["fine"] == 1.0
    assert {k for k in accuracy if k.startswith("coarse/")} == {
        f"coarse/{s.attrs['subtype']}" for s in samples if s.qtype == "coarse"
    }
    coarse = [s for s in samples if s.qtype == "coarse"]
    assert accuracy["coarse"] == round(sum(s.attrs["subtype"] != "where" for s in coarse) / len(coarse), 4)
