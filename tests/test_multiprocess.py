"""Pins label generation and RPN training on two CPU processes (gloo), launched as users launch them (`torchrun`,
`accelerate launch`): a killed run stops the other process cleanly and resumes to the one-process folder without
labelling anything twice, and data-parallel training reaches the one-process result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdrpn.cli import main
from sdrpn.data import read_samples
from sdrpn.images import load_image
from sdrpn.labeling import LabelCache, LabelSettings, generate_labels
from sdrpn.models import load_model
from sdrpn.rpn import RegionProposalNetwork, load_rpn
from sdrpn.train import TrainSettings, masked_bce, train_rpn, training_targets
from tests.conftest import QUESTIONS, build_tiny, random_images
from tests.test_train import _planted_labels

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
ACCELERATE += ["--main_process_port", "0", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
SAMPLES = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A saved tiny LLaVA and a data file of 16 images."""
    root = tmp_path_factory.mktemp("multiprocess")
    model, processor = build_tiny("llava")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    lines = []
    for index, image in enumerate(random_images(SAMPLES, seed=5)):
        image.save(root / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "question": QUESTIONS[index % 3]}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_killed_two_process_run_resumes_to_the_one_process_labels(world):
    adapter = load_model(str(world / "model"))
    samples = read_samples(world / "data.jsonl").samples
    generate_labels(adapter, samples, world / "reference", LabelSettings(max_new_tokens=3), progress=False)
    reference = {r["sample_id"]: r for r in LabelCache(world / "reference").records()}

    worker = Path(__file__).with_name("multiprocess_worker.py")
    killed = _launch([*TORCHRUN, str(worker), "model", "data.jsonl", "labels"], world)
    assert killed.returncode != 0
    assert re.search(r"rank 0 interrupted after [2-7] images", killed.stdout), killed.stdout + killed.stderr[-2000:]
    first_half = {s.sample_id for s in samples[: SAMPLES // 2]}
    survived = LabelCache(world / "labels").done_ids()
    assert len(survived) >= 2 and survived <= first_half  # process 0's finished records, written on its way out
    assert not list((world / "labels").glob(".shard-*"))  # no half-written shard

    label = ["label", "--model", "model", "--data", "data.jsonl", "--out", "labels", "--max-new-tokens", "3"]
    resumed = _launch([*ACCELERATE, "-m", "sdrpn.cli", *label], world)
    assert resumed.returncode == 0, [line for line in resumed.stderr.splitlines() if "error" in line]
    summary = f"labelled {SAMPLES - len(survived)}, already done {len(survived)}, bad 0"
    assert resumed.stdout.count(summary) == 1, resumed.stdout  # nothing labelled twice, printed once
    records = list(LabelCache(world / "labels").records())
    assert sorted(r["sample_id"] for r in records) == sorted(reference)
    for record in records:
        expected = reference[record["sample_id"]]
        assert record["answer"] == expected["answer"]
        assert torch.equal(record["labels"], expected["labels"])
        torch.testing.assert_close(record["raw_map"], expected["raw_map"])


def _loss(rpn: RegionProposalNetwork, adapter, label_dir: Path) -> float:
    """The RPN's loss over every labelled sample, in one batch."""
    records = sorted(LabelCache(label_dir).records(), key=lambda r: r["sample_id"])
    batch = adapter.prepare(
        [load_image(r["image"]) for r in records], [[r["question"]] for r in records], training=True
    )
    targets = training_targets(records, LabelSettings(), "labels", batch.grids)
    with torch.no_grad():
        return masked_bce(rpn(batch)[0][:, 0], targets).item()


def test_two_process_training_reaches_the_one_process_result(world, tmp_path):
    """Same data, seed and global batch (2 x 2 against 1 x 4): gradients averaged over gloo give the same RPN."""
    adapter = load_model(str(world / "model"))
    labels = _planted_labels(adapter, world, tmp_path / "labels")
    settings = TrainSettings(
        frozen_layers=2, rpn_layers=2, batch_size=4, grad_accumulation=1, epochs=2, learning_rate=3e-3, seed=3
    )
    alone = train_rpn(adapter, labels, tmp_path / "alone", settings, progress=False)

    train = ["-m", "sdrpn.cli", "train", "--model", str(world / "model"), "--labels", str(labels)]
    train += ["--out", str(tmp_path / "pair"), "-B", "2", "-R", "2", "--batch-size", "2", "--grad-accumulation", "1"]
    train += ["--epochs", "2", "--lr", "3e-3", "--seed", "3"]
    pair = _launch([*TORCHRUN, *train], tmp_path)
    assert pair.returncode == 0, pair.stderr[-2000:]
    assert pair.stdout.count("RPN (B=2, R=2) saved") == 1
    loaded = load_rpn(tmp_path / "pair", adapter)
    assert loaded.config.training["batches"] == alone.config.training["batches"] == 8

    initial = RegionProposalNetwork(adapter, 2, 2).eval()
    start, one, two = (_loss(rpn, adapter, labels) for rpn in (initial, alone.eval(), loaded))
    assert start - one > 5 * abs(two - one)  # it trained, by far more than the two runs differ
    assert abs(two - one) <= 0.02 * one, (one, two)
    for (name, a), (_, b) in zip(alone.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cuda"], "CUDA is not available"),
        (["--mixed-precision", "fp16"], "fp16 mixed precision needs a GPU"),
        (["--cache-prefix", "data.jsonl"], "--cache-prefix 'data.jsonl' is a file"),
    ],
)
def test_train_refuses_in_one_line(world, extra, message, capsys, monkeypatch):
    monkeypatch.chdir(world)
    if extra[0] != "--device":
        adapter = load_model("model")
        _planted_labels(adapter, world, world / "planted")
    argv = ["train", "--model", "model", "--labels", "planted", "--out", "rpn-refused", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_label_on_a_missing_gpu_is_one_line(world, capsys):
    argv = ["label", "--model", str(world / "model"), "--data", str(world / "data.jsonl"), "--device", "cuda:0"]
    assert main([*argv, "--out", str(world / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA is not available" in err and "\n" not in err, err
