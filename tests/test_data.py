"""Pins `read_samples` (both formats, every bad-record reason, stable ids) and `shuffled_subset`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdrpn.data import ReadReport, Sample, _content_key, read_samples, shuffled_subset
from sdrpn.errors import SdrpnError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A dataset folder with two images (content is irrelevant: the reader only checks they exist)."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"jpeg")
    return tmp_path


def _llava(image: str | None = "imgs/a.jpg", question: str = "<image>\nWhat is it?", **extra: object) -> dict:
    record: dict = {
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "It sleeps."},
        ],
        **extra,
    }
    if image is not None:
        record["image"] = image
    return record


def _write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _single_bad(report: ReadReport) -> str:
    assert report.samples == []
    assert len(report.bad) == 1
    assert "\n" not in report.bad[0]
    return report.bad[0]


# --- LLaVA JSON ----------------------------------------------------------------------------------------


def test_llava_json(root: Path) -> None:
    path = _write_json(root / "llava.json", [_llava(id="000001"), _llava("imgs/b.jpg", "Where?\n<image>")])
    report = read_samples(path)
    assert report.bad == []
    first, second = report.samples
    assert first == Sample("000001", (root / "imgs/a.jpg").resolve(), "What is it?", "A cat.")
    assert second.sample_id == f"llava:{_content_key('imgs/b.jpg', 'Where?')}"  # no "id": stem + content
    assert second.question == "Where?"
    assert second.image_path.is_absolute()


def test_llava_placeholder_in_the_middle_leaves_single_spaces(root: Path) -> None:
    path = _write_json(root / "d.json", [_llava(question="Look:\n <image> \nwhat colour?")])
    assert read_samples(path).samples[0].question == "Look: what colour?"


def test_llava_record_without_gpt_turn_has_no_answer(root: Path) -> None:
    record = {"image": "imgs/a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ?"}]}
    sample = read_samples(_write_json(root / "d.json", [record])).samples[0]
    assert (sample.question, sample.answer) == ("Q?", None)


def test_llava_record_without_image_is_bad(root: Path) -> None:
    path = _write_json(root / "d.json", [_llava(), _llava(image=None)])
    report = read_samples(path)
    assert len(report.samples) == 1
    assert report.bad == [f"{path}[1]: no image"]


def test_llava_record_without_human_turn_is_bad(root: Path) -> None:
    record = {"image": "imgs/a.jpg", "conversations": [{"from": "gpt", "value": "hi"}]}
    message = _single_bad(read_samples(_write_json(root / "d.json", [record])))
    assert message.startswith(f"{root / 'd.json'}[0]: no question")


def test_llava_question_that_is_only_the_placeholder_is_bad(root: Path) -> None:
    path = _write_json(root / "d.json", [_llava(question=" <image>\n  ")])
    assert _single_bad(read_samples(path)) == f"{path}[0]: empty question"


def test_json_list_record_that_is_not_an_object(root: Path) -> None:
    path = _write_json(root / "d.json", [_llava(), ["imgs/a.jpg"]])
    report = read_samples(path)
    assert len(report.samples) == 1
    assert report.bad == [f"{path}[1]: not a JSON object (got a JSON array)"]


def test_multi_image_record_is_bad(root: Path) -> None:
    path = _write_json(root / "d.json", [_llava(image=["imgs/a.jpg", "imgs/b.jpg"])])  # type: ignore[arg-type]
    assert "image must be a string" in _single_bad(read_samples(path))


def test_broken_json_list_is_a_file_error_with_line(root: Path) -> None:
    path = root / "d.json"
    path.write_text('\n[\n  {"image": "imgs/a.jpg",\n   "question": "Q" "x"}\n]\n')  # leading blank line
    with pytest.raises(SdrpnError, match=r"d\.json:4: invalid JSON \(Expecting ',' delimiter"):
        read_samples(path)


# --- JSONL ---------------------------------------------------------------------------------------------


def test_jsonl(root: Path) -> None:
    path = _write_jsonl(
        root / "qa.jsonl",
        [
            {"image": "imgs/a.jpg", "question": "What?", "answer": "cat", "id": "x1"},
            "",
            "   ",
            {"image": "imgs/b.jpg", "question": "<image>\nHow many?", "answer": 3},
            {"image": "imgs/b.jpg", "question": "Which?", "id": 7},
        ],
    )
    report = read_samples(path)
    assert report.bad == []
    assert [s.sample_id for s in report.samples] == ["x1", f"qa:{_content_key('imgs/b.jpg', 'How many?')}", "7"]
    assert [s.question for s in report.samples] == ["What?", "How many?", "Which?"]
    assert [s.answer for s in report.samples] == ["cat", "3", None]
    assert report.samples[1].image_path == (root / "imgs" / "b.jpg").resolve()


def test_jsonl_with_bom_and_crlf(root: Path) -> None:
    path = root / "win.jsonl"
    line = json.dumps({"image": "imgs/a.jpg", "question": "Q?"})
    path.write_bytes(("\ufeff" + line + "\r\n" + line.replace("Q?", "R?") + "\r\n").encode())
    assert [s.question for s in read_samples(path).samples] == ["Q?", "R?"]


def test_single_line_jsonl(root: Path) -> None:
    path = _write_jsonl(root / "one.jsonl", [{"image": "imgs/a.jpg", "question": "Q?"}])
    assert [s.sample_id for s in read_samples(path).samples] == [f"one:{_content_key('imgs/a.jpg', 'Q?')}"]


def test_unicode_line_separator_inside_a_string_does_not_split_the_line(root: Path) -> None:
    path = root / "u.jsonl"
    path.write_text('{"image": "imgs/a.jpg", "question": "a\u2028b"}\n', encoding="utf-8")
    assert read_samples(path).samples[0].question == "a\u2028b"


def test_jsonl_records_in_llava_shape(root: Path) -> None:
    path = _write_jsonl(root / "l.jsonl", [_llava()])
    assert read_samples(path).samples[0].question == "What is it?"


def test_jsonl_invalid_json_line_names_the_line(root: Path) -> None:
    good = {"image": "imgs/a.jpg", "question": "Q?"}
    other = {"image": "imgs/a.jpg", "question": "R?"}
    path = _write_jsonl(root / "data.jsonl", [good, "", '{"image": "imgs/a.jpg" "question": "Q?"}', other])
    report = read_samples(path)
    assert len(report.samples) == 2
    assert report.bad == [f"{path}:3: invalid JSON (Expecting ',' delimiter at column 24)"]


def test_a_line_that_is_not_utf8_is_skipped_and_the_rest_read(root: Path) -> None:
    lines = [json.dumps({"image": "imgs/a.jpg", "question": f"Q{i}?"}).encode() for i in range(3)]
    lines[1] = lines[1].replace(b"Q1", b"Q\xff")
    path = root / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = read_samples(path)
    assert [s.question for s in report.samples] == ["Q0?", "Q2?"]
    assert report.bad == [f"{path}:2: not UTF-8 text"]


def test_the_same_image_and_question_twice_is_one_sample(root: Path) -> None:
    good = {"image": "imgs/a.jpg", "question": "Q?"}
    report = read_samples(_write_jsonl(root / "d.jsonl", [good, good]))
    assert len(report.samples) == 1 and "duplicate id" in report.bad[0]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"image": "imgs/a.jpg"}, "no question"),
        ({"image": "imgs/a.jpg", "question": "  \n\t "}, "empty question"),
        ({"image": "imgs/a.jpg", "question": ["Q"]}, "question must be a string, got a JSON array"),
        ({"question": "Q?"}, "no image"),
        ({"image": "", "question": "Q?"}, "no image (empty image path)"),
        ({"image": "imgs/a.jpg", "question": "Q?", "answer": {"x": 1}}, "answer must be a string"),
        ({"image": "imgs/a.jpg", "question": "Q?", "id": ""}, "id must be a non-empty string"),
        ("[1, 2]", "not a JSON object (got a JSON array)"),
    ],
)
def test_jsonl_bad_records(root: Path, record: object, reason: str) -> None:
    path = _write_jsonl(root / "data.jsonl", [{"image": "imgs/b.jpg", "question": "ok"}, record])
    report = read_samples(path)
    assert [s.question for s in report.samples] == ["ok"]
    assert len(report.bad) == 1
    assert report.bad[0].startswith(f"{path}:2: {reason}")
    assert "\n" not in report.bad[0]


# --- image paths ---------------------------------------------------------------------------------------


def test_missing_image_file(root: Path) -> None:
    path = _write_jsonl(root / "d.jsonl", [{"image": "imgs/zzz.jpg", "question": "Q?"}])
    message = _single_bad(read_samples(path))
    assert message.startswith(f"{path}:1: image file 'imgs/zzz.jpg' not found")


def test_image_that_is_a_directory(root: Path) -> None:
    path = _write_jsonl(root / "d.jsonl", [{"image": "imgs", "question": "Q?"}])
    assert "is not a file" in _single_bad(read_samples(path))


@pytest.mark.parametrize("image", ["../outside.jpg", "imgs/../../outside.jpg"])
def test_relative_escape_is_bad(tmp_path: Path, image: str) -> None:
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (tmp_path / "outside.jpg").write_bytes(b"x")  # exists, so only the root check can reject it
    path = _write_jsonl(data / "d.jsonl", [{"image": image, "question": "Q?"}])
    message = _single_bad(read_samples(path))
    assert "resolves outside the image root" in message and message.startswith(f"{path}:1:")


def test_absolute_path_elsewhere_is_bad_but_inside_is_fine(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jpg").write_bytes(b"x")
    (tmp_path / "out.jpg").write_bytes(b"x")
    records = [
        {"image": str(tmp_path / "out.jpg"), "question": "Q?"},
        {"image": str(data / "in.jpg"), "question": "Q?"},
    ]
    report = read_samples(_write_jsonl(data / "d.jsonl", records))
    assert [s.image_path for s in report.samples] == [(data / "in.jpg").resolve()]
    assert len(report.bad) == 1 and "outside the image root" in report.bad[0]


def test_symlink_pointing_outside_is_bad(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (data / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    path = _write_jsonl(data / "d.jsonl", [{"image": "link.jpg", "question": "Q?"}])
    assert "outside the image root" in _single_bad(read_samples(path))


def test_explicit_image_root(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"x")
    meta = tmp_path / "meta"
    meta.mkdir()
    path = _write_jsonl(meta / "d.jsonl", [{"image": "a.jpg", "question": "Q?"}])
    assert _single_bad(read_samples(path)).startswith(f"{path}:1: image file 'a.jpg' not found")
    assert read_samples(path, images).samples[0].image_path == (images / "a.jpg").resolve()
    assert read_samples(path, str(images)).bad == []


def test_image_root_that_is_not_a_directory(root: Path) -> None:
    path = _write_jsonl(root / "d.jsonl", [{"image": "imgs/a.jpg", "question": "Q?"}])
    with pytest.raises(SdrpnError, match="image root .*nowhere.* is not a directory"):
        read_samples(path, root / "nowhere")


def test_nul_byte_in_image_path_is_a_bad_record(root: Path) -> None:
    path = _write_jsonl(root / "d.jsonl", [{"image": "imgs/a\u0000.jpg", "question": "Q?"}])
    assert "invalid image path" in _single_bad(read_samples(path))


# --- ids -----------------------------------------------------------------------------------------------


def test_ids_are_stable_across_reads_and_independent_of_bad_records(root: Path) -> None:
    records = [{"image": "imgs/a.jpg", "question": f"Q{i}?"} for i in range(3)]
    first = [s.sample_id for s in read_samples(_write_jsonl(root / "d.jsonl", records)).samples]
    assert first == [f"d:{_content_key('imgs/a.jpg', f'Q{i}?')}" for i in range(3)]
    assert [s.sample_id for s in read_samples(root / "d.jsonl").samples] == first
    records[1] = {"question": "no image"}  # a bad record in between must not shift later ids
    assert [s.sample_id for s in read_samples(_write_jsonl(root / "d.jsonl", records)).samples] == [
        first[0],
        first[2],
    ]
    inserted = [{"image": "imgs/b.jpg", "question": "new?"}, *records]  # nor does a line inserted before them
    again = [s.sample_id for s in read_samples(_write_jsonl(root / "d.jsonl", inserted)).samples]
    assert again[1:] == [first[0], first[2]]


def test_duplicate_ids_are_bad(root: Path) -> None:
    records = [
        {"image": "imgs/a.jpg", "question": "Q?", "id": "dup"},
        {"image": "imgs/b.jpg", "question": "R?", "id": "dup"},
    ]
    path = _write_jsonl(root / "d.jsonl", records)
    report = read_samples(path)
    assert [s.question for s in report.samples] == ["Q?"]
    assert report.bad == [f"{path}:2: duplicate id 'dup' (first at {path}:1)"]


# --- strict mode and file-level errors -----------------------------------------------------------------


def test_strict_raises_on_first_bad_record(root: Path) -> None:
    path = _write_jsonl(
        root / "d.jsonl",
        [{"image": "imgs/a.jpg", "question": "Q?"}, {"question": "Q?"}, "{broken"],
    )
    assert len(read_samples(path).bad) == 2
    with pytest.raises(SdrpnError) as info:
        read_samples(path, strict=True)
    assert str(info.value) == f"{path}:2: no image"


def test_strict_passes_a_clean_file(root: Path) -> None:
    path = _write_jsonl(root / "d.jsonl", [{"image": "imgs/a.jpg", "question": "Q?"}])
    assert len(read_samples(path, strict=True).samples) == 1


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(SdrpnError, match="nope.jsonl: data file not found"):
        read_samples(tmp_path / "nope.jsonl")


def test_directory_as_data_file(tmp_path: Path) -> None:
    with pytest.raises(SdrpnError, match="is a directory"):
        read_samples(tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "empty file"),
        ("  \n\n", "empty file"),
        ("just some notes\nabout the data\n", "neither a JSON list nor JSON Lines .*:1: invalid JSON"),
        ('"a string"', "got a single JSON string"),
        ('{\n  "image": "imgs/a.jpg",\n  "question": "Q?"\n}\n', "got a single JSON object"),
    ],
)
def test_files_in_neither_format(root: Path, content: str, match: str) -> None:
    path = root / "data.txt"
    path.write_text(content)
    with pytest.raises(SdrpnError, match=match) as info:
        read_samples(path)
    assert "data.txt" in str(info.value) and "\n" not in str(info.value)


def test_binary_file(root: Path) -> None:
    path = root / "data.jsonl"
    path.write_bytes(b"\xff\xd8\xff\xe0 binary")
    with pytest.raises(SdrpnError, match="not UTF-8"):
        read_samples(path)


def test_empty_json_list_gives_no_samples(root: Path) -> None:
    path = root / "d.json"
    path.write_text("[]")
    assert read_samples(path) == ReadReport([], [], root.resolve())


# --- shuffled_subset -----------------------------------------------------------------------------------


def _samples(n: int) -> list[Sample]:
    return [Sample(f"s{i}", Path(f"/x/{i}.jpg"), f"Q{i}?", None) for i in range(n)]


def test_subset_is_deterministic_and_seed_dependent() -> None:
    samples = _samples(50)
    first = shuffled_subset(samples, 10, seed=3)
    assert first == shuffled_subset(samples, 10, seed=3)
    assert first != shuffled_subset(samples, 10, seed=4)
    assert len(first) == 10 and len(set(first)) == 10


def test_subset_none_is_a_shuffled_permutation() -> None:
    samples = _samples(20)
    everything = shuffled_subset(samples, None, seed=0)
    assert everything != samples
    assert sorted(everything, key=lambda s: int(s.sample_id[1:])) == samples
    assert everything == shuffled_subset(samples, None, seed=0)


def test_smaller_subset_is_a_prefix_of_larger() -> None:
    samples = _samples(30)
    assert shuffled_subset(samples, 5, seed=1) == shuffled_subset(samples, 12, seed=1)[:5]


def test_subset_does_not_mutate_input_and_handles_edges() -> None:
    samples = _samples(5)
    copy = list(samples)
    assert shuffled_subset(samples, 0, seed=1) == []
    assert len(shuffled_subset(samples, 99, seed=1)) == 5
    assert samples == copy
    assert shuffled_subset(iter(samples), 2, seed=1) == shuffled_subset(samples, 2, seed=1)
    with pytest.raises(SdrpnError, match="max_samples"):
        shuffled_subset(samples, -1, seed=1)


def test_subset_is_pinned_across_python_versions() -> None:
    """random.Random(seed).shuffle is stable; pinning it catches an accidental change of algorithm."""
    ids = [s.sample_id for s in shuffled_subset(_samples(6), None, seed=0)]
    assert ids == ["s4", "s2", "s1", "s0", "s5", "s3"]


def test_sources_keep_the_image_folders_asked_for(root: Path) -> None:
    for folder in ("gqa", "coco", "ocr_vqa"):
        (root / folder).mkdir()
        (root / folder / "x.jpg").write_bytes(b"")
    records = [_llava(f"{folder}/x.jpg", f"Q {folder}?") for folder in ("gqa", "coco", "ocr_vqa")]
    path = _write_json(root / "665k.json", records)
    kept = read_samples(path, sources=["gqa", "ocr_vqa"]).samples
    assert [s.question for s in kept] == ["Q gqa?", "Q ocr_vqa?"]
    assert len(read_samples(path).samples) == 3
