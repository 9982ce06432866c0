"""Two result files side by side: the runs they share, figure by figure, with the ratio B/A.

Runs are matched by (model, mode, concurrency or rate, batch); a run only one
file has is listed with blanks on the other side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .report import LoadResult, format_table

__all__ = ["compare_table", "run_key"]

_FIGURES = (
    ("req/s", "requests_per_s", "{:,.0f}"),
    ("p50 ms", "p50_ms", "{:.3f}"),
    ("p90 ms", "p90_ms", "{:.3f}"),
    ("p99 ms", "p99_ms", "{:.3f}"),
)


def run_key(result: LoadResult) -> tuple[str, str, str, int]:
    load = f"c{result.concurrency}" if result.mode == "closed" else f"{result.rate:g}/s"
    return (result.model, result.mode, load, result.batch)


def _cell(result: LoadResult | None, attribute: str, fmt: str) -> str:
    if result is None:
        return ""
    value = float(getattr(result, attribute))
    return "-" if math.isnan(value) else fmt.format(value)


def _ratio(a: LoadResult | None, b: LoadResult | None, attribute: str) -> str:
    if a is None or b is None:
        return ""
    x, y = float(getattr(a, attribute)), float(getattr(b, attribute))
    return f"{y / x:.2f}x" if x > 0 and not math.isnan(y) else "-"


def compare_table(a: Sequence[LoadResult], b: Sequence[LoadResult], names: tuple[str, str] = ("A", "B")) -> str:
    """A text table: one line per run, A's and B's figures and B/A for each."""
    left = {run_key(r): r for r in a}
    right = {run_key(r): r for r in b}
    keys = list(left) + [k for k in right if k not in left]
    headers = ["model", "mode", "load", "batch"]
    for label, _, _ in _FIGURES:
        headers += [f"{label} {names[0]}", f"{label} {names[1]}", "B/A"]
    rows = []
    for key in keys:
        ra, rb = left.get(key), right.get(key)
        row = [key[0], key[1], key[2], str(key[3])]
        for _, attribute, fmt in _FIGURES:
            row += [_cell(ra, attribute, fmt), _cell(rb, attribute, fmt), _ratio(ra, rb, attribute)]
        rows.append(row)
    return format_table(headers, ["<", "<", ">", ">"] + [">"] * (len(headers) - 4), rows)
