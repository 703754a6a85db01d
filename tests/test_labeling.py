"""Pins the label cache: records, bad samples counted not fatal, and resume after an interruption."""

from __future__ import annotations

import json

import pytest
import torch

from sdrpn.data import read_samples
from sdrpn.errors import SdrpnError
from sdrpn.images import load_image
from sdrpn.labeling import LabelCache, LabelSettings, generate_labels, label_heads_from_text, make_labels
from sdrpn.labels import assign_labels, remove_sinks

SETTINGS = LabelSettings(max_new_tokens=3)


def test_records_hold_answer_maps_and_labels(adapter, image_folder):
    samples = read_samples(image_folder / "data.jsonl").samples[:3]
    report = generate_labels(adapter, samples, image_folder / "labels", SETTINGS, batch_size=2, progress=False)
    assert report.labelled == 3 and report.bad == []
    records = list(LabelCache(image_folder / "labels").records())
    assert [r["sample_id"] for r in records] == [s.sample_id for s in samples]
    images = [load_image(s.image_path) for s in samples]
    grids = adapter.prepare(images, [[s.question] for s in samples], training=True).grids
    for record, grid in zip(records, grids):
        assert record["raw_map"].shape == record["norms"].shape == grid and tuple(record["grid"]) == grid
        expected = assign_labels(remove_sinks(record["raw_map"], record["norms"]))
        assert torch.equal(record["labels"].long(), expected)
    settings = LabelCache(image_folder / "labels").settings()["settings"]
    layers = adapter.attention_shape.num_layers
    middle_band = {str(layer): None for layer in range(layers // 4, layers // 2 + 1)}
    assert settings["label_heads"] == middle_band  # the default for a model that is no known checkpoint, recorded


def test_bad_samples_are_counted_not_fatal(adapter, image_folder):
    (image_folder / "3.png").write_text("not an image")
    (image_folder / "5.png").unlink()
    samples = read_samples(image_folder / "data.jsonl").samples  # 5.png is reported by the reader
    assert len(samples) == 9
    report = generate_labels(adapter, samples, image_folder / "labels", SETTINGS, batch_size=4, progress=False)
    assert report.labelled == 8 and len(report.bad) == 1
    assert "3.png" in report.bad[0] and "\n" not in report.bad[0]


def test_resume_after_interruption_loses_nothing(adapter, image_folder, monkeypatch):
    samples = read_samples(image_folder / "data.jsonl").samples
    reference = generate_labels(
        adapter, samples, image_folder / "reference", SETTINGS, batch_size=2, shard_size=2, progress=False
    )
    assert reference.labelled == 10
    from sdrpn import labeling

    original = labeling.teacher_attention
    calls = {"n": 0}

    def dying_teacher(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(labeling, "teacher_attention", dying_teacher)
    with pytest.raises(KeyboardInterrupt):
        generate_labels(adapter, samples, image_folder / "run", SETTINGS, batch_size=2, shard_size=2, progress=False)
    monkeypatch.undo()
    assert len(LabelCache(image_folder / "run").done_ids()) == 6
    resumed = generate_labels(
        adapter, samples, image_folder / "run", SETTINGS, batch_size=2, shard_size=2, progress=False
    )
    assert (resumed.skipped_done, resumed.labelled) == (6, 4)
    done = list(LabelCache(image_folder / "run").records())
    expected = {r["sample_id"]: r for r in LabelCache(image_folder / "reference").records()}
    assert sorted(r["sample_id"] for r in done) == sorted(expected)  # no loss, no duplicates
    for record in done:
        assert torch.equal(record["labels"], expected[record["sample_id"]]["labels"])
        assert record["answer"] == expected[record["sample_id"]]["answer"]
    assert [p.name for p in (image_folder / "run").glob(".*")] == [".lock"]  # no temporary files left behind


def test_other_settings_in_the_same_folder_refuse(adapter, image_folder):
    samples = read_samples(image_folder / "data.jsonl").samples[:1]
    generate_labels(adapter, samples, image_folder / "labels", SETTINGS, progress=False)
    with pytest.raises(SdrpnError, match="other settings"):
        generate_labels(
            adapter, samples, image_folder / "labels", LabelSettings(max_new_tokens=3, fg=0.3), progress=False
        )


def test_sink_rules_and_layer_parsing():
    raw = torch.full((1, 4, 4), 0.01)
    raw[0, 0, 0], raw[0, 3, 3] = 1.0, 0.5  # a sink in the corner, the object in the other
    sinks = torch.zeros(1, 4, 4)
    sinks[0, 0, 0] = 0.5
    by_attention = make_labels(raw[0], None, sinks[0], LabelSettings(sink_rule="attention", sink_threshold=1e-3))[None]
    assert by_attention[0, 3, 3] == 1 and by_attention[0, 0, 0] == 0 and int((by_attention == 1).sum()) == 1
    norms = torch.ones(1, 4, 4)
    norms[0, 0, 0] = 50.0
    assert torch.equal(make_labels(raw[0], norms[0], None, LabelSettings(sink_rule="norm"))[None], by_attention)
    kept = make_labels(raw[0], None, None, LabelSettings(sink_rule="none"))
    assert bool((kept == -1).all())  # with the sink as foreground the box spans the grid: dropped
    assert label_heads_from_text("14:24,13,26;15") == {14: [24, 13, 26], 15: None}
    assert label_heads_from_text("text-rich") == "text-rich"  # a named set of the model's
    with pytest.raises(SdrpnError, match="cannot parse"):
        label_heads_from_text("x:1")
    with pytest.raises(SdrpnError, match="sink_rule"):
        LabelSettings(sink_rule="magic")
    assert json.loads(json.dumps(LabelSettings(label_heads={3: [1]}).to_json()))["label_heads"] == {"3": [1]}


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    with cache.lock():
        with pytest.raises(SdrpnError, match=r"is being written by pid \d+ on .* since"):
            with LabelCache(tmp_path / "labels").lock():
                pass
    with LabelCache(tmp_path / "labels").lock():  # released: the next run takes it
        pass


def test_two_writers_shards_never_collide_and_readers_skip_duplicates(tmp_path):
    cache = LabelCache(tmp_path)
    record = {"sample_id": "a", "raw_map": torch.zeros(2, 2)}
    first, second = (
        cache.write_shard([record]),
        LabelCache(tmp_path).write_shard([record, {**record, "sample_id": "b"}]),
    )
    assert first != second and len(cache.shards()) == 2
    assert [r["sample_id"] for r in cache.records()] == ["a", "b"]


def test_resuming_with_another_data_file_is_refused_unless_forced(tmp_path):
    cache = LabelCache(tmp_path)
    settings = LabelSettings(label_heads={1: None}, sink_rule="none", sink_threshold=1e-3)
    cache.start("m", settings, data="aaaa")
    cache.start("m", settings, data="aaaa")  # the same file: resumes
    with pytest.raises(SdrpnError, match="another data file"):
        cache.start("m", settings, data="bbbb")
    cache.start("m", settings, data="bbbb", force=True)
    assert cache.settings()["data"] == "bbbb"
    with pytest.raises(SdrpnError, match="other settings or model"):
        cache.start("other-model", settings, data="bbbb")


def test_temporaries_left_by_a_killed_run_are_cleaned(adapter, image_folder):
    out = image_folder / "labels"
    out.mkdir()
    stale = out / ".shard-00000-1a2b3c4d.pt.0badf00d"
    stale.write_bytes(b"half a shard")
    keep = out / "notes.txt"
    keep.write_text("mine")
    samples = read_samples(image_folder / "data.jsonl").samples[:2]
    generate_labels(adapter, samples, out, SETTINGS, batch_size=2, progress=False)
    assert not stale.exists() and keep.read_text() == "mine"


def test_a_kill_at_any_write_loses_nothing_and_duplicates_nothing(adapter, image_folder, monkeypatch):
    """Die inside each shard write in turn (the file half-written), resume, and compare with an unbroken run."""
    from sdrpn import files

    samples = read_samples(image_folder / "data.jsonl").samples[:6]
    generate_labels(adapter, samples, image_folder / "reference", SETTINGS, batch_size=2, shard_size=2, progress=False)
    expected = {r["sample_id"]: r["answer"] for r in LabelCache(image_folder / "reference").records()}
    original = files.atomic_write
    for kill_at in (1, 2, 3):
        out = image_folder / f"run{kill_at}"
        calls = {"n": 0}

        def dying_write(path, write, kill_at=kill_at, calls=calls):
            calls["n"] += 1
            if calls["n"] == kill_at:  # the kill_at-th shard dies half-written

                def half(file):
                    file.write(b"PK\x03\x04 half")
                    raise KeyboardInterrupt

                return original(path, half)
            return original(path, write)

        monkeypatch.setattr("sdrpn.labeling.atomic_write", dying_write)
        with pytest.raises(KeyboardInterrupt):
            generate_labels(adapter, samples, out, SETTINGS, batch_size=2, shard_size=2, progress=False)
        monkeypatch.setattr("sdrpn.labeling.atomic_write", original)
        generate_labels(adapter, samples, out, SETTINGS, batch_size=2, shard_size=2, progress=False)
        got = [r["sample_id"] for r in LabelCache(out).records()]
        assert sorted(got) == sorted(expected) and len(got) == len(set(got))
        assert {r["sample_id"]: r["answer"] for r in LabelCache(out).records()} == expected


def test_labels_from_the_datas_answers_make_the_model_say_them(adapter, image_folder):
    """The paper's ablation: the teacher is made to say the data's answer; its attention while saying it is
    the map (equal to eager attention over [prompt + that answer], as for its own answers)."""
    from sdrpn.attention import teacher_attention
    from sdrpn.data import Sample
    from sdrpn.images import load_image
    from sdrpn.labeling import _answer_ids

    base = read_samples(image_folder / "data.jsonl").samples[:2]
    samples = [Sample(s.sample_id, s.image_path, s.question, answer) for s, answer in zip(base, ["red", "top left"])]
    batch = adapter.prepare([load_image(s.image_path) for s in samples], [[s.question] for s in samples])
    forced = _answer_ids(adapter, samples)
    output = teacher_attention(adapter, batch, {1: None}, max_new_tokens=5, forced_answers=forced)
    assert output.answers == ["red", "top left"]
    assert output.response_lengths.tolist() == [len(ids) for ids in forced]  # the answer, then EOS
    report = generate_labels(
        adapter,
        [*samples, Sample("none", base[0].image_path, "where ?", None)],
        image_folder / "gt",
        LabelSettings(max_new_tokens=5, answers="dataset"),
        progress=False,
    )
    assert report.labelled == 2 and "no answer in the data" in report.bad[0]
    assert [r["answer"] for r in LabelCache(image_folder / "gt").records()] == ["red", "top left"]
