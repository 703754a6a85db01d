"""Benchmark files in their published layouts -> samples (prompt, image, ground truth).

Two layouts per benchmark where both exist: the Hugging Face parquet shards that lmms-eval downloads, and the
benchmark's original JSON + image folder. A record that lacks a field, or whose answers are not what the
benchmark promises, is skipped with a one-line reason (counted in the summary); images are decoded only when a
sample is answered, so a corrupt one costs that sample alone.
"""

from __future__ import annotations

import base64
import csv
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sdrpn.errors import SdrpnError

ImageSource = Callable[[], object]  # -> a path, the bytes of an image file or a PIL image, for `load_image`


@dataclass
class BenchSample:
    key: str  # unique within its benchmark: the resume key of its predictions
    question: str  # the question as the benchmark's evaluation asks it (its answer-format instruction included)
    image: ImageSource
    answers: list[str]  # every accepted answer (TextVQA: the ten human answers; multiple choice: the letter)
    category: str = ""  # the benchmark's sub-score it counts in
    options: dict[str, str] = field(default_factory=dict)  # multiple choice: letter -> option text
    extra: dict = field(default_factory=dict)  # what one benchmark's metric needs (OCRBench: the source dataset)


@dataclass
class BenchData:
    samples: list[BenchSample]
    skipped: list[str] = field(default_factory=list)  # "file:row: reason", one per record left out


class BadRecord(Exception):
    """A record the benchmark's reader cannot use; its message is the reason."""


SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


# --- reading tables ------------------------------------------------------------------------------------------


def parquet_rows(path: Path, image_column: str = "image") -> Iterator[tuple[dict, ImageSource]]:
    """The rows of a parquet file without their image column, each with a loader of its image (read one row
    group at a time, so a benchmark of thousands of images never sits in memory at once)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SdrpnError(f"reading '{path}' needs pyarrow: pip install 'sdrpn[eval]'") from None
    try:
        handle = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise SdrpnError(f"'{path}' is not a readable parquet file: {error}") from None
    columns = [name for name in handle.schema_arrow.names if name != image_column]
    for group in range(handle.num_row_groups):
        for index, row in enumerate(handle.read_row_group(group, columns=columns).to_pylist()):
            yield row, _parquet_image(path, group, index, image_column)


@lru_cache(maxsize=1)
def _row_group_images(path: Path, group: int, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()


def _parquet_image(path: Path, group: int, index: int, column: str) -> ImageSource:
    return lambda: image_value(_row_group_images(path, group, column)[index])


def image_value(value) -> object:
    """An image cell: a `datasets` Image struct ({"bytes", "path"}), raw bytes, or base64 text (HR-Bench)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise SdrpnError("image cell is neither image bytes nor base64 text") from None
    if not isinstance(value, (bytes, bytearray)):
        raise SdrpnError(f"image cell holds no image (a {type(value).__name__})")
    return bytes(value)


def tsv_rows(path: Path) -> Iterator[tuple[dict, ImageSource]]:
    """A TSV with an image column in base64 (the HR-Bench release)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            cell = row.pop("image", None)
            yield row, lambda cell=cell: image_value(cell)


def json_records(path: Path) -> list:
    """A JSON list, a {"data": [...]} object, or JSON Lines."""
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if not text.lstrip().startswith("{"):
            raise
        value = [_json_line(line) for line in text.splitlines() if line.strip()]
    return value["data"] if isinstance(value, dict) and "data" in value else value


def _json_line(line: str) -> object:
    """One JSON Lines record; a broken line stays text, which `collect` skips as "not a JSON object"."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return line


def field_text(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise BadRecord(f"no '{name}'")
    return str(value).strip()


def answer_list(record: dict, name: str, count: int | None = None) -> list[str]:
    """A non-empty list of answers (a lone string is a list of one); `count`: exactly that many."""
    value = record.get(name)
    value = [value] if isinstance(value, str) else value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(a, str) for a in value):
        raise BadRecord(f"'{name}' is not a list of answers")
    if count is not None and len(value) != count:
        raise BadRecord(f"'{name}' has {len(value)} answers, expected {count}")
    return list(value)


def collect(rows, make: Callable[[dict, ImageSource, str], BenchSample], where: str) -> BenchData:
    """Samples from (record, image) pairs; bad records are skipped with their row and reason, repeated keys
    too (a resume key must name one sample)."""
    data, seen = BenchData([]), set()
    for index, (record, image) in enumerate(rows):
        try:
            if not isinstance(record, dict):
                raise BadRecord("not a JSON object")
            sample = make(record, image, str(index))
            if sample.key in seen:
                raise BadRecord(f"repeats key {sample.key!r}")
        except BadRecord as reason:
            data.skipped.append(f"{where}:{index}: {reason}")
            continue
        seen.add(sample.key)
        data.samples.append(sample)
    return data


def merge(parts: list[BenchData]) -> BenchData:
    """The files of one benchmark as one: a key repeated in a later file is skipped there."""
    merged, seen = BenchData([], [reason for part in parts for reason in part.skipped]), set()
    for sample in (s for part in parts for s in part.samples):
        if sample.key in seen:
            merged.skipped.append(f"key {sample.key!r}: repeats a sample of an earlier file")
            continue
        seen.add(sample.key)
        merged.samples.append(sample)
    return merged


def inside(root: Path, relative: str) -> Path:
    """An image path from a benchmark file, which must stay inside the benchmark's folder."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BadRecord(f"image path '{relative}' leaves '{root}'")
    return path


def options_text(question: str, options: dict[str, str]) -> str:
    return question + "".join(f"\n{letter}. {text}" for letter, text in options.items())
