"""Benchmark readers on tiny fake copies of each published layout, bad records included."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdrpn.errors import SdrpnError
from sdrpn.evaluation.benchmarks import BENCHMARKS, ReadContext, read_benchmark
from sdrpn.evaluation.readers import SHORT_ANSWER
from sdrpn.images import load_image


def png(width: int = 24, height: int = 16, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict], image_as: str = "struct") -> None:
    """Rows as `datasets` writes them: the image a {"bytes", "path"} struct (or base64 text, HR-Bench); a row
    without one gets a small PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        data = row.pop("image", None) or png()
        row["image"] = {"bytes": data, "path": None} if image_as == "struct" else base64.b64encode(data).decode()
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def save_png(path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(**kwargs))


TEN = ["stop"] * 10


def textvqa_hf(root: Path):
    rows = [
        {"question_id": 1, "question": "what does the SIGN say?", "answers": TEN, "image": png()},
        {"question_id": 2, "question": "what?", "answers": TEN[:9], "image": png()},  # 9 answers
        {"question_id": 3, "question": "", "answers": TEN, "image": png()},  # no question
        {"question_id": 4, "question": "and here?", "answers": TEN, "image": png(8, 8)},
    ]
    write_parquet(root / "textvqa/data/validation-00000-of-00001.parquet", rows)
    return 2, 2


def textvqa_original(root: Path):
    folder = root / "textvqa"
    save_png(folder / "train_images/abc.jpg")
    records = [
        {"question_id": 7, "question": "what brand?", "image_id": "abc", "answers": TEN},
        {"question_id": 8, "question": "what brand?", "image_id": "abc", "answers": "stop"},  # not a list of ten
    ]
    write_json(folder / "TextVQA_0.5.1_val.json", {"data": records})
    return 1, 1


def docvqa_original(root: Path):
    folder = root / "docvqa"
    save_png(folder / "documents/p1.png")
    records = [
        {"questionId": 1, "question": "total?", "image": "documents/p1.png", "answers": ["$5", "5"]},
        {"questionId": 2, "question": "total?", "image": "../../outside.png", "answers": ["5"]},
        {"questionId": 3, "question": "total?", "image": "documents/p1.png"},  # no answers
        {"questionId": 1, "question": "again?", "image": "documents/p1.png", "answers": ["x"]},  # repeated key
    ]
    write_json(folder / "val_v1.0.json", {"data": records})
    return 1, 3


def infovqa_hf(root: Path):
    rows = [{"questionId": i, "question": f"q{i}", "answers": ["a"], "image": png()} for i in range(3)]
    write_parquet(root / "infovqa/InfographicVQA/validation-00000-of-00001.parquet", rows)
    return 3, 0


def chartqa_original(root: Path):
    folder = root / "chartqa/test"
    save_png(folder / "png/c1.png")
    write_json(folder / "test_human.json", [{"imgname": "c1.png", "query": "peak?", "label": "12"}])
    write_json(folder / "test_augmented.json", [{"imgname": "c1.png", "query": "low?"}, "not a record"])
    return 1, 2


def ocrbench_hf(root: Path):
    rows = [
        {"question": "read it", "answer": ["HELLO"], "dataset": "IIIT5K", "question_type": "Regular Text Recognition"},
        {"question": "read it", "answer": [""], "dataset": "IIIT5K", "question_type": "Regular Text Recognition"},
    ]
    write_parquet(root / "ocrbench/data/test-00000-of-00001.parquet", rows)
    return 1, 1


def ocrbench_original(root: Path):
    folder = root / "ocrbench"
    save_png(folder / "OCRBench_Images/IIIT5K/1.png")
    record = {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/1.png", "question": "read", "answers": "HI"}
    write_json(folder / "OCRBench.json", [{**record, "type": "Regular Text Recognition"}])
    return 1, 0


def pope_original(root: Path):
    folder = root / "pope"
    save_png(folder / "val2014/COCO_1.jpg")
    lines = [
        json.dumps({"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog?", "label": "yes"}),
        "{broken",
        json.dumps({"question_id": 2, "image": "COCO_1.jpg", "text": "Is there a cat?", "label": "maybe"}),
        json.dumps({"question_id": 3, "image": "COCO_1.jpg", "text": "Is there a car?", "label": "no"}),
    ]
    (folder / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    return 2, 2


def pope_hf(root: Path):
    rows = [
        {"question_id": "1", "question": "Is there a dog?", "answer": "yes", "category": "adversarial", "image": png()},
        {"question_id": "1", "question": "Is there a dog?", "answer": "no", "category": "random", "image": png()},
    ]
    write_parquet(root / "pope/data/test-00000-of-00001.parquet", rows)
    return 2, 0


def vstar_hf(root: Path):
    rows = [
        {"question_id": 0, "text": "What colour? (A) red (B) blue", "label": "A", "category": "direct_attributes"},
        {"question_id": 1, "text": "What colour? no options", "label": "A", "category": "direct_attributes"},
        {"question_id": 2, "text": "Left? (A) yes (B) no", "label": "C", "category": "relative_position"},
    ]
    write_parquet(root / "vstar/test-00000-of-00001.parquet", rows)
    return 1, 2


def vstar_original(root: Path):
    folder = root / "vstar"
    save_png(folder / "direct_attributes/sa_1.jpg")
    write_json(
        folder / "direct_attributes/sa_1.json", {"question": "What colour is the cup?", "options": ["red", "blue"]}
    )
    write_json(
        folder / "relative_position/sa_2.json", {"question": "Is it left?", "options": ["yes", "no"]}
    )  # no image
    (folder / "direct_attributes/sa_3.json").write_text("{broken")
    return 1, 2


def hrbench_tsv(root: Path):
    header = "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage"
    image = base64.b64encode(png()).decode()
    lines = [
        header,
        f"0\tWhat colour?\tB\tsingle\tred\tblue\tgreen\twhite\tcycle0\t{image}",
        f"1\tWhat colour?\tE\tsingle\tred\tblue\tgreen\twhite\tcycle0\t{image}",  # not an option
    ]
    (root / "hrbench4k").mkdir(parents=True)
    (root / "hrbench4k/hr_bench_4k.tsv").write_text("\n".join(lines) + "\n")
    return 1, 1


def hrbench_parquet(root: Path):
    rows = [
        {"index": i, "question": "Which?", "answer": "A", "category": c, "A": "x", "B": "y", "C": "z", "D": "w"}
        | {"cycle_category": f"cycle{i % 2}", "image": png()}
        for i, c in enumerate(["single", "cross", "single"])
    ]
    write_parquet(root / "hrbench8k/hr_bench_8k.parquet", rows, image_as="base64")
    return 3, 0


def generic_jsonl(root: Path):
    folder = root / "jsonl"
    save_png(folder / "imgs/a.png")
    lines = [
        json.dumps({"id": "a", "image": "imgs/a.png", "question": "colour?", "answer": "red"}),
        json.dumps({"image": "imgs/a.png", "question": "shape?", "answers": ["square", "box"], "category": "shape"}),
        json.dumps({"image": "imgs/a.png", "answer": "red"}),  # no question
    ]
    (folder / "mine.jsonl").write_text("\n".join(lines) + "\n")
    return 2, 1


LAYOUTS = {
    "textvqa": [textvqa_hf, textvqa_original],
    "docvqa": [docvqa_original],
    "infovqa": [infovqa_hf],
    "chartqa": [chartqa_original],
    "ocrbench": [ocrbench_hf, ocrbench_original],
    "pope": [pope_original, pope_hf],
    "vstar": [vstar_hf, vstar_original],
    "hrbench4k": [hrbench_tsv],
    "hrbench8k": [hrbench_parquet],
    "jsonl": [generic_jsonl],
}


@pytest.mark.parametrize(("name", "build"), [(n, b) for n, builds in LAYOUTS.items() for b in builds])
def test_layout(tmp_path, name, build):
    usable, skipped = build(tmp_path)
    data = read_benchmark(name, tmp_path, ReadContext())
    assert len(data.samples) == usable, data.skipped
    assert len(data.skipped) == skipped, data.skipped
    assert all(":" in reason for reason in data.skipped)  # each names where
    for sample in data.samples:
        assert sample.question.strip() and sample.answers
        assert load_image(sample.image()).size[0] > 0
    assert len({s.key for s in data.samples}) == usable


def test_every_benchmark_has_a_layout_under_test():
    assert set(LAYOUTS) | {"toy"} == set(BENCHMARKS)


def test_prompts_as_lmms_eval_asks(tmp_path):
    textvqa_hf(tmp_path)
    first = read_benchmark("textvqa", tmp_path, ReadContext()).samples[0]
    assert first.question == "What does the sign say?" + SHORT_ANSWER  # lmms-eval capitalises (and lowers the rest)
    assert first.answers == TEN
    vstar_hf(tmp_path)
    sample = read_benchmark("vstar", tmp_path, ReadContext()).samples[0]
    assert sample.question.startswith("What colour?\nA. red\nB. blue\nAnswer with the option's letter")
    assert sample.options == {"A": "red", "B": "blue"} and sample.answers == ["A"]
    hrbench_parquet(tmp_path)
    sample = read_benchmark("hrbench8k", tmp_path, ReadContext()).samples[1]
    assert sample.category == "cross" and sample.extra["cycle"] == "cycle1"
    assert sample.question.endswith("D. w\nAnswer the option letter directly.")


def test_limit_keeps_the_first_samples(tmp_path):
    infovqa_hf(tmp_path)
    data = read_benchmark("infovqa", tmp_path, ReadContext(limit=2))
    assert [s.question.split("\n")[0] for s in data.samples] == ["q0", "q1"]


def test_missing_data_names_the_files_expected(tmp_path):
    with pytest.raises(
        SdrpnError, match=r"docvqa: no data in '.*docvqa'; expected .*validation-\*\.parquet.*val_v1\.0"
    ):
        read_benchmark("docvqa", tmp_path, ReadContext())
    with pytest.raises(SdrpnError, match="needs --data-root"):
        read_benchmark("pope", None, ReadContext())
    with pytest.raises(SdrpnError, match="unknown benchmark 'mmmu'"):
        read_benchmark("mmmu", tmp_path, ReadContext())


def test_corrupt_image_fails_alone_when_opened(tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"not an image")
    save_png(folder / "good.png")
    lines = [
        {"image": "bad.png", "question": "q", "answer": "a"},
        {"image": "good.png", "question": "q", "answer": "a"},
    ]
    (folder / "d.jsonl").write_text("\n".join(map(json.dumps, lines)))
    bad, good = read_benchmark("jsonl", tmp_path, ReadContext()).samples
    with pytest.raises(SdrpnError, match="bad.png"):
        load_image(bad.image())
    assert load_image(good.image()).size == (24, 16)


def test_toy_scenes_carry_their_ground_truth():
    from sdrpn.toyworld import world

    data = read_benchmark("toy", None, ReadContext(limit=5, seed=3))
    truth = world.make_samples(5, 3)
    assert [s.answers[0] for s in data.samples] == [t.answer for t in truth]
    assert [s.question for s in data.samples] == [t.question for t in truth]
    assert data.samples[0].image().tobytes() == truth[0].image.tobytes()


def test_a_key_repeated_in_another_shard_is_skipped(tmp_path):
    for shard in range(2):
        row = {"question_id": 5, "question": f"shard {shard}?", "answers": TEN, "image": png()}
        write_parquet(tmp_path / f"textvqa/data/validation-0000{shard}-of-00002.parquet", [row])
    data = read_benchmark("textvqa", tmp_path, ReadContext())
    assert [s.question.split("\n")[0] for s in data.samples] == ["Shard 0?"]
    assert data.skipped == ["key '5': repeats a sample of an earlier file"]
