"""The lmms-eval plugin: lmms-eval's own command line runs `--model sdrpn` on the shipped toy pair, answers exactly as
`Zoom.ask_batch` does, and scores SD-RPN above the base model; plus the plugin's checks of what it is handed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sdrpn
from sdrpn.errors import SdrpnError
from sdrpn.infer import cut_at_stop
from sdrpn.integrations.lmms_eval import (
    SdrpnLmms,
    generation_limits,
    manifest,
    process_device,
    question_text,
    single_image,
)
from sdrpn.toyworld import world
from tests.conftest import random_images

SAMPLES, SEED, NEW_TOKENS = 24, 5, 4
TASK = "sdrpn_toy"
RUNS = {"base": 1, "sdrpn": 4}  # method -> --batch_size: both the one-by-one and the batched path


def toy_samples() -> list[world.ToySample]:
    return world.make_samples(SAMPLES, seed=SEED, qtypes="fine")


def write_toy_task(folder: Path) -> Path:
    """A local lmms-eval task: the toy samples as parquet (an image column) and a task YAML that reads it."""
    from datasets import Dataset, Features, Image, Value

    samples = toy_samples()
    columns = {
        "image": [s.image for s in samples],
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
    }
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string")})
    folder.mkdir(parents=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(folder / "toy.parquet"))
    task = {
        "task": TASK,
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": str(folder / "toy.parquet")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": "image",
        "doc_to_text": "<image>\n{{question}}",  # the placeholder lmms-eval prompts carry, which sdrpn strips
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": NEW_TOKENS, "until": ["\n\n"]},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.fixture(scope="module")
def lmms_eval_runs(tmp_path_factory) -> dict[str, Path]:
    """One `lmms-eval --config` process evaluating both methods (lmms-eval is imported once: it is slow to)."""
    root = tmp_path_factory.mktemp("lmms-eval")
    task_folder = write_toy_task(root / "task")
    runs = [
        {
            "model": "sdrpn",
            "model_args": f"model=toy,rpn=toy,method={method},roi_log={root / method / 'roi.jsonl'}",
            "tasks": TASK,
            "include_path": str(task_folder),
            "device": "cpu",
            "batch_size": batch_size,
            "log_samples": True,
            "output_path": str(root / method),
        }
        for method, batch_size in RUNS.items()
    ]
    (root / "runs.yaml").write_text(yaml.safe_dump(runs))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(root / "hf-cache"), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "lmms_eval", "--config", str(root / "runs.yaml"), "--verbosity", "WARNING"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    (root / "lmms-eval.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return {method: root / method for method in RUNS}


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    log = (folder.parent / "lmms-eval.log").read_text()[-3000:]
    assert len(found) == 1, f"expected one {pattern} in {folder} (lmms-eval exits 0 even when it failed):\n{log}"
    return found[0]


def lmms_eval_answers(folder: Path) -> dict[int, str]:
    samples = [json.loads(line) for line in _one(folder, f"*_samples_{TASK}.jsonl").read_text().splitlines()]
    return {s["doc_id"]: s["filtered_resps"] for s in samples}


def lmms_eval_score(folder: Path) -> float:
    return json.loads(_one(folder, "*_results.json").read_text())["results"][TASK]["exact_match,none"]


@pytest.mark.parametrize("method", list(RUNS))
def test_lmms_eval_answers_equal_ask_batch(lmms_eval_runs, method):
    samples = toy_samples()
    zoom = sdrpn.load(model="toy", rpn="toy", method=method)
    expected = zoom.ask_batch(
        [s.image for s in samples], [s.question for s in samples], max_new_tokens=NEW_TOKENS, stop=["\n\n"]
    )
    answers = lmms_eval_answers(lmms_eval_runs[method])
    assert sorted(answers) == list(range(SAMPLES))
    assert [answers[i] for i in range(SAMPLES)] == [r.answer for r in expected]
    correct = sum(r.answer == s.answer for r, s in zip(expected, samples))
    assert lmms_eval_score(lmms_eval_runs[method]) == pytest.approx(correct / SAMPLES)


def test_lmms_eval_scores_sdrpn_above_base(lmms_eval_runs):
    base, zoomed = (lmms_eval_score(lmms_eval_runs[m]) for m in ("base", "sdrpn"))
    assert zoomed > base + 0.25, (base, zoomed)


def test_roi_log_has_one_record_per_sample(lmms_eval_runs):
    records = [json.loads(line) for line in (lmms_eval_runs["sdrpn"] / "roi.jsonl").read_text().splitlines()]
    assert sorted(r["doc_id"] for r in records) == list(range(SAMPLES))
    answers = lmms_eval_answers(lmms_eval_runs["sdrpn"])
    for record in records:
        assert record["task"] == TASK and record["method"] == "sdrpn"
        assert record["answer"] == answers[record["doc_id"]]
        assert record["timings"]["batch_size"] <= RUNS["sdrpn"] and record["timings"]["total"] > 0
        assert "roi_map" not in record
    looked_closer = [r for r in records if r["boxes"]]
    assert len(looked_closer) > SAMPLES // 2
    assert all(r["extra_tokens"] > 0 for r in looked_closer)


# --- what the plugin is handed -----------------------------------------------------------------


def test_manifest_names_the_model_class():
    assert manifest().model_id == "sdrpn"
    module, name = manifest().simple_class_path.rsplit(".", 1)
    assert getattr(sys.modules[module], name) is SdrpnLmms


def test_entry_point_reaches_lmms_eval_registry():
    from lmms_eval.models import get_model

    assert get_model("sdrpn") is SdrpnLmms


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ({"model": "toy", "colour": "red"}, "unknown model_args for sdrpn: colour"),
        ({}, "needs model_args model="),
        ({"model": "toy", "pretrained": "other"}, "disagree"),
        ({"model": "toy", "dtype": "int8"}, "dtype must be one of"),
        ({"model": "toy", "batch_size": "auto"}, "batch_size must be a positive integer"),
        ({"model": "toy", "batch_size": 0}, "batch_size must be a positive integer"),
        ({"model": "toy", "prune": "sometimes"}, "prune must be True or False"),
        ({"model": "toy", "vicrop_high_res": 1}, "vicrop_high_res must be True or False"),
    ],
)
def test_bad_model_args_are_refused_in_one_line(model_args, message):
    with pytest.raises(SdrpnError, match=message):
        SdrpnLmms(**model_args)


def test_pretrained_is_an_alias_of_model():
    plugin = SdrpnLmms(pretrained="toy", rpn="toy", method="base", batch_size="2")
    assert plugin.batch_size == 2 and plugin.zoom.settings.method == "base"
    assert plugin.device.type == "cpu"


def test_task_preset_sets_the_threshold_and_unknown_presets_are_refused():
    with pytest.raises(SdrpnError, match="unknown task 'nonsense'"):
        SdrpnLmms(model="toy", rpn="toy", task="nonsense")
    assert SdrpnLmms(model="toy", rpn="toy", tau=0.3).zoom.settings.roi.tau == 0.3


@pytest.mark.parametrize("prune", [True, False])
def test_prune_and_vicrop_high_res_reach_the_zoom(monkeypatch, prune):
    import sdrpn.infer

    seen = {}
    real_load = sdrpn.infer.load
    monkeypatch.setattr(sdrpn.infer, "load", lambda *a, **k: seen.update(k) or real_load(*a, **k))
    SdrpnLmms(model="toy", rpn="toy", prune=prune, vicrop_high_res=not prune)
    assert seen["prune"] is prune and seen["vicrop_high_res"] is (not prune)


def test_each_process_of_a_multi_process_run_takes_its_own_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_device("cuda") == "cuda" and process_device(None) is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert process_device(None) == process_device("cuda") == process_device("cuda:0") == "cuda:2"
    assert process_device("cpu") == "cpu"


def test_roi_log_is_one_file_per_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    plugin = SdrpnLmms(model="toy", device="cpu", roi_log=str(tmp_path / "logs" / "roi.jsonl"))
    assert plugin.roi_log == tmp_path / "logs" / "roi.rank1.jsonl" and plugin.roi_log.exists()
    assert plugin.rank == 1 and plugin.world_size == 2


def test_roi_log_naming_a_folder_is_refused(tmp_path):
    with pytest.raises(SdrpnError, match="roi_log .* is a directory"):
        SdrpnLmms(model="toy", roi_log=str(tmp_path))


def test_image_placeholders_are_stripped():
    assert question_text("<image>\nwhat colour is the mark ?") == "what colour is the mark ?"
    assert question_text("what is written here?\n<image>") == "what is written here?"


@pytest.mark.parametrize("visuals", [None, [], random_images(2)])
def test_documents_without_exactly_one_image_are_refused(visuals):
    with pytest.raises(SdrpnError, match="textvqa_val document 7 has [02] images; sdrpn answers about exactly one"):
        single_image(visuals, "textvqa_val", 7)


def test_generation_limits_come_from_the_task():
    assert generation_limits({"until": "\n\n", "max_new_tokens": 16.0}) == {"stop": ["\n\n"], "max_new_tokens": 16}
    assert generation_limits({"until": ["", "Q:"]}) == {"stop": ["Q:"]}
    assert generation_limits({}) == {"stop": []}
    with pytest.raises(SdrpnError, match="max_new_tokens must be a positive integer"):
        generation_limits({"max_new_tokens": 2.5})
    with pytest.warns(UserWarning, match="greedily"):
        generation_limits({"temperature": 0.7, "do_sample": True})


# --- per-call generation limits of `Zoom.ask_batch` ----------------------------------------------


def test_answers_are_cut_before_the_first_stop_string():
    assert cut_at_stop("blue\n\nQ: what", ["\n\n"]) == "blue"
    assert cut_at_stop("a. b, c", [",", "."]) == "a"
    assert cut_at_stop("blue", ["\n\n"]) == cut_at_stop("blue", []) == "blue"


def test_ask_batch_takes_max_new_tokens_and_stop_per_call(llava_adapter):
    zoom = sdrpn.load(llava_adapter, max_new_tokens=6)
    images, questions = random_images(2, seed=4), ["what colour is the object ?", "where is the square ?"]
    full = [r.answer for r in zoom.ask_batch(images, questions)]
    short = [r.answer for r in zoom.ask_batch(images, questions, max_new_tokens=2)]
    assert zoom.settings.max_new_tokens == 6
    assert all(len(s.split()) <= 2 and f.startswith(s) for s, f in zip(short, full))
    assert short == [r.answer for r in sdrpn.load(llava_adapter, max_new_tokens=2).ask_batch(images, questions)]
    word = full[0].split()[1]
    cut = zoom.ask_batch(images, questions, stop=[word])[0].answer
    assert cut == full[0][: full[0].find(word)].strip()
    for bad in ({"max_new_tokens": 0}, {"stop": [""]}, {"stop": [3]}):
        with pytest.raises(SdrpnError):
            zoom.ask_batch(images, questions, **bad)
