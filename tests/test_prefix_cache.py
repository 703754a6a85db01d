"""Pins `train --cache-prefix`: training on cached frozen-layer outputs equals training without them, a warm cache
runs no frozen layer, and a cache made for something else is refused or recomputed."""

from __future__ import annotations

import json

import pytest
import torch

from sdrpn.errors import SdrpnError
from sdrpn.prefix_cache import MANIFEST_NAME, PrefixCache
from sdrpn.train import TrainSettings, train_rpn
from tests.test_train import _planted_labels

SETTINGS = TrainSettings(frozen_layers=2, rpn_layers=2, batch_size=3, grad_accumulation=1, epochs=2, learning_rate=1e-3)


def _counting_prefix(adapter, monkeypatch) -> dict:
    calls = {"n": 0}
    original = adapter.prefix_hidden

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter, "prefix_hidden", counted)
    return calls


def test_training_on_the_cache_equals_training_without(adapter, image_folder, tmp_path, monkeypatch):
    labels = _planted_labels(adapter, image_folder, tmp_path / "labels")
    plain = train_rpn(adapter, labels, tmp_path / "plain", SETTINGS, progress=False)
    calls = _counting_prefix(adapter, monkeypatch)
    cold = train_rpn(adapter, labels, tmp_path / "cold", SETTINGS, progress=False, prefix_cache=tmp_path / "cache")
    first_epoch = calls["n"]
    assert 0 < first_epoch <= 4  # 10 samples in batches of 3: the first epoch's batches only (rows may repeat)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 10
    warm = train_rpn(adapter, labels, tmp_path / "warm", SETTINGS, progress=False, prefix_cache=tmp_path / "cache")
    assert calls["n"] == first_epoch  # every batch of the second run was read from disk
    for rpn in (cold, warm):
        for (name, a), (_, b) in zip(plain.state_dict().items(), rpn.state_dict().items()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_a_cache_for_something_else_is_refused_or_recomputed(adapter, image_folder, tmp_path, monkeypatch):
    labels = _planted_labels(adapter, image_folder, tmp_path / "labels")
    one_epoch = TrainSettings(**{**SETTINGS.__dict__, "epochs": 1})
    train_rpn(adapter, labels, tmp_path / "rpn", one_epoch, progress=False, prefix_cache=tmp_path / "cache")
    with pytest.raises(SdrpnError, match="another base model, B or dtype"):
        PrefixCache(tmp_path / "cache", adapter, frozen_layers=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SdrpnError, match="folder of other files"):
        PrefixCache(tmp_path / "other", adapter, frozen_layers=2)
    manifest = tmp_path / "cache" / MANIFEST_NAME
    assert json.loads(manifest.read_text())["frozen_layers"] == 2

    cache = PrefixCache(tmp_path / "cache", adapter, frozen_layers=2)
    before = set((tmp_path / "cache").glob("*.safetensors"))
    batch = adapter.prepare(_images(image_folder, 2), [["what colour is the object ?"], ["where ?"]], training=True)
    ids = ["0-renamed", "1-renamed"]
    calls = _counting_prefix(adapter, monkeypatch)
    fresh = cache.prefix(batch, ids)  # unknown samples: computed and stored
    again = cache.prefix(batch, ids)
    assert calls["n"] == 1
    mask = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(again[mask], fresh[mask])
    new = sorted(set((tmp_path / "cache").glob("*.safetensors")) - before)
    assert len(new) == 2
    new[0].write_bytes(new[0].read_bytes()[:100])  # damaged outside sdrpn: computed again, and stored whole
    cache.prefix(batch, ids)
    cache.prefix(batch, ids)
    assert calls["n"] == 2
    other_question = adapter.prepare(_images(image_folder, 2), [["what is red ?"], ["where ?"]], training=True)
    cache.prefix(other_question, ids)  # same ids, another prompt: not the stored entries
    assert calls["n"] == 3
    images = _images(image_folder, 2)
    images[1] = images[1].transpose(0)  # another picture under the same sample id, same prompt tokens
    other_image = adapter.prepare(images, [["what is red ?"], ["where ?"]], training=True)
    assert torch.equal(other_image.inputs["input_ids"], other_question.inputs["input_ids"])
    cache.prefix(other_image, ids)
    assert calls["n"] == 4
    cache.prefix(other_image, ids)
    assert calls["n"] == 4


def _images(folder, count):
    from sdrpn.images import load_image

    return [load_image(folder / f"{index}.png") for index in range(count)]
