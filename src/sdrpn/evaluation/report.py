"""The results as the paper lays them out: one row per method, its relative throughput, then each benchmark's
score with the change over base; a second table splits each benchmark into its categories."""

from __future__ import annotations


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cell(score: float, base: float | None) -> str:
    if base is None:
        return _percent(score)
    return f"{_percent(score)} ({100 * (score - base):+.1f})"


def markdown_table(result, methods: list[str]) -> str:
    """`result`: an `EvalResult`. Scores in %, deltas in points over base (when base ran)."""
    benchmarks = result.benchmarks
    header = ["method", "relative throughput"] + [f"{name} ({b['metric']})" for name, b in benchmarks.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells = [method, _throughput(result.relative_throughput.get(method))]
        for bench in benchmarks.values():
            row, base = bench["methods"][method], bench["methods"].get("base")
            cells.append(_cell(row["score"], None if base is None or method == "base" else base["score"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _counts(benchmarks, methods)]
    details = [_categories(name, bench, methods) for name, bench in benchmarks.items()]
    return "\n".join(lines + [d for d in details if d])


def _throughput(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _counts(benchmarks: dict, methods: list[str]) -> str:
    """Samples scored, records the reader skipped and samples that failed (scored as wrong), per benchmark."""
    parts = []
    for name, bench in benchmarks.items():
        errors = ", ".join(f"{m} {bench['methods'][m]['errors']}" for m in methods if bench["methods"][m]["errors"])
        parts.append(
            f"{name}: {bench['samples']} samples, {bench['skipped']} records skipped, "
            f"failed (scored wrong): {errors or 'none'}"
        )
    return "; ".join(parts)


def _categories(name: str, bench: dict, methods: list[str]) -> str:
    first = bench["methods"][methods[0]]
    if "by_category" not in first:
        return ""
    categories = list(first["by_category"])
    lines = ["", f"{name} by category:", "", "| method | " + " | ".join(categories) + " |"]
    lines.append("|" + "---|" * (len(categories) + 1))
    for method in methods:
        scores = bench["methods"][method]["by_category"]
        lines.append(f"| {method} | " + " | ".join(_percent(scores.get(c)) for c in categories) + " |")
    return "\n".join(lines)
