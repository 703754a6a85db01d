"""`sdrpn eval`: resume after an interruption, bad input counted (never a crash), the paper's table on the toy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdrpn.cli import main
from sdrpn.errors import SdrpnError
from sdrpn.evaluation.runner import EvalSettings, Predictions, evaluate
from sdrpn.infer import Zoom
from tests.conftest import QUESTIONS, random_images


@pytest.fixture()
def data_root(tmp_path) -> Path:
    """A generic JSONL benchmark: 5 good samples, one corrupt image, one record without a question."""
    folder = tmp_path / "data" / "jsonl"
    folder.mkdir(parents=True)
    lines = []
    for index, image in enumerate(random_images(5, seed=4)):
        image.save(folder / f"{index}.png")
        lines.append({"id": f"s{index}", "image": f"{index}.png", "question": QUESTIONS[index % 3], "answer": "red"})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines.append({"id": "corrupt", "image": "corrupt.png", "question": QUESTIONS[0], "answer": "red"})
    lines.append({"id": "no-question", "image": "0.png", "answer": "red"})
    (folder / "bench.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    return tmp_path / "data"


def settings(data_root: Path, out: Path, **overrides) -> EvalSettings:
    values = dict(benchmarks=["jsonl"], methods=["base", "vicrop"], out=out, data_root=data_root, batch_size=2)
    return EvalSettings(**{**values, **overrides, "progress": False})


def counting_ask_batch(monkeypatch, interrupt_at: int | None = None) -> list:
    """Count `Zoom.ask_batch` calls; raise KeyboardInterrupt (as Ctrl-C or a kill would stop us) at one."""
    calls, original = [], Zoom.ask_batch

    def ask_batch(self, images, questions, method=None, upscale=None):
        calls.append((method, len(images)))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return original(self, images, questions, method, upscale)

    monkeypatch.setattr(Zoom, "ask_batch", ask_batch)
    return calls


def records(out: Path, method: str) -> dict[str, dict]:
    return Predictions(out / "predictions" / "jsonl" / f"{method}.jsonl").done


def test_resume_after_interruption_recomputes_nothing(llava_adapter, data_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    counting_ask_batch(monkeypatch, interrupt_at=3)  # batch 1: base, vicrop; batch 2: base -> interrupted
    with pytest.raises(KeyboardInterrupt):
        evaluate(llava_adapter, None, settings(data_root, out))
    first_base, first_vicrop = records(out, "base"), records(out, "vicrop")
    assert sorted(first_base) == sorted(first_vicrop) == ["s0", "s1"]
    # a kill during a write leaves a cut line: it is dropped, and its sample answered again
    with open(out / "predictions/jsonl/base.jsonl", "a") as handle:
        handle.write('{"key": "s2", "predic')

    calls = counting_ask_batch(monkeypatch)
    result = evaluate(llava_adapter, None, settings(data_root, out))
    # batches left: (s2, s3) and (s4, corrupt) for both methods; the corrupt image never reaches the model
    assert calls == [("base", 2), ("vicrop", 2), ("base", 1), ("vicrop", 1)]
    base, vicrop = records(out, "base"), records(out, "vicrop")
    assert sorted(base) == sorted(vicrop) == ["corrupt", "s0", "s1", "s2", "s3", "s4"]
    for key in ("s0", "s1"):  # finished samples kept as they were
        assert base[key] == first_base[key] and vicrop[key] == first_vicrop[key]
    assert all(json.loads(line) for line in (out / "predictions/jsonl/base.jsonl").read_text().splitlines())

    again = counting_ask_batch(monkeypatch)
    assert evaluate(llava_adapter, None, settings(data_root, out)).benchmarks == result.benchmarks
    assert again == []


def test_bad_input_is_counted_not_fatal(llava_adapter, data_root, tmp_path):
    out = tmp_path / "out"
    result = evaluate(llava_adapter, None, settings(data_root, out, methods=["base"]))
    summary = result.benchmarks["jsonl"]
    assert summary["samples"] == 6 and summary["skipped"] == 1
    assert "no 'question'" in summary["skipped_reasons"][0]
    base = summary["methods"]["base"]
    assert base["errors"] == 1 and "corrupt.png" in base["error_examples"][0]
    assert records(out, "base")["corrupt"]["prediction"] is None
    written = json.loads((out / "summary.json").read_text())
    assert written["benchmarks"]["jsonl"]["methods"]["base"]["errors"] == 1
    assert "1 records skipped, failed (scored wrong): base 1" in (out / "table.md").read_text()


def test_a_sample_the_model_refuses_fails_alone(llava_adapter, data_root, tmp_path, monkeypatch):
    original = Zoom.ask_batch

    def ask_batch(self, images, questions, method=None, upscale=None):
        if QUESTIONS[1] in questions:
            raise SdrpnError("refused")
        return original(self, images, questions, method, upscale)

    monkeypatch.setattr(Zoom, "ask_batch", ask_batch)
    out = tmp_path / "out"
    result = evaluate(llava_adapter, None, settings(data_root, out, methods=["base"], limit=4))
    assert result.benchmarks["jsonl"]["methods"]["base"]["errors"] == 1  # s1 asks QUESTIONS[1]
    done = records(out, "base")
    assert done["s1"] == {"key": "s1", "prediction": None, "error": "refused"}
    assert all(isinstance(done[k]["prediction"], str) for k in ("s0", "s2", "s3"))


def test_predictions_are_the_models_answers(llava_adapter, data_root, tmp_path):
    from sdrpn.infer import load

    out = tmp_path / "out"
    evaluate(llava_adapter, None, settings(data_root, out, methods=["base"], limit=3))
    zoom = load(llava_adapter, max_new_tokens=32)
    images = [data_root / "jsonl" / f"{i}.png" for i in range(3)]
    expected = [r.answer for r in zoom.ask_batch(images, QUESTIONS, method="base")]
    assert [records(out, "base")[f"s{i}"]["prediction"] for i in range(3)] == expected


def test_another_run_in_the_same_folder_is_refused(llava_adapter, data_root, tmp_path):
    out = tmp_path / "out"
    evaluate(llava_adapter, None, settings(data_root, out, methods=["base"], limit=1))
    with pytest.raises(SdrpnError, match="task_presets differ"):
        evaluate(llava_adapter, None, settings(data_root, out, methods=["base"], limit=1, task_presets=True))


def test_missing_benchmark_stops_before_any_answer(llava_adapter, data_root, tmp_path, monkeypatch):
    calls = counting_ask_batch(monkeypatch)
    with pytest.raises(SdrpnError, match=r"pope: no data in '.*pope'; expected .*coco_pope_"):
        evaluate(llava_adapter, None, settings(data_root, tmp_path / "o", benchmarks=["jsonl", "pope"]))
    assert calls == []


def test_settings_refuse_what_cannot_run(llava_adapter, data_root, tmp_path):
    with pytest.raises(SdrpnError, match="unknown method 'zoom'"):
        settings(data_root, tmp_path, methods=["zoom"])
    with pytest.raises(SdrpnError, match="unknown benchmark 'mmmu'"):
        settings(data_root, tmp_path, benchmarks=["mmmu"])
    with pytest.raises(SdrpnError, match="needs an RPN"):
        evaluate(llava_adapter, None, settings(data_root, tmp_path / "o", methods=["base", "sdrpn"]))


def test_cli_toy_table_end_to_end(tmp_path, capsys):
    out = tmp_path / "toy"
    methods = "base,raw-attention,vicrop,sdrpn"
    argv = ["eval", "--model", "toy", "--bench", "toy", "--method", methods, "--limit", "3", "--batch-size", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | relative throughput | toy (exact match) |"
    assert [row.split(" | ")[0] for row in rows[1:5]] == [f"| {m}" for m in methods.split(",")]
    assert rows[1].startswith("| base | 1.00 | ") and "(+" not in rows[1]
    summary = json.loads((out / "summary.json").read_text())
    toy = summary["benchmarks"]["toy"]
    assert toy["samples"] == 3
    base = toy["methods"]["base"]["score"]
    for row, method in zip(rows[2:5], methods.split(",")[1:]):
        score = toy["methods"][method]["score"]
        assert row.endswith(f" | {100 * score:.1f} ({100 * (score - base):+.1f}) |")
        assert row.split(" | ")[1] == f"{summary['relative_throughput'][method]:.2f}"
        assert summary["relative_throughput"][method] > 0
    assert toy["methods"]["sdrpn"]["mean_extra_tokens"] > 0  # the RPN looked closer
    assert toy["methods"]["base"]["mean_extra_tokens"] == 0


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    code = main(["eval", "--model", "toy", "--bench", "pope", "--method", "base", "--out", str(tmp_path / "o")])
    assert code == 2
    assert (
        capsys.readouterr().err.strip()
        == "sdrpn eval: error: benchmark pope needs --data-root (a folder holding pope/)"
    )


def test_cli_resumes_after_a_kill(tmp_path):
    """A real SIGKILL mid-run: the re-run keeps every finished answer and adds only the missing ones."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    argv = ["eval", "--model", "toy", "--bench", "toy", "--method", "base", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "sdrpn.cli", *argv, "--limit", "40"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    predictions = out / "predictions/toy/base.jsonl"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if predictions.is_file() and predictions.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    before = Predictions(predictions).done
    assert 2 <= len(before) < 40, "the run was not stopped midway"

    assert main([*argv, "--limit", str(len(before) + 2)]) == 0
    after = Predictions(predictions).done
    assert len(after) == len(before) + 2
    assert all(after[key] == record for key, record in before.items())  # nothing answered twice
    assert os.path.getsize(predictions) == sum(len(json.dumps(r)) + 1 for r in after.values())
