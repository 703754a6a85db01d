"""The benchmarks `sdrpn eval` knows: where each one's files lie, how its questions are asked, how it is scored.

Prompts and generation lengths are lmms-eval's defaults for the task (the paper's numbers come from lmms-eval);
`task` names the per-benchmark RoI threshold preset of a model family (`sdrpn.load(task=...)`).
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdrpn import metrics
from sdrpn.errors import SdrpnError
from sdrpn.evaluation.readers import (
    SHORT_ANSWER,
    BadRecord,
    BenchData,
    BenchSample,
    answer_list,
    collect,
    field_text,
    inside,
    json_records,
    merge,
    options_text,
    parquet_rows,
    tsv_rows,
)

TOY_SAMPLES = 300  # scenes of the toy benchmark without --limit


@dataclass(frozen=True)
class ReadContext:
    limit: int | None = None
    seed: int = 7  # toy scenes
    toy_aspects: list[tuple[int, int]] | None = None  # scene shapes of the toy model (None: square)


Scores = dict  # {"score": main figure in [0, 1], ...sub-scores}


@dataclass(frozen=True)
class Layout:
    """One published layout: the files it consists of (globs under the benchmark's folder) and their reader."""

    patterns: tuple[str, ...]
    read: Callable[[Path, list[Path]], BenchData]  # (folder, matched files) -> samples
    description: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    layouts: tuple[Layout, ...]
    score: Callable[[list[BenchSample], list[str | None]], Scores]
    max_new_tokens: int
    task: str | None = None  # the family's RoI threshold preset for it
    metric: str = ""  # what the main score is, for the report

    def read(self, root: Path, context: ReadContext) -> BenchData:
        folder = root / self.name
        for layout in self.layouts:
            files = sorted({path for pattern in layout.patterns for path in folder.glob(pattern) if path.is_file()})
            if files:
                data = layout.read(folder, files)
                if context.limit is not None:
                    data.samples = data.samples[: context.limit]
                return data
        expected = " or ".join(layout.description for layout in self.layouts)
        raise SdrpnError(f"{self.name}: no data in '{folder}'; expected {expected}")


# --- scores ---------------------------------------------------------------------------------------------------


def _by_category(samples: list[BenchSample], values: list[float]) -> Scores:
    groups: dict[str, list[float]] = defaultdict(list)
    for sample, value in zip(samples, values):
        groups[sample.category].append(value)
    scores: Scores = {"score": statistics.fmean(values) if values else 0.0}
    if len(groups) > 1:
        scores["by_category"] = {name: statistics.fmean(group) for name, group in sorted(groups.items())}
    return scores


def per_sample(metric: Callable[[str | None, BenchSample], float]) -> Callable:
    """A benchmark scored as the mean of a per-sample metric, with a sub-score per category."""
    return lambda samples, predictions: _by_category(samples, [metric(p, s) for p, s in zip(predictions, samples)])


def _pope(samples: list[BenchSample], predictions: list[str | None]) -> Scores:
    labels = [s.answers[0] for s in samples]
    overall = metrics.pope_scores(predictions, labels)
    scores: Scores = {"score": overall["f1"], **overall}
    categories = sorted({s.category for s in samples})
    if len(categories) > 1:
        scores["by_category"] = {
            name: metrics.pope_scores(
                *zip(*[(p, s.answers[0]) for p, s in zip(predictions, samples) if s.category == name])
            )["f1"]
            for name in categories
        }
    return scores


def _hrbench_scores(samples: list[BenchSample], predictions: list[str | None]) -> Scores:
    """HR-Bench's average is the mean over its option cycles of each cycle's accuracy (as lmms-eval aggregates);
    FSP / FCP are the single- and cross-instance questions."""
    right = [float(metrics.parse_option_letter(p, s.options) == s.answers[0]) for p, s in zip(predictions, samples)]
    cycles: dict[str, list[float]] = defaultdict(list)
    for sample, value in zip(samples, right):
        cycles[sample.extra.get("cycle", "")].append(value)
    scores = _by_category(samples, right)
    scores["score"] = statistics.fmean(statistics.fmean(v) for v in cycles.values()) if cycles else 0.0
    return scores


# --- readers --------------------------------------------------------------------------------------------------


def _table_reader(make: Callable[[dict, Callable, str], BenchSample]) -> Callable[[Path, list[Path]], BenchData]:
    """Parquet shards read in order (one sample per row)."""

    def read(folder: Path, files: list[Path]) -> BenchData:
        return merge([collect(parquet_rows(path), _keyed(make, path.stem), path.name) for path in files])

    return read


def _keyed(make, stem: str):
    return lambda record, image, row: make(record, image, f"{stem}:{row}")


def _json_reader(make: Callable[[dict, Path, str], BenchSample]) -> Callable[[Path, list[Path]], BenchData]:
    """Original JSON files (a list, {"data": [...]}, JSON Lines, or one record per file): each record names its
    image relative to the file; a file that is not JSON is skipped like a bad record."""

    def read(folder: Path, files: list[Path]) -> BenchData:
        parts = []
        for path in files:
            try:
                records = json_records(path)
            except (ValueError, UnicodeDecodeError) as error:
                parts.append(BenchData([], [f"{path.name}: not JSON ({' '.join(str(error).split())})"]))
                continue
            records = [records] if isinstance(records, dict) else records  # V*: one record per file
            rows = ((record, None) for record in (records if isinstance(records, list) else []))
            parts.append(collect(rows, lambda record, _, row, path=path: make(record, path, row), path.name))
        return merge(parts)

    return read


def _image_file(folder: Path, relative: str):
    path = inside(folder, relative)
    return lambda: path


def _textvqa_question(question: str) -> str:
    return question.capitalize() + SHORT_ANSWER  # lmms-eval's textvqa prompt (capitalize lowers the rest)


def _textvqa_hf(record, image, row):
    answers = answer_list(record, "answers", count=10)
    return BenchSample(
        field_text(record, "question_id"), _textvqa_question(field_text(record, "question")), image, answers
    )


def _textvqa_json(record, path, row):
    folder = path.parent
    image = _image_file(folder, f"train_images/{field_text(record, 'image_id')}.jpg")
    answers = answer_list(record, "answers", count=10)
    return BenchSample(
        field_text(record, "question_id"), _textvqa_question(field_text(record, "question")), image, answers
    )


def _docvqa_hf(record, image, row):
    question = field_text(record, "question") + SHORT_ANSWER
    return BenchSample(field_text(record, "questionId"), question, image, answer_list(record, "answers"))


def _docvqa_json(record, path, row):
    image = _image_file(path.parent, field_text(record, "image"))
    question = field_text(record, "question") + SHORT_ANSWER
    return BenchSample(field_text(record, "questionId"), question, image, answer_list(record, "answers"))


def _infovqa_json(record, path, row):
    image = _image_file(path.parent, f"infographicsvqa_images/{field_text(record, 'image_local_name')}")
    question = field_text(record, "question") + SHORT_ANSWER
    return BenchSample(field_text(record, "questionId"), question, image, answer_list(record, "answers"))


def _chartqa_hf(record, image, key):
    question = field_text(record, "question") + SHORT_ANSWER
    return BenchSample(key, question, image, [field_text(record, "answer")], category=str(record.get("type", "")))


def _chartqa_json(record, path, row):
    image = _image_file(path.parent, f"png/{field_text(record, 'imgname')}")
    split = path.stem.removeprefix("test_")  # test_human.json / test_augmented.json
    question = field_text(record, "query") + SHORT_ANSWER
    return BenchSample(f"{split}:{row}", question, image, [field_text(record, "label")], category=f"{split}_test")


def _ocrbench_sample(key, question, image, record, answers_field, dataset_field, type_field):
    return BenchSample(
        key,
        question,
        image,
        [a for a in answer_list(record, answers_field) if a.strip()] or _no_answer(),
        category=field_text(record, type_field),
        extra={"dataset": field_text(record, dataset_field)},
    )


def _no_answer():
    raise BadRecord("no non-empty answer")


def _ocrbench_hf(record, image, key):
    return _ocrbench_sample(key, field_text(record, "question"), image, record, "answer", "dataset", "question_type")


def _ocrbench_json(record, path, row):
    image = _image_file(path.parent, f"OCRBench_Images/{field_text(record, 'image_path')}")
    key = str(record.get("id", row))
    return _ocrbench_sample(key, field_text(record, "question"), image, record, "answers", "dataset_name", "type")


def _yes_no(record, name: str) -> str:
    answer = field_text(record, name).lower()
    if answer not in ("yes", "no"):
        raise BadRecord(f"'{name}' is {answer!r}, not yes or no")
    return answer


def _pope_hf(record, image, key):
    question = field_text(record, "question") + SHORT_ANSWER
    sample_key = f"{record.get('category', '')}:{field_text(record, 'question_id')}"
    return BenchSample(
        sample_key, question, image, [_yes_no(record, "answer")], category=str(record.get("category", ""))
    )


def _pope_json(record, path, row):
    split = path.stem.rsplit("_", 1)[-1]  # coco_pope_adversarial.json -> adversarial
    image = _image_file(path.parent, f"val2014/{field_text(record, 'image')}")
    question = field_text(record, "text") + SHORT_ANSWER
    key = f"{split}:{field_text(record, 'question_id')}"
    return BenchSample(key, question, image, [_yes_no(record, "label")], category=split)


VSTAR_PROMPT = "\nAnswer with the option's letter from the given choices directly."
_VSTAR_OPTION = re.compile(r"\(([A-D])\)\s*([^()]+?)(?=\s*\([A-D]\)|$)")


def _vstar_hf(record, image, key):
    """The HF copy: "Question? (A) x (B) y" and the letter; the options are re-listed one a line as lmms-eval
    asks them."""
    text = field_text(record, "text")
    options = {letter: option.strip() for letter, option in _VSTAR_OPTION.findall(text)}
    if len(options) < 2:
        raise BadRecord("'text' lists fewer than two options (A), (B)")
    label = field_text(record, "label").upper()
    if label not in options:
        raise BadRecord(f"label {label!r} is not one of the options {sorted(options)}")
    question = options_text(text.split("(A)")[0].strip(), options) + VSTAR_PROMPT
    sample_key = str(record.get("question_id", key))
    return BenchSample(sample_key, question, image, [label], str(record.get("category", "")), options)


def _vstar_json(record, path, row):
    """The original release: <category>/<name>.json beside <name>.jpg, the right option listed first (kept
    first, as the released evaluation asks it)."""
    options_list = record.get("options")
    if not isinstance(options_list, list) or len(options_list) < 2 or not all(isinstance(o, str) for o in options_list):
        raise BadRecord("'options' is not a list of at least two strings")
    options = dict(zip("ABCDEF", options_list))
    images = [p for p in path.parent.glob(f"{path.stem}.*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not images:
        raise BadRecord(f"no image {path.stem}.jpg beside it")
    question = options_text(field_text(record, "question"), options) + VSTAR_PROMPT
    image = images[0]
    return BenchSample(f"{path.parent.name}/{path.stem}", question, lambda: image, ["A"], path.parent.name, options)


def _hrbench_sample(record, image, key):
    options = {letter: str(record[letter]).strip() for letter in "ABCD" if record.get(letter) not in (None, "")}
    if len(options) < 2:
        raise BadRecord("fewer than two options A-D")
    answer = field_text(record, "answer").upper()
    if answer not in options:
        raise BadRecord(f"answer {answer!r} is not one of the options {sorted(options)}")
    question = options_text(field_text(record, "question"), options) + "\nAnswer the option letter directly."
    return BenchSample(
        str(record.get("index", key)),
        question,
        image,
        [answer],
        category=str(record.get("category", "")),
        options=options,
        extra={"cycle": str(record.get("cycle_category", ""))},
    )


def _hrbench_reader(folder: Path, files: list[Path]) -> BenchData:
    parts = []
    for path in files:
        rows = parquet_rows(path) if path.suffix == ".parquet" else tsv_rows(path)
        parts.append(collect(rows, _keyed(_hrbench_sample, path.stem), path.name))
    return merge(parts)


def _jsonl(record, path, row):
    """Generic: {"image", "question", "answer" or "answers", optional "id" and "category"}, exact match."""
    answers = answer_list(record, "answers" if "answers" in record else "answer")
    image = _image_file(path.parent, field_text(record, "image"))
    key = str(record.get("id", f"{path.stem}:{row}"))
    return BenchSample(key, field_text(record, "question"), image, answers, category=str(record.get("category", "")))


def _toy_layout() -> Layout:
    return Layout((), lambda folder, files: BenchData([]), "nothing (scenes are generated)")


def read_toy(context: ReadContext) -> BenchData:
    """Fresh toy-world scenes with their ground truth, as `sdrpn bench toy` makes them for the same seed."""
    from sdrpn.toyworld import pipeline, world

    samples = world.make_samples(context.limit or TOY_SAMPLES, context.seed, aspects=context.toy_aspects)
    return BenchData(
        [
            BenchSample(
                f"{index}:{pipeline.toy_reference(s)}",
                s.question,
                lambda s=s: s.image,
                [s.answer],
                category=s.qtype,
            )
            for index, s in enumerate(samples)
        ]
    )


_mean_vqa = per_sample(lambda p, s: metrics.vqa_accuracy(p, s.answers))
_mean_anls = per_sample(lambda p, s: metrics.anls(p, s.answers))
_mean_relaxed = per_sample(lambda p, s: metrics.relaxed_accuracy(p, s.answers[0]))
_mean_ocrbench = per_sample(lambda p, s: metrics.ocrbench_score(p, s.answers, s.extra.get("dataset", "")))
_mean_choice = per_sample(lambda p, s: float(metrics.parse_option_letter(p, s.options) == s.answers[0]))
_mean_exact = per_sample(lambda p, s: metrics.exact_match(p, s.answers))


def _hf(patterns: tuple[str, ...], make, dataset: str) -> Layout:
    return Layout(patterns, _table_reader(make), f"{' / '.join(patterns)} (Hugging Face {dataset})")


def _original(patterns: tuple[str, ...], read, what: str) -> Layout:
    return Layout(patterns, read, f"{' / '.join(patterns)} ({what})")


def _hrbench_benchmark(size: str) -> Benchmark:
    files = (f"hr_bench_{size}*.parquet", f"hr_bench_{size}*.tsv")
    layout = _original(files, _hrbench_reader, "the HR-Bench release, images in base64")
    return Benchmark(f"hrbench{size}", (layout,), _hrbench_scores, 16, "hrbench", "mean accuracy over option cycles")


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "textvqa",
            (
                _hf(("data/validation-*.parquet", "validation-*.parquet"), _textvqa_hf, "lmms-lab/textvqa"),
                _original(
                    ("TextVQA_0.5.1_val.json",),
                    _json_reader(_textvqa_json),
                    "the original release with its images in train_images/",
                ),
            ),
            _mean_vqa,
            32,
            "textvqa",
            "VQA accuracy",
        ),
        Benchmark(
            "docvqa",
            (
                _hf(("DocVQA/validation-*.parquet", "validation-*.parquet"), _docvqa_hf, "lmms-lab/DocVQA"),
                _original(
                    ("val_v1.0_withQT.json", "val_v1.0.json"),
                    _json_reader(_docvqa_json),
                    "the original release with its documents/ folder",
                ),
            ),
            _mean_anls,
            128,
            "docvqa",
            "ANLS",
        ),
        Benchmark(
            "infovqa",
            (
                _hf(
                    ("InfographicVQA/validation-*.parquet", "validation-*.parquet"),
                    _docvqa_hf,
                    "lmms-lab/DocVQA, InfographicVQA",
                ),
                _original(
                    ("infographicsVQA_val_v1.0_withQT.json", "infographicVQA_val_v1.0.json"),
                    _json_reader(_infovqa_json),
                    "the original release with its images in infographicsvqa_images/",
                ),
            ),
            _mean_anls,
            32,
            "infovqa",
            "ANLS",
        ),
        Benchmark(
            "chartqa",
            (
                _hf(("data/test-*.parquet", "test-*.parquet"), _chartqa_hf, "lmms-lab/ChartQA"),
                _original(
                    ("test/test_human.json", "test/test_augmented.json"),
                    _json_reader(_chartqa_json),
                    "the original release with its images in test/png/",
                ),
            ),
            _mean_relaxed,
            16,
            "chartqa",
            "relaxed accuracy",
        ),
        Benchmark(
            "ocrbench",
            (
                _hf(("data/test-*.parquet", "test-*.parquet"), _ocrbench_hf, "echo840/OCRBench"),
                _original(
                    ("OCRBench.json",),
                    _json_reader(_ocrbench_json),
                    "the original release with its images in OCRBench_Images/",
                ),
            ),
            _mean_ocrbench,
            128,
            "ocrbench",
            "accuracy (final score / 1000)",
        ),
        Benchmark(
            "pope",
            (
                _hf(("data/test-*.parquet", "test-*.parquet"), _pope_hf, "lmms-lab/POPE"),
                _original(
                    ("coco_pope_*.json",),
                    _json_reader(_pope_json),
                    "the original JSON Lines with the COCO images in val2014/",
                ),
            ),
            _pope,
            128,
            "pope",
            "F1",
        ),
        Benchmark(
            "vstar",
            (
                _hf(("data/test-*.parquet", "test-*.parquet"), _vstar_hf, "lmms-lab/vstar-bench"),
                _original(
                    ("direct_attributes/*.json", "relative_position/*.json"),
                    _json_reader(_vstar_json),
                    "the original release, <category>/<name>.json beside <name>.jpg",
                ),
            ),
            _mean_choice,
            16,
            "vstar",
            "accuracy",
        ),
        _hrbench_benchmark("4k"),
        _hrbench_benchmark("8k"),
        Benchmark(
            "jsonl",
            (_original(("*.jsonl",), _json_reader(_jsonl), "JSON Lines of {image, question, answer}"),),
            _mean_exact,
            32,
            None,
            "exact match",
        ),
        Benchmark("toy", (_toy_layout(),), _mean_exact, 4, None, "exact match"),
    )
}


def read_benchmark(name: str, data_root: Path | None, context: ReadContext) -> BenchData:
    """The samples of one benchmark: `data_root/<name>/` in one of its layouts (toy scenes are generated)."""
    if name not in BENCHMARKS:
        raise SdrpnError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if name == "toy":
        return read_toy(context)
    if data_root is None:
        raise SdrpnError(f"benchmark {name} needs --data-root (a folder holding {name}/)")
    if not Path(data_root).is_dir():
        raise SdrpnError(f"--data-root '{data_root}' is not a folder")
    return BENCHMARKS[name].read(Path(data_root), context)
