"""Pins the self-distillation loss, that training reduces it, and resumable training checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from sdrpn.data import read_samples
from sdrpn.errors import SdrpnError
from sdrpn.images import load_image
from sdrpn.labeling import LabelCache, LabelSettings
from sdrpn.rpn import RegionProposalNetwork, load_rpn
from sdrpn.train import TrainSettings, masked_bce, train_rpn
from tests.conftest import QUESTIONS, random_images


def test_masked_bce_ignores_unlabelled_tokens():
    logits = torch.tensor([[2.0, -1.0, 5.0, 0.0]])
    labels = torch.tensor([[1, 0, -1, -1]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(masked_bce(logits, labels), expected)
    nothing = masked_bce(logits.requires_grad_(), torch.full((1, 4), -1))
    assert nothing.item() == 0.0
    nothing.backward()  # still differentiable: a batch of dropped samples is a no-op, not a crash


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(adapter):
    torch.manual_seed(0)
    batch = adapter.prepare(random_images(4, seed=9), [[q] for q in QUESTIONS + QUESTIONS[:1]], training=True)
    labels = torch.full((4, max(batch.visual_counts)), -1)
    for row, count in enumerate(batch.visual_counts):
        labels[row, :2] = 1
        labels[row, count - 4 : count] = 0
    rpn = RegionProposalNetwork(adapter, 2, 3)
    optimizer = torch.optim.AdamW(rpn.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0)
    prefix = rpn.frozen_prefix(batch)
    losses = []
    for _ in range(15):
        loss = masked_bce(rpn(batch, prefix)[0][:, 0], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is None for p in adapter.model.parameters())  # the base model never trains


def _planted_labels(adapter, image_folder, out):
    """A label folder whose labels mark a fixed corner (random tiny models attend near-uniformly)."""
    cache = LabelCache(out)
    cache.start(adapter.name_or_path, LabelSettings())
    records = []
    for sample in read_samples(image_folder / "data.jsonl").samples:
        rows, cols = adapter.prepare([load_image(sample.image_path)], [[sample.question]], training=True).grids[0]
        labels = torch.full((rows, cols), -1, dtype=torch.int8)
        labels[: rows // 2, : cols // 2] = 1
        labels[-1, :] = 0
        raw = torch.rand(rows, cols)
        records.append(
            {
                "sample_id": sample.sample_id,
                "image": str(sample.image_path),
                "question": sample.question,
                "answer": "",
                "raw_map": raw,
                "norms": None,
                "sink_map": None,
                "labels": labels,
            }
        )
    cache.write_shard(records)
    return out


def test_train_writes_checkpoint_and_resumes(adapter, image_folder, tmp_path):
    labels = _planted_labels(adapter, image_folder, tmp_path / "labels")
    settings = TrainSettings(
        frozen_layers=2, rpn_layers=3, batch_size=2, grad_accumulation=1, epochs=2, learning_rate=1e-3, save_every=3
    )
    initial = RegionProposalNetwork(adapter, 2, 3)
    full = train_rpn(adapter, labels, tmp_path / "full", settings, progress=False)
    assert (tmp_path / "full" / "rpn_model.safetensors").is_file()
    assert full.config.training["batches"] == 10
    assert not torch.equal(initial.q_proj.weight, full.q_proj.weight)

    calls = {"n": 0}

    def interrupting_load(path):
        calls["n"] += 1
        if calls["n"] > 2 * 7:  # dies while loading batch 8, after the checkpoint at batch 6
            raise KeyboardInterrupt
        return load_image(path)

    with pytest.raises(KeyboardInterrupt):
        train_rpn(adapter, labels, tmp_path / "split", settings, progress=False, open_image=interrupting_load)
    state = torch.load(tmp_path / "split" / "resume.pt", weights_only=True)
    assert state["batch"] == 6
    resumed = train_rpn(adapter, labels, tmp_path / "split", settings, progress=False, resume=True)
    reloaded = load_rpn(tmp_path / "split", adapter)
    assert reloaded.config.frozen_layers == 2
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran from a training state",))


def test_a_training_state_holding_code_is_refused(adapter, image_folder, tmp_path, capsys):
    labels = _planted_labels(adapter, image_folder, tmp_path / "labels")
    (tmp_path / "rpn").mkdir()
    torch.save({"rpn": {}, "batch": _Exploit()}, tmp_path / "rpn" / "resume.pt")
    settings = TrainSettings(frozen_layers=2, rpn_layers=3, batch_size=2, epochs=1)
    with pytest.raises(SdrpnError, match="is not a training state sdrpn wrote"):
        train_rpn(adapter, labels, tmp_path / "rpn", settings, progress=False, resume=True)
    assert "code ran" not in capsys.readouterr().out


def test_resume_with_other_settings_is_refused(adapter, image_folder, tmp_path):
    labels = _planted_labels(adapter, image_folder, tmp_path / "labels")
    settings = TrainSettings(frozen_layers=2, rpn_layers=3, batch_size=2, epochs=1, save_every=2)
    train_rpn(adapter, labels, tmp_path / "rpn", settings, progress=False, max_steps=2)
    other = TrainSettings(frozen_layers=2, rpn_layers=3, batch_size=3, epochs=1, save_every=2)
    with pytest.raises(SdrpnError, match="other settings or data"):
        train_rpn(adapter, labels, tmp_path / "rpn", other, progress=False, resume=True, max_steps=2)


def test_training_opens_only_images_inside_the_recorded_root(adapter, image_folder, tmp_path):
    labels = _planted_labels(adapter, image_folder, tmp_path / "labels")
    meta = json.loads((labels / "label_settings.json").read_text())
    (labels / "label_settings.json").write_text(json.dumps({**meta, "image_root": str(tmp_path / "elsewhere")}))
    settings = TrainSettings(frozen_layers=2, rpn_layers=3, batch_size=2, epochs=1)
    with pytest.raises(SdrpnError, match="outside the image root"):
        train_rpn(adapter, labels, tmp_path / "rpn", settings, progress=False)


def test_a_kill_while_writing_the_checkpoint_keeps_the_previous_one(adapter, image_folder, tmp_path, monkeypatch):
    from sdrpn import train

    labels = _planted_labels(adapter, image_folder, tmp_path / "labels")
    settings = TrainSettings(
        frozen_layers=2, rpn_layers=3, batch_size=2, grad_accumulation=1, epochs=1, learning_rate=1e-3, save_every=2
    )
    full = train_rpn(adapter, labels, tmp_path / "full", settings, progress=False)
    original = train.atomic_write
    calls = {"n": 0}

    def dying_write(path, write):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (batch 4) dies half-written

            def half(file):
                file.write(b"PK\x03\x04 half")
                raise KeyboardInterrupt

            return original(path, half)
        return original(path, write)

    monkeypatch.setattr(train, "atomic_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        train_rpn(adapter, labels, tmp_path / "split", settings, progress=False)
    monkeypatch.setattr(train, "atomic_write", original)
    assert torch.load(tmp_path / "split" / "resume.pt", weights_only=True)["batch"] == 2
    resumed = train_rpn(adapter, labels, tmp_path / "split", settings, progress=False, resume=True)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_the_released_optimisation_is_the_default_and_updates_are_whole(adapter, family, image_folder, tmp_path):
    """LLaVA-1.5: lr 5e-5, 512 samples per update; Qwen2.5-VL: 1e-4, 128 (accumulation fills what a device
    cannot hold, never more than the run has); a checkpoint is only taken between updates."""
    from sdrpn.train import _schedule

    defaults = adapter.defaults()
    lr, effective = (1e-4, 128) if family == "qwen" else (5e-5, 512)  # DeepSeek-VL takes LLaVA-1.5's
    assert (defaults.learning_rate, defaults.effective_batch) == (lr, effective)
    resolved, batches = _schedule(TrainSettings(batch_size=8), defaults, 100_000, processes=2, max_steps=None)
    assert resolved.learning_rate == lr and resolved.grad_accumulation == effective // 16
    assert batches % resolved.grad_accumulation == 0 and batches >= 100_000 // 16
    resolved, batches = _schedule(TrainSettings(batch_size=2), defaults, 10, processes=1, max_steps=None)
    assert (resolved.grad_accumulation, batches) == (5, 5)  # a tiny run still takes one whole update
    labels = _planted_labels(adapter, image_folder, tmp_path / "labels")
    settings = TrainSettings(frozen_layers=2, rpn_layers=3, batch_size=2, grad_accumulation=2, epochs=1, save_every=1)
    rpn = train_rpn(adapter, labels, tmp_path / "rpn", settings, progress=False)
    assert rpn.config.training["settings"]["learning_rate"] == lr and rpn.config.training["batches"] == 6
