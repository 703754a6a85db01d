"""Every bad input of the command line ends in one line naming the problem: no traceback, no hang."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from sdrpn.cli import main
from sdrpn.shipped import shipped_dir
from tests.conftest import random_images

QUESTION = "what colour is the mark ?"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    random_images(1, size=(90, 60))[0].save(root / "scene.png")
    os.mkfifo(root / "pipe.png")
    (root / "a-file").write_text("not a folder")
    good = shipped_dir("rpn", "toy")
    variants = {
        "zero-byte": b"",
        "truncated": (good / "rpn_model.safetensors").read_bytes()[:5000],
        "header-only": (good / "rpn_model.safetensors").read_bytes()[:200],
    }
    for name, data in variants.items():
        shutil.copytree(good, root / name)
        (root / name / "rpn_model.safetensors").write_bytes(data)
    shutil.copytree(good, root / "no-weights")
    (root / "no-weights" / "rpn_model.safetensors").unlink()
    config = json.loads((good / "rpn_config.json").read_text())
    tampered = {
        "unknown-key": {**config, "evil": 1},
        "wrong-type": {**config, "frozen_layers": "two"},
        "null": None,
        "wrong-shape": {**config, "rpn_layers": config["rpn_layers"] - 1},
    }
    for name, payload in tampered.items():
        shutil.copytree(good, root / name)
        (root / name / "rpn_config.json").write_text(json.dumps(payload))
    shutil.copytree(good, root / "non-utf8")
    (root / "non-utf8" / "rpn_config.json").write_bytes(b"\xff\xfe{")
    return root


def _ask(files, *extra):
    return ["ask", "--model", "toy", "--image", str(files / "scene.png"), "--question", QUESTION, *extra]


CASES = {
    "device gpu7": (lambda f: _ask(f, "--device", "gpu7"), "not a device"),
    "device cuda": (lambda f: _ask(f, "--device", "cuda"), "CUDA is not available"),
    "device meta": (lambda f: _ask(f, "--device", "meta"), "meta holds no weights"),
    "overlay is a folder": (lambda f: _ask(f, "--save-overlay", str(f)), "is a directory"),
    "overlay under a file": (lambda f: _ask(f, "--save-overlay", str(f / "a-file" / "x.png")), "is not a folder"),
    "fifo image": (lambda f: [*_ask(f)[:4], str(f / "pipe.png"), *_ask(f)[5:]], "not a regular file"),
    "empty image": (lambda f: [*_ask(f)[:4], "", *_ask(f)[5:]], "image path is empty"),
    "image token in question": (
        lambda f: [*_ask(f)[:6], "what <image> is this ?"],
        "special token '<image>'",
    ),
    "missing model folder": (
        lambda f: ["ask", "--model", str(f / "nothing"), "--image", str(f / "scene.png"), "--question", QUESTION],
        "does not exist",
    ),
    "label out is a file": (
        lambda f: ["label", "--model", "toy", "--data", str(f / "x.jsonl"), "--out", str(f / "a-file")],
        "is a file, not a folder",
    ),
    "label head 99": (
        lambda f: ["label", "--model", "toy", "--data", str(f / "d.jsonl"), "--out", str(f / "l"), "--layers", "2:99"],
        "label head 2:99 does not exist",
    ),
}
for name in ("zero-byte", "truncated", "header-only"):
    CASES[f"rpn weights {name}"] = (lambda f, n=name: _ask(f, "--rpn", str(f / n)), "not a readable safetensors")
CASES["rpn weights missing"] = (lambda f: _ask(f, "--rpn", str(f / "no-weights")), "has no rpn_model.safetensors")
CASES["rpn config unknown key"] = (lambda f: _ask(f, "--rpn", str(f / "unknown-key")), "unknown keys ['evil']")
CASES["rpn config wrong type"] = (lambda f: _ask(f, "--rpn", str(f / "wrong-type")), "frozen_layers must be a int")
CASES["rpn config null"] = (lambda f: _ask(f, "--rpn", str(f / "null")), "expected a JSON object")
CASES["rpn config non-utf8"] = (lambda f: _ask(f, "--rpn", str(f / "non-utf8")), "not a valid RPN config")
CASES["rpn config vs weights"] = (lambda f: _ask(f, "--rpn", str(f / "wrong-shape")), "do not match its config")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_in_one_line(case, files, capsys):
    make_argv, message = CASES[case]
    if case == "label head 99":
        (files / "d.jsonl").write_text(json.dumps({"image": "scene.png", "question": QUESTION}) + "\n")
    assert main(make_argv(files)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "\n" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("option", ["--max-new-tokens", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_must_be_positive(files, option, value, capsys):
    command = "ask" if option == "--max-new-tokens" else "label"
    argv = _ask(files) if command == "ask" else ["label", "--model", "toy", "--data", "d", "--out", "o"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, option, value])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(files, capsys, monkeypatch):
    import sdrpn.infer

    def broken(*args, **kwargs):
        raise RuntimeError("something deep\nbroke")

    monkeypatch.setattr(sdrpn.infer, "load", broken)
    assert main(_ask(files)) == 1
    err = capsys.readouterr().err.strip()
    assert err == "sdrpn ask: error: RuntimeError: something deep broke (--debug shows where)"
    assert main(["--debug", *_ask(files)]) == 1
    assert "Traceback" in capsys.readouterr().err
