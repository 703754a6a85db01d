"""Pins `sdrpn label` -> `sdrpn train` -> `sdrpn ask` end to end on a saved tiny model of each family, and
their one-line errors."""

from __future__ import annotations

import json

from sdrpn.cli import main
from sdrpn.rpn import read_rpn_config


def test_label_then_train(model_dir, image_folder, tmp_path, capsys):
    with open(image_folder / "data.jsonl", "a") as data:
        data.write("{broken json\n")
        data.write(json.dumps({"image": "../outside.png", "question": "what ?"}) + "\n")
    label = ["label", "--model", str(model_dir), "--data", str(image_folder / "data.jsonl")]
    label += ["--out", str(tmp_path / "labels"), "--max-new-tokens", "3"]
    code = main([*label, "--batch-size", "5"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "labelled 10, already done 0, bad 2" in out
    assert "data.jsonl:11" in err and "outside" in err
    code = main(label)  # again: everything is already labelled
    assert code == 0 and "labelled 0, already done 10" in capsys.readouterr().out
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--labels",
            str(tmp_path / "labels"),
            "--out",
            str(tmp_path / "rpn"),
            "-B",
            "2",
            "-R",
            "2",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
        ]
    )
    assert code == 0 and "B=2, R=2" in capsys.readouterr().out
    config = read_rpn_config(tmp_path / "rpn")
    assert config.base_model == str(model_dir) and config.label_settings["max_new_tokens"] == 3
    image = str(image_folder / "0.png")
    for upscale in ("box", "mask"):
        ask = ["ask", "--model", str(model_dir), "--rpn", str(tmp_path / "rpn"), "--image", image]
        ask += ["--question", "where ?", "--upscale", upscale, "--tau", "0.3", "--max-new-tokens", "2", "--json"]
        assert main(ask) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["method"] == "sdrpn" and len(result["roi_map"]) == result["grid"][0]
        assert (result["extra_tokens"] > 0) == bool(result["boxes"])


def test_one_line_errors(model_dir, image_folder, tmp_path, capsys):
    cases = [
        (
            [
                "label",
                "--model",
                str(tmp_path / "nothing"),
                "--data",
                str(image_folder / "data.jsonl"),
                "--out",
                str(tmp_path / "l"),
            ],
            "does not exist",
        ),
        (
            [
                "label",
                "--model",
                str(model_dir),
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(tmp_path / "l"),
            ],
            "missing.jsonl",
        ),
        (
            ["train", "--model", str(model_dir), "--labels", str(tmp_path), "--out", str(tmp_path / "r")],
            "not a label folder",
        ),
        (
            [
                "label",
                "--model",
                str(model_dir),
                "--data",
                str(image_folder / "data.jsonl"),
                "--out",
                str(tmp_path / "l"),
                "--layers",
                "99",
            ],
            "label layer 99 does not exist",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err


def test_unsupported_family_is_named(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path
    )
    code = main(["ask", "--model", str(tmp_path), "--image", "x.png", "--question", "what ?", "--method", "base"])
    err = capsys.readouterr().err
    assert code == 2
    # the image is checked first; with a real image the family is named
    assert "x.png" in err
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code = main(["ask", "--model", str(tmp_path), "--image", str(tmp_path / "x.png"), "--question", "what ?"])
    err = capsys.readouterr().err
    assert code == 2 and "'bert'" in err and "supported families: " in err and "llava" in err
