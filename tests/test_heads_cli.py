"""`sdrpn heads` from the command line: a ranked table, heads.json + heat map, and labels made from its heads."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from sdrpn.cli import main
from sdrpn.models import load_model


def _with_boxes(folder, box):
    lines = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    (folder / "boxed.jsonl").write_text("\n".join(json.dumps({**line, "box": box}) for line in lines) + "\n")
    return str(folder / "boxed.jsonl")


def test_heads_then_label_with_its_heads(model_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "ranked" / "heads.json"
    data = _with_boxes(image_folder, [5, 5, 60, 50])
    code = main(["heads", "--model", str(model_dir), "--data", data, "--out", str(out), "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note: ranked on 10 samples, fewer than the 64 asked" in captured.err
    assert captured.out.splitlines()[0].startswith("rank layer head") and "boxmass" in captured.out
    written = json.loads(out.read_text())
    assert written["samples"] == 10 and written["with_boxes"] and (out.parent / "heads.png").is_file()
    picked = {int(layer): heads for layer, heads in written["label_heads"].items()}
    eligible = [(row["layer"], row["head"]) for row in written["ranking"] if row["layer"] >= written["min_layer"]]
    top = eligible[: sum(map(len, picked.values()))]
    assert written["min_layer"] == 0
    assert sorted(top) == sorted((layer, head) for layer, heads in picked.items() for head in heads)
    weighed = {c["heads"]: c for c in written["candidates"]}
    assert len(weighed) == min(8, len(eligible))  # every prefix of the ranking, weighed
    chosen = weighed[" ".join(f"{layer}:{head}" for layer, head in top)]
    assert written["clean_on_box"] == pytest.approx(chosen["clean_on_box"], abs=1e-4)
    own_rule = asdict(load_model(str(model_dir)).defaults().roi)
    assert written["roi_settings"] == own_rule  # the model's own stage-1 rule (no --rpn)

    labels = tmp_path / "labels"
    label = ["label", "--model", str(model_dir), "--data", data, "--out", str(labels), "--label-heads", str(out)]
    assert main([*label, "--max-samples", "2", "--max-new-tokens", "3"]) == 0
    settings = json.loads((labels / "label_settings.json").read_text())["settings"]
    assert {int(layer): heads for layer, heads in settings["label_heads"].items()} == picked


def test_heads_weighs_labels_by_an_rpns_stage_one_rule(model_dir, image_folder, tmp_path, capsys):
    """--rpn toy: the shipped toy RPN's RoI settings (tau 0.5, 1-token regions kept), recorded in heads.json."""
    out = tmp_path / "heads.json"
    data = _with_boxes(image_folder, [5, 5, 60, 50])
    args = ["heads", "--model", str(model_dir), "--data", data, "--out", str(out), "--max-new-tokens", "3"]
    assert main([*args, "--rpn", "toy", "--samples", "4"]) == 0
    assert "stage 1 keeps clean regions on it in" in capsys.readouterr().out
    roi = json.loads(out.read_text())["roi_settings"]
    assert roi["tau"] == 0.5 and roi["min_tokens"] == 1
    assert main([*args, "--rpn", str(tmp_path / "nowhere")]) == 2
    assert "is not an RPN checkpoint" in capsys.readouterr().err


def test_every_sample_failing_is_one_line(model_dir, image_folder, tmp_path, capsys):
    data = _with_boxes(image_folder, [500, 500, 600, 600])  # outside every 100 x 80 image
    code = main(
        ["heads", "--model", str(model_dir), "--data", data, "--out", str(tmp_path / "h.json"), "--samples", "3"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("sdrpn heads: error: every one of the 3 samples failed") and "outside" in err[-1]
    assert not (tmp_path / "h.json").exists()


def test_no_usable_sample_is_one_line(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "missing.png", "question": "what ?"}) + "\n")
    code = main(["heads", "--model", "toy", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "h.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sdrpn heads: error: no usable sample") and "not found" in err[-1]


def test_toy_check_exports_boxes_and_compares_with_the_recipe_rule(tmp_path):
    from sdrpn.data import read_samples
    from sdrpn.toyworld import heads_check, world

    heads_check.export("toy", 3, 5, tmp_path / "data")
    samples = read_samples(tmp_path / "data" / "data.jsonl").samples
    assert [s.box for s in samples] == [tuple(map(float, t.target_box)) for t in world.make_samples(3, 5)]
    heads_check.export("toy", 3, 5, tmp_path / "fine", qtype="fine")
    assert {s.sample_id.rsplit(":", 1)[1] for s in read_samples(tmp_path / "fine" / "data.jsonl").samples} == {"fine"}
    (tmp_path / "heads.json").write_text(json.dumps({"label_heads": {"2": [0, 1, 2, 3]}}))
    result = heads_check.compare("toy", [tmp_path / "heads.json"], 4, 5)
    rule, listed = result["peak_on_target"]["recipe rule"], result["peak_on_target"]["sdrpn heads"]
    assert rule["heads"] == "2:0 2:1 2:2 2:3" and rule == listed  # the recipe's rule is all heads of layer 2
    assert result["scenes"] == 4 and 0 <= rule["all"] <= 1
    (tmp_path / "one.json").write_text(json.dumps({"label_heads": {"0": [1]}}))
    two = heads_check.compare("toy", [tmp_path / "heads.json", tmp_path / "one.json"], 4, 5, prompt_row=True)
    assert two["queries"] == "prompt row" and two["peak_on_target"][str(tmp_path / "one.json")]["heads"] == "0:1"
    assert two["peak_on_target"]["recipe rule"]["labels_fine"]["dropped"] <= two["fine_scenes"]
    stage_one = two["peak_on_target"]["recipe rule"]["stage_one"]
    assert 0 <= stage_one["clean_on_box"] <= stage_one["region_on_box"] <= 1 - stage_one["no_region"] + 1e-9


def _validate_args(model_dir, image_folder, tmp_path, *extra):
    data = _with_boxes(image_folder, [5, 5, 60, 50])
    return [
        "heads",
        "--model",
        str(model_dir),
        "--data",
        data,
        "--out",
        str(tmp_path / "heads.json"),
        "--max-new-tokens",
        "3",
        "--samples",
        "4",
        "--top",
        "3",
        *extra,
    ]


def test_validate_picks_the_candidate_whose_rpn_finds_the_box(model_dir, image_folder, tmp_path, capsys, monkeypatch):
    """K=2: both candidates are labelled and distilled; the first in the weighed order is made to keep no region
    on any sample, so the second must be picked and recorded as such."""
    from sdrpn import heads

    real = heads.rpn_on_box
    scored = []

    def first_never_on_box(zoom, samples, *args, **kwargs):
        on_box, none, count = real(zoom, samples, *args, **kwargs)
        scored.append((on_box, none, count))
        return (0, count, count) if len(scored) == 1 else (count, 0, count)

    monkeypatch.setattr(heads, "rpn_on_box", first_never_on_box)
    work = tmp_path / "work"
    train = ["--validate", "2", "--train-data", str(image_folder / "data.jsonl"), "--train-samples", "3"]
    code = main(_validate_args(model_dir, image_folder, tmp_path, *train, "--work", str(work)))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = json.loads((tmp_path / "heads.json").read_text())
    validated = written["validated"]
    assert len(validated) == 2 and len({v["heads"] for v in validated}) == 2
    assert all(0 <= on_box <= count and 0 <= none <= count and count == 4 for on_box, none, count in scored)
    assert (validated[0]["region_on_box"], validated[0]["no_region"]) == (0.0, 1.0)
    assert (validated[1]["region_on_box"], validated[1]["no_region"]) == (1.0, 0.0)
    picked = " ".join(f"{layer}:{head}" for layer, heads_ in written["label_heads"].items() for head in heads_)
    assert sorted(picked.split()) == sorted(validated[1]["heads"].split())
    for v in validated:
        assert (Path(v["rpn"]) / "rpn_config.json").is_file() and Path(v["rpn"]).parent.parent == work
        config = json.loads((Path(v["rpn"]) / "rpn_config.json").read_text())
        listed = sorted(
            f"{layer}:{head}" for layer, hs in config["label_settings"]["label_heads"].items() for head in hs
        )
        assert listed == sorted(v["heads"].split())  # the RPN was distilled from the candidate's own heads
    assert "validated " in captured.out

    weights = [Path(v["rpn"]) / "rpn_model.safetensors" for v in validated]
    saved = [path.stat().st_mtime_ns for path in weights]
    scored.clear()
    assert main(_validate_args(model_dir, image_folder, tmp_path, *train, "--work", str(work))) == 0
    assert [path.stat().st_mtime_ns for path in weights] == saved  # a rerun reuses the saved RPNs
    assert json.loads((tmp_path / "heads.json").read_text())["validated"] == validated


def test_validate_bad_input_is_one_line(model_dir, image_folder, tmp_path, capsys):
    train = str(image_folder / "data.jsonl")
    cases = [
        (["--validate", "2"], "--validate needs --train-data"),
        (["--train-data", train], "--train-data and --train-samples are options of --validate K"),
        (["--validate", "-1", "--train-data", train], "--validate must be 0 (off) or a number of candidates"),
        (["--validate", "2", "--train-data", str(tmp_path / "none.jsonl")], "not found"),
    ]
    for extra, message in cases:
        assert main(_validate_args(model_dir, image_folder, tmp_path, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sdrpn heads: error:") and message in err[-1], err
    unboxed = ["heads", "--model", str(model_dir), "--data", train, "--out", str(tmp_path / "h.json")]
    assert main([*unboxed, "--validate", "2", "--train-data", train]) == 2
    assert "--validate needs a target box on every sample" in capsys.readouterr().err
    assert not (tmp_path / "heads.json").exists() and not (tmp_path / "h.json").exists()
