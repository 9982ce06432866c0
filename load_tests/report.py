"""Result records, the fixed-width and markdown tables, and JSON output.

Latencies are milliseconds, rates are per second of the measurement window, and
generator CPU is summed over the generator's processes (100% = one core busy).
Figures that cannot be computed (no successful request) are NaN in Python and
``null`` in JSON.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "HeadlineColumn",
    "LoadResult",
    "format_load_table",
    "headline_rows",
    "markdown_table",
    "parse_variants",
    "read_results",
    "result_from_json",
    "summarize_load",
    "to_jsonable",
    "write_csv",
    "write_json",
]


@dataclass(frozen=True)
class LoadResult:
    """One run. ``requests`` counts successes measured inside the window (see ``loops``)."""

    target: str
    model: str
    client: str
    batch: int
    concurrency: int
    processes: int
    warmup_s: float
    duration_s: float
    requests: int
    requests_per_s: float
    samples_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    generator_cpu_s: float
    generator_cpu_pct: float
    errors: dict[str, int] = field(default_factory=dict)
    response: str = ""
    label: str = ""
    mode: str = "closed"
    rate: float = math.nan  # requests/s asked for (open loop); ``concurrency`` is 0 then
    send_lag_p99_ms: float = math.nan  # open loop: how late the 99th-percentile request left its intended time
    deadline: bool = True  # whether each call carried a gRPC deadline

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _percentiles_ms(latencies_s: Sequence[float]) -> tuple[float, float, float, float, float]:
    if not latencies_s:
        return (math.nan,) * 5
    values = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return float(p50), float(p90), float(p99), float(values.mean()), float(values.max())


def summarize_load(
    *,
    target: str,
    model: str,
    client: str,
    batch: int,
    concurrency: int,
    processes: int,
    warmup_s: float,
    duration_s: float,
    latencies_s: Sequence[float],
    errors: dict[str, int],
    cpu_s: float,
    cpu_span_s: float,
    response: str,
    label: str = "",
    mode: str = "closed",
    rate: float = math.nan,
    lags_s: Sequence[float] = (),
    deadline: bool = True,
) -> LoadResult:
    """Turn raw per-request latencies (seconds, in-window successes) into a LoadResult."""
    p50, p90, p99, mean, worst = _percentiles_ms(latencies_s)
    rps = len(latencies_s) / duration_s if duration_s > 0 else math.nan
    return LoadResult(
        target=target,
        model=model,
        client=client,
        batch=batch,
        concurrency=concurrency,
        processes=processes,
        warmup_s=warmup_s,
        duration_s=duration_s,
        requests=len(latencies_s),
        requests_per_s=rps,
        samples_per_s=rps * batch,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=mean,
        max_ms=worst,
        generator_cpu_s=cpu_s,
        generator_cpu_pct=100.0 * cpu_s / cpu_span_s if cpu_span_s > 0 else math.nan,
        errors=dict(sorted(errors.items())),
        response=response,
        label=label,
        mode=mode,
        rate=rate,
        send_lag_p99_ms=float(np.percentile(lags_s, 99)) * 1000.0 if len(lags_s) else math.nan,
        deadline=deadline,
    )


def _errors_text(errors: dict[str, int]) -> str:
    return ",".join(f"{code}={count}" for code, count in errors.items()) or "0"


_LOAD_COLUMNS = (
    ("label", "<", lambda r: r.label or r.target),
    ("model", "<", lambda r: r.model),
    ("client", "<", lambda r: r.client),
    ("batch", ">", lambda r: str(r.batch)),
    ("mode", "<", lambda r: r.mode),
    ("conc", ">", lambda r: str(r.concurrency) if r.mode == "closed" else "-"),
    ("rate", ">", lambda r: f"{r.rate:,.0f}" if r.mode == "open" else "-"),
    ("procs", ">", lambda r: str(r.processes)),
    ("req/s", ">", lambda r: f"{r.requests_per_s:,.0f}"),
    ("samples/s", ">", lambda r: f"{r.samples_per_s:,.0f}"),
    ("p50 ms", ">", lambda r: f"{r.p50_ms:.3f}"),
    ("p90 ms", ">", lambda r: f"{r.p90_ms:.3f}"),
    ("p99 ms", ">", lambda r: f"{r.p99_ms:.3f}"),
    ("errors", ">", lambda r: _errors_text(r.errors)),
    ("lag p99", ">", lambda r: "-" if math.isnan(r.send_lag_p99_ms) else f"{r.send_lag_p99_ms:.3f}"),
    ("gen cpu s", ">", lambda r: f"{r.generator_cpu_s:.2f}"),
    ("gen cpu %", ">", lambda r: f"{r.generator_cpu_pct:.0f}"),
)


def format_table(headers: Sequence[str], aligns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A fixed-width text table; ``aligns`` holds '<' or '>' per column."""
    rows = [list(row) for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths, strict=True))

    return "\n".join([line(headers), *(line(row) for row in rows)])


def format_load_table(results: Sequence[LoadResult]) -> str:
    """One line per run under a header line."""
    return format_table(
        [c[0] for c in _LOAD_COLUMNS],
        [c[1] for c in _LOAD_COLUMNS],
        ([c[2](r) for c in _LOAD_COLUMNS] for r in results),
    )


def load_rows(results: Sequence[LoadResult]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the load table, for markdown."""
    return [c[0] for c in _LOAD_COLUMNS], [[c[2](r) for c in _LOAD_COLUMNS] for r in results]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class HeadlineColumn:
    """One column of the side-by-side table: ``metric`` (a LoadResult attribute) of run ``scenario``."""

    scenario: str
    title: str
    metric: str


def _headline_cell(result: LoadResult | None, metric: str) -> str:
    if result is None:
        return "-"
    value = float(getattr(result, metric))
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if metric.endswith("_ms") else f"{value:,.0f}"


def headline_rows(
    servers: Sequence[tuple[str, Mapping[str, LoadResult]]], columns: Sequence[HeadlineColumn]
) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the side-by-side table: one row per server, one column per figure.

    ``servers`` pairs a row title with that server's runs by scenario key; a
    scenario it did not run (or that failed) shows as ``-``.
    """
    headers = ["server", *(column.title for column in columns)]
    cells = [
        [title, *(_headline_cell(runs.get(column.scenario), column.metric) for column in columns)]
        for title, runs in servers
    ]
    return headers, cells


def parse_variants(text: str, known: Iterable[str]) -> tuple[str, ...]:
    """A comma list of variant names (an A/B command's ``--variants``), each one of ``known``."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    choices = list(known)
    unknown = [v for v in names if v not in choices]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(choices)}")
    return names


def to_jsonable(value: Any) -> Any:
    """Dataclasses, mappings and sequences as plain JSON values; NaN and inf become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


def write_json(path: pathlib.Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


_FIELDS = [f.name for f in dataclasses.fields(LoadResult)]


def write_csv(path: pathlib.Path, results: Sequence[LoadResult]) -> None:
    """One row per run, one column per LoadResult field; errors as ``CODE=count,...``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(_FIELDS)
        for result in results:
            row = to_jsonable(result)
            row["errors"] = _errors_text(result.errors) if result.errors else ""
            writer.writerow(["" if row[name] is None else row[name] for name in _FIELDS])


def result_from_json(item: dict[str, Any]) -> LoadResult:
    """One run as a result file holds it (unknown keys ignored, null figures NaN)."""
    known: dict[str, Any] = {k: (math.nan if v is None else v) for k, v in item.items() if k in _FIELDS}
    return LoadResult(**known)


def read_results(path: pathlib.Path) -> list[LoadResult]:
    """The runs in a JSON file written by ``closed``/``open`` (one run, a list, or ``{"runs": [...]}``)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data.get("runs", [data]) if isinstance(data, dict) else data
    try:
        return [result_from_json(item) for item in items]
    except TypeError as exc:
        raise ValueError(f"{path}: not a load_tests result file ({exc})") from None
