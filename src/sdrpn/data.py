"""Read training/eval samples (image + question) from LLaVA instruction JSON or simple JSON Lines.

Datasets are large and hand-assembled, so one bad record must not stop a run: bad records are skipped
and listed, one line each naming file:line (JSONL) or file[index] (JSON list), so the user can fix
them; `strict=True` turns the first one into an `SdrpnError` instead. Image paths may not escape the
image root, so a data file cannot make us read arbitrary files.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdrpn.errors import SdrpnError

_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that did not decode, kept by surrogateescape
_HUMAN_ROLES = {"human", "user"}
_GPT_ROLES = {"gpt", "assistant"}


@dataclass(frozen=True)
class Sample:
    """One image + question pair; `sample_id` stays the same across runs so results can be joined."""

    sample_id: str  # the record's "id" field if present, else f"{file_stem}:{hash of image path + question}"
    image_path: Path  # resolved absolute path, inside the image root
    question: str  # without the LLaVA "<image>" placeholder and surrounding whitespace
    answer: str | None  # the first gpt turn / "answer" field; kept for reference only
    box: tuple[float, float, float, float] | None = None  # optional target box x0, y0, x1, y1 in image pixels


@dataclass
class ReadReport:
    """The usable samples, plus one line per skipped record saying where and why."""

    samples: list[Sample] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    root: Path | None = None  # the resolved folder every image path lies in


@dataclass(frozen=True)
class _Entry:
    """One record before validation: `where` for messages, `key` for the fallback id."""

    where: str
    key: int
    value: object = None
    error: str | None = None  # set when the record could not even be parsed


class _BadRecord(Exception):
    """Internal: why a record was skipped; becomes a `ReadReport.bad` line or an `SdrpnError`."""


def read_samples(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    strict: bool = False,
    sources: Iterable[str] | None = None,
) -> ReadReport:
    """Read samples from `path`; image paths are relative to `image_root` (default: the file's folder).

    The format is detected from the content: a JSON list of records (LLaVA instruction format, or
    records shaped like the JSONL ones), or JSON Lines with one object per line (blank lines ignored).
    A record holding "conversations" is read LLaVA-style (question = first human turn, answer = first
    gpt turn), otherwise from its "question"/"answer" fields; an optional "box" [x0, y0, x1, y1] (image pixels)
    says where the answer is, for ranking label heads. A record without an "id" is keyed by a hash of
    its image path and question (stable when lines move); messages name 1-based line numbers for JSONL (as
    editors show them) and 0-based indices for a JSON list (as jq and Python index). A JSONL line that is not
    UTF-8 is skipped with a message; the rest is read.

    `sources` keeps only records whose image path starts with one of these folders, as the released labels
    were made from the LLaVA-665K file (`sources=["gqa", "ocr_vqa"]` keeps "gqa/images/..." and "ocr_vqa/...").

    Raises:
        SdrpnError: the file is missing, unreadable, empty or in neither format, the image root is not
            a directory, or (with `strict=True`) any record is bad.
    """
    path = Path(path)
    label = _one_line(str(path))
    text = _read_text(path, label)
    root = _image_root(path.parent if image_root is None else Path(image_root))
    report = ReadReport(root=root)
    seen_ids: dict[str, str] = {}
    wanted = None if sources is None else tuple(f"{source.strip('/')}/" for source in sources)
    for entry in _entries(text, label):
        if wanted is not None and not _image_of(entry).startswith(wanted):
            continue
        try:
            sample = _sample(entry, path.stem, root)
            _check_unique(sample.sample_id, entry.where, seen_ids)
        except _BadRecord as bad:
            message = f"{entry.where}: {bad}"
            if strict:
                raise SdrpnError(message) from None
            report.bad.append(message)
        else:
            report.samples.append(sample)
    return report


def shuffled_subset(samples: Iterable[Sample], max_samples: int | None, seed: int) -> list[Sample]:
    """A seeded shuffle, then the first `max_samples` (None: all of them, still shuffled).

    Deterministic for a given input order and seed, and a smaller subset is always a prefix of a larger
    one with the same seed, so growing `max_samples` only adds samples.
    """
    if max_samples is not None and max_samples < 0:
        raise SdrpnError(f"max_samples must be >= 0 or None, got {max_samples}")
    shuffled = list(samples)
    random.Random(seed).shuffle(shuffled)
    return shuffled if max_samples is None else shuffled[:max_samples]


# --- file level ------------------------------------------------------------------------------------


def _read_text(path: Path, label: str) -> str:
    """The whole file as text; a BOM (as some Windows tools write) is dropped. Bytes that are not UTF-8 are
    kept as lone surrogates, so JSON Lines can skip just the lines holding them; a JSON list cannot be split
    and is refused."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SdrpnError(f"{label}: data file not found") from None
    except IsADirectoryError:
        raise SdrpnError(f"{label}: is a directory, not a data file") from None
    except OSError as exc:
        raise SdrpnError(f"{label}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if data.lstrip().startswith(b"["):
            raise SdrpnError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return data.decode("utf-8-sig", errors="surrogateescape")


def _image_root(root: Path) -> Path:
    """The resolved folder images must stay inside."""
    resolved = root.resolve()
    if not resolved.is_dir():
        raise SdrpnError(f"image root {_one_line(str(root))!r} is not a directory")
    return resolved


def _entries(text: str, label: str) -> list[_Entry]:
    """Split the file into records, deciding between a JSON list and JSON Lines."""
    stripped = text.strip()
    if not stripped:
        raise SdrpnError(f"{label}: empty file, expected a JSON list of records or JSON Lines")
    try:
        whole = json.loads(text)  # not `stripped`: error line numbers must match the file
    except json.JSONDecodeError as exc:
        if stripped.startswith("["):  # a broken list: no record boundaries to recover from
            raise SdrpnError(f"{label}:{exc.lineno}: {_json_error(exc)}") from None
        return _jsonl_entries(text, label)
    if isinstance(whole, list):
        return [_Entry(f"{label}[{index}]", index, value) for index, value in enumerate(whole)]
    if isinstance(whole, dict) and "\n" not in stripped:  # JSON Lines with a single line
        return _jsonl_entries(text, label)
    raise SdrpnError(
        f"{label}: expected a JSON list of records or JSON Lines (one object per line), "
        f"got a single JSON {_json_type(whole)}"
    )


def _jsonl_entries(text: str, label: str) -> list[_Entry]:
    """One entry per non-blank line; a file where no line is JSON is not JSON Lines at all."""
    entries = []
    # split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON strings may hold
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if _NOT_UTF8.search(line):
            entries.append(_Entry(f"{label}:{lineno}", lineno, error="not UTF-8 text"))
            continue
        try:
            entries.append(_Entry(f"{label}:{lineno}", lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            entries.append(_Entry(f"{label}:{lineno}", lineno, error=_json_error(exc)))
    if all(entry.error is not None for entry in entries):
        first = entries[0]
        raise SdrpnError(f"{label}: neither a JSON list nor JSON Lines ({first.where}: {first.error})")
    return entries


# --- record level ----------------------------------------------------------------------------------


def _sample(entry: _Entry, stem: str, root: Path) -> Sample:
    """Validate one record into a `Sample`, or raise `_BadRecord` with the first problem found."""
    if entry.error is not None:
        raise _BadRecord(entry.error)
    record = entry.value
    if not isinstance(record, dict):
        raise _BadRecord(f"not a JSON object (got a JSON {_json_type(record)})")
    image = _image_field(record)
    if "conversations" in record:
        question, answer = _from_conversations(record["conversations"])
    else:
        question, answer = _question(record.get("question")), _answer(record.get("answer"))
    return Sample(
        sample_id=_sample_id(record, f"{stem}:{_content_key(image, question)}"),
        image_path=_image_path(image, root),
        question=question,
        answer=answer,
        box=_box(record.get("box")),
    )


def _image_of(entry: _Entry) -> str:
    """The raw image path of a record (for the source filter), or "" when it has none."""
    value = entry.value.get("image") if isinstance(entry.value, dict) else None
    return value.lstrip("./") if isinstance(value, str) else ""


def _content_key(image: str, question: str, turn: int = 0) -> str:
    """A record without an "id" is known by what it asks about: inserting or moving lines keeps every
    sample's key, so a resumed run neither labels a sample twice nor skips one."""
    return hashlib.sha256(f"{image}\n{question}\n{turn}".encode("utf-8", "surrogateescape")).hexdigest()[:12]


def file_fingerprint(path: str | Path) -> str:
    """A digest of a data file's bytes: a label folder records it, so resuming with other data is noticed."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _image_field(record: dict[str, object]) -> str:
    image = record.get("image")
    if image is None:
        raise _BadRecord("no image")
    if not isinstance(image, str):
        raise _BadRecord(f"image must be a string path, got a JSON {_json_type(image)}")
    if not image.strip():
        raise _BadRecord("no image (empty image path)")
    return image


def _from_conversations(turns: object) -> tuple[str, str | None]:
    """LLaVA format: the first human turn is the question, the first gpt turn the answer."""
    if not isinstance(turns, list):
        raise _BadRecord(f"conversations must be a JSON array, got a JSON {_json_type(turns)}")
    human = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") in _HUMAN_ROLES]
    gpt = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") in _GPT_ROLES]
    if not human:
        raise _BadRecord("no question (no human turn in conversations)")
    return _question(human[0]), _answer(gpt[0]) if gpt else None


def _question(value: object) -> str:
    if value is None:
        raise _BadRecord("no question")
    if not isinstance(value, str):
        raise _BadRecord(f"question must be a string, got a JSON {_json_type(value)}")
    question = _IMAGE_PLACEHOLDER.sub(" ", value).strip()
    if not question:
        raise _BadRecord("empty question")
    return question


def _answer(value: object) -> str | None:
    """Answers are only kept for reference, so numbers are accepted as their text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _BadRecord(f"answer must be a string, got a JSON {_json_type(value)}")


def _box(value: object) -> tuple[float, float, float, float] | None:
    """An optional target box [x0, y0, x1, y1] in image pixels (what `sdrpn heads` scores heads against)."""
    if value is None:
        return None
    numbers = value if isinstance(value, list) else []
    if len(numbers) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
        raise _BadRecord(f"box must be [x0, y0, x1, y1] in pixels, got {json.dumps(value)[:60]}")
    x0, y0, x1, y1 = (float(v) for v in numbers)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise _BadRecord(f"box must satisfy 0 <= x0 < x1 and 0 <= y0 < y1, got {json.dumps(value)[:60]}")
    return (x0, y0, x1, y1)


def _sample_id(record: dict[str, object], fallback: str) -> str:
    value = record.get("id")
    if value is None:
        return fallback
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise _BadRecord(f"id must be a non-empty string or an integer, got {json.dumps(value)[:40]}")


def _image_path(image: str, root: Path) -> Path:
    """Resolve against the root (following symlinks) and refuse anything that lands outside it."""
    try:
        resolved = (root / image).resolve()
        inside = resolved.is_relative_to(root)
        is_file, exists = resolved.is_file(), resolved.exists()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops, name too long
        raise _BadRecord(f"invalid image path {image!r} ({_one_line(str(exc))})") from None
    if not inside:
        raise _BadRecord(f"image {image!r} resolves outside the image root {str(root)!r}")
    if not is_file:
        reason = "is not a file" if exists else "not found"
        raise _BadRecord(f"image file {image!r} {reason} ({str(resolved)!r})")
    return resolved


def _check_unique(sample_id: str, where: str, seen: dict[str, str]) -> None:
    """Ids key cached targets and results, so a repeated id would silently mix two samples."""
    if sample_id in seen:
        raise _BadRecord(f"duplicate id {sample_id!r} (first at {seen[sample_id]})")
    seen[sample_id] = where


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"invalid JSON ({exc.msg} at column {exc.colno})"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")
