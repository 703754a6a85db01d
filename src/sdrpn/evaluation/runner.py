"""Run methods on benchmarks: predictions kept per sample (resumable), scores, throughput relative to base.

Methods take turns on each batch of samples, so every method is timed on the same samples in the same stretch
of machine load; relative throughput is the median, over samples, of base's seconds over the method's.
Predictions are appended to `<out>/predictions/<bench>/<method>.jsonl` one batch at a time: a killed run
loses at most the batch in flight, and re-running the same command answers only what is missing.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdrpn.errors import SdrpnError
from sdrpn.evaluation.benchmarks import BENCHMARKS, ReadContext, read_benchmark
from sdrpn.evaluation.readers import BenchData, BenchSample
from sdrpn.files import atomic_write, atomic_write_json
from sdrpn.images import load_image
from sdrpn.infer import METHODS, askable_methods, load


@dataclass
class EvalSettings:
    benchmarks: list[str]
    methods: list[str]
    out: Path
    data_root: Path | None = None
    task_presets: bool = False  # the family's per-benchmark RoI threshold (`sdrpn.load(task=...)`)
    limit: int | None = None  # the first N samples of each benchmark
    batch_size: int = 1  # the paper times batch 1
    seed: int = 7  # toy scenes
    vicrop_high_res: bool = False  # `vicrop` stitches its map from tiles (`sdrpn.load(vicrop_high_res=...)`)
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser()
        self.data_root = None if self.data_root is None else Path(self.data_root).expanduser()
        for name in self.benchmarks:
            if name not in BENCHMARKS:
                raise SdrpnError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        for method in self.methods:
            if method not in askable_methods():
                raise SdrpnError(f"unknown method {method!r}; known: {', '.join(askable_methods())}")
        if not self.benchmarks or not self.methods:
            raise SdrpnError("give at least one benchmark and one method")
        if self.vicrop_high_res and "vicrop" not in self.methods:
            raise SdrpnError("--vicrop-high-res is an option of the vicrop method, which is not among the methods")
        if len(set(self.benchmarks)) < len(self.benchmarks) or len(set(self.methods)) < len(self.methods):
            raise SdrpnError("a benchmark or method is listed twice")
        if self.out.exists() and not self.out.is_dir():
            raise SdrpnError(f"--out '{self.out}' is a file, not a folder")


class Predictions:
    """One method's answers on one benchmark, as JSON Lines keyed by sample."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            kept = [record for record in map(_record, lines) if record is not None]
            self.done = {record["key"]: record for record in kept}
            if len(kept) < len(lines):  # a line cut by a kill: rewrite without it, so appends start clean
                atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    def append(self, records: list[dict]) -> None:
        """One write per batch, flushed to disk before the next batch starts."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(record) + "\n" for record in records).encode()
        handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view) :]
            os.fsync(handle)
        finally:
            os.close(handle)
        self.done.update((record["key"], record) for record in records)


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("key"), str) else None


def _claim(out: Path, identity: dict) -> None:
    """An output folder holds one model + RPN + settings: resuming with others would mix their answers."""
    path = out / "run.json"
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise SdrpnError(f"'{path}' is not the JSON sdrpn eval wrote; use another --out") from None
        if recorded != identity:
            changed = ", ".join(k for k in {**recorded, **identity} if recorded.get(k) != identity.get(k))
            raise SdrpnError(f"'{out}' holds results of another run ({changed} differ); use another --out")
        return
    atomic_write_json(path, identity)


def _answer(zoom, method: str, samples: list[BenchSample], images: list) -> list[dict]:
    """One batch through one method; when the model refuses it (an SdrpnError), each sample is tried alone and
    one that still fails is recorded as an error (scored wrong)."""
    started = time.perf_counter()
    try:
        results = zoom.ask_batch(images, [s.question for s in samples], method=method)
    except SdrpnError as error:
        if len(samples) == 1:
            return [_failed(samples[0], error)]
        return [record for s, image in zip(samples, images) for record in _answer(zoom, method, [s], [image])]
    seconds = (time.perf_counter() - started) / len(samples)
    return [
        {
            "key": s.key,
            "prediction": r.answer,
            "seconds": round(seconds, 6),
            "extra_tokens": r.extra_tokens,
            "boxes": [list(b) for b in r.boxes],
        }
        for s, r in zip(samples, results)
    ]


def _failed(sample: BenchSample, error: Exception) -> dict:
    return {"key": sample.key, "prediction": None, "error": " ".join(str(error).split())}


def _open_image(sample: BenchSample):
    try:
        return load_image(sample.image())
    except SdrpnError as error:
        return error


def read_all(settings: EvalSettings, context: ReadContext) -> dict[str, BenchData]:
    """Every benchmark's samples, before any answer: missing or unusable data stops the run at once."""
    datasets = {}
    for name in settings.benchmarks:
        data = read_benchmark(name, settings.data_root, context)
        if not data.samples:
            raise SdrpnError(f"{name}: no usable sample ({len(data.skipped)} skipped, e.g. {data.skipped[:1]})")
        datasets[name] = data
    return datasets


def run_benchmark(adapter, rpn, name: str, data: BenchData, settings: EvalSettings) -> BenchResult:
    """Answer every sample of one benchmark with every method (resuming), then score."""
    from tqdm.auto import tqdm

    benchmark = BENCHMARKS[name]
    presets = adapter.defaults().task_tau
    task = benchmark.task if settings.task_presets and benchmark.task in presets else None
    zoom = load(
        adapter, rpn, task=task, max_new_tokens=benchmark.max_new_tokens, vicrop_high_res=settings.vicrop_high_res
    )
    files = {m: Predictions(settings.out / "predictions" / name / f"{m}.jsonl") for m in settings.methods}
    bars = {
        m: tqdm(
            total=len(data.samples),
            initial=sum(s.key in files[m].done for s in data.samples),
            desc=f"{name} {m}",
            position=i,
            disable=not settings.progress,
        )
        for i, m in enumerate(settings.methods)
    }
    try:
        for start in range(0, len(data.samples), settings.batch_size):
            chunk = data.samples[start : start + settings.batch_size]
            images: dict[str, object] = {}
            for method in settings.methods:
                todo = [s for s in chunk if s.key not in files[method].done]
                if not todo:
                    continue
                for s in todo:
                    if s.key not in images:
                        images[s.key] = _open_image(s)
                readable = [s for s in todo if not isinstance(images[s.key], Exception)]
                records = [_failed(s, images[s.key]) for s in todo if isinstance(images[s.key], Exception)]
                if readable:
                    records += _answer(zoom, method, readable, [images[s.key] for s in readable])
                files[method].append(records)
                bars[method].update(len(todo))
    finally:
        for bar in bars.values():
            bar.close()
    return _summarise(benchmark, data, files, settings.methods, task, zoom.settings.roi.tau)


@dataclass
class BenchResult:
    summary: dict
    ratios: dict[str, list[float]]  # per method: base's seconds over its own, per sample of this run


def _summarise(benchmark, data, files: dict[str, Predictions], methods: list[str], task, tau) -> BenchResult:
    records = {m: [files[m].done[s.key] for s in data.samples] for m in methods}
    ratios = {m: paired_ratios(records.get("base"), records[m]) for m in methods}
    summary = {
        "samples": len(data.samples),
        "skipped": len(data.skipped),
        "skipped_reasons": data.skipped[:20],
        "metric": benchmark.metric,
        "task_preset": task,
        "tau": tau,
        "methods": {},
    }
    for method in methods:
        predictions = [r.get("prediction") for r in records[method]]
        summary["methods"][method] = {
            **benchmark.score(data.samples, predictions),
            "errors": sum("error" in r for r in records[method]),
            "error_examples": [f"{r['key']}: {r['error']}" for r in records[method] if "error" in r][:5],
            "median_seconds": _median([r["seconds"] for r in records[method] if "seconds" in r]),
            "mean_extra_tokens": _mean([r["extra_tokens"] for r in records[method] if "extra_tokens" in r]),
            "relative_throughput": _median_ratio(ratios[method]),
        }
    return BenchResult(summary, ratios)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 6) if values else None


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 2) if values else None


def paired_ratios(base: list[dict] | None, method: list[dict]) -> list[float]:
    """Base's seconds over the method's, per sample both answered."""
    if base is None:
        return []
    return [b["seconds"] / m["seconds"] for b, m in zip(base, method) if b.get("seconds") and m.get("seconds")]


def _median_ratio(ratios: list[float]) -> float | None:
    return round(statistics.median(ratios), 3) if ratios else None


@dataclass
class EvalResult:
    benchmarks: dict[str, dict] = field(default_factory=dict)
    relative_throughput: dict[str, float | None] = field(default_factory=dict)  # over every benchmark's samples


def evaluate(adapter, rpn, settings: EvalSettings) -> EvalResult:
    """Every benchmark x method of `settings` with `adapter` (a loaded model) and `rpn` (None, a name, a folder
    or a loaded RPN); writes predictions, `summary.json` and `table.md` into `settings.out`."""
    from sdrpn.evaluation.report import markdown_table

    zoom = load(adapter, rpn)  # resolves and checks the RPN once
    for method in settings.methods:
        if METHODS[method].needs_rpn and zoom.rpn is None:
            raise SdrpnError(f"method {method!r} needs an RPN checkpoint (--rpn); or leave it out of --method")
    identity = {
        "model": str(adapter.name_or_path),
        "fingerprint": adapter.fingerprint(),
        "rpn": None if rpn is None else str(rpn) if isinstance(rpn, (str, Path)) else "in-memory",
        "task_presets": settings.task_presets,
        **({"vicrop_high_res": True} if settings.vicrop_high_res else {}),  # recorded when on: older folders resume
    }
    _claim(settings.out, identity)
    aspects = _toy_aspects(adapter) if "toy" in settings.benchmarks else None
    context = ReadContext(limit=settings.limit, seed=settings.seed, toy_aspects=aspects)
    datasets = read_all(settings, context)
    result = EvalResult()
    ratios: dict[str, list[float]] = {m: [] for m in settings.methods}
    for name, data in datasets.items():
        bench = run_benchmark(adapter, zoom.rpn, name, data, settings)
        result.benchmarks[name] = bench.summary
        for method in settings.methods:
            ratios[method] += bench.ratios[method]
    result.relative_throughput = {m: _median_ratio(r) for m, r in ratios.items()}
    payload = {"benchmarks": result.benchmarks, "relative_throughput": result.relative_throughput}
    atomic_write_json(settings.out / "summary.json", payload)
    table = markdown_table(result, settings.methods)
    atomic_write(settings.out / "table.md", lambda f: f.write((table + "\n").encode()))
    return result


def _toy_aspects(adapter):
    from sdrpn.toyworld import pipeline

    return pipeline.toy_aspects(adapter)
