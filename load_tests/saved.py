"""A saved A/B run re-reported with today's statistics: ``python -m load_tests report FILE.json``.

The interleaved commands (``alternate``, ``auth-overhead``, ``telemetry-overhead``,
``drift-overhead``) keep every slot's figures in their JSON, and compute their
ratios (``ratios``) only when they report. This reads such a file back into
the command's own report, so that its table comes out as the command prints it
now, and lists every paired ratio with its interval, the pairs and rounds it
comes from, and the ratio the file recorded (with the statistics of its day).
A run saved before slices existed had one slot per round; one saved before the
server's CPU was read has no CPU rows.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .alternate import AlternateConfig, AlternateReport, Scenario
from .auth import AuthOverheadConfig, AuthOverheadReport
from .drift import DriftOverheadConfig, DriftOverheadReport
from .interleave import OverheadRun, SlotFigures
from .ratios import Ratio
from .report import LoadResult, format_table, result_from_json
from .telemetry import OverheadConfig, OverheadReport

__all__ = ["Comparison", "SavedRun", "format_comparisons", "read_saved_run"]

C = TypeVar("C", bound=OverheadRun)
SlotData = tuple[dict[str, list[LoadResult]], dict[str, list[float]], dict[str, list[float]]]


class _Table(Protocol):
    def table(self) -> str: ...


@dataclass(frozen=True)
class Comparison:
    """One paired figure of a saved run: each variant's ratio to ``base`` now, and as the file recorded it."""

    scenario: str  # "" where the run has one load
    figure: str
    base: str
    ratios: dict[str, Ratio]
    recorded: dict[str, str]  # variant -> "mean ± margin" as saved; absent where the file kept none


@dataclass(frozen=True)
class SavedRun:
    """A saved run: which command wrote it, that command's report of it, and its paired figures."""

    kind: str
    report: _Table
    comparisons: list[Comparison]


def read_saved_run(path: pathlib.Path) -> SavedRun:
    """The run in ``path``; raises ValueError when it is not the JSON of an interleaved A/B command."""
    data = json.loads(path.read_text(encoding="utf-8"))
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or not runs or not isinstance(data.get("config"), dict):
        raise ValueError(f"{path}: not the JSON of an A/B run (alternate, auth-, telemetry- or drift-overhead)")
    if isinstance(next(iter(runs.values())), dict):
        return _alternate(data, path)
    if "paired_throughput_to_off" in data or "algorithm" in data["config"]:
        auth = AuthOverheadReport(_config(AuthOverheadConfig, data, path), *_slot_figures(data))
        return SavedRun("auth-overhead", auth, _slot_comparisons(auth, data))
    if "monitor_sampled_dropped" in data:
        monitor = data["monitor_sampled_dropped"]
        drift = DriftOverheadReport(_config(DriftOverheadConfig, data, path), *_slot_figures(data), monitor)
        return SavedRun("drift-overhead", drift, _slot_comparisons(drift, data))
    telemetry = OverheadReport(_config(OverheadConfig, data, path), *_slot_figures(data))
    return SavedRun("telemetry-overhead", telemetry, _slot_comparisons(telemetry, data))


def _config(cls: type[C], data: dict[str, Any], path: pathlib.Path) -> C:
    """An overhead command's configuration from its JSON, which wrote every value with ``str``."""
    names = {f.name for f in dataclasses.fields(cls)} - {"out", "variants"}
    values = {name: _literal(text) for name, text in data["config"].items() if name in names}
    return cls(out=path.parent, variants=tuple(data["runs"]), **values)  # type: ignore[call-arg]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a word: the model's name, the algorithm


def _slot_figures(data: dict[str, Any]) -> SlotData:
    """A report's loads, server CPU and client CPU per request, per variant in slot order."""
    runs = {variant: [result_from_json(r) for r in results] for variant, results in data["runs"].items()}
    return runs, data.get("server_cpu_us_per_request", {}), data.get("client_cpu_us_per_request", {})


def _slot_comparisons(report: SlotFigures, data: dict[str, Any]) -> list[Comparison]:
    """Throughput, the server's CPU per request and the client's, each ÷ off's, where the run has them."""
    throughput = data.get("paired_throughput_to_off", data.get("paired_ratio_to_off", {}))
    found = [
        ("requests_per_s", {v: [r.requests_per_s for r in runs] for v, runs in report.runs.items()}, throughput),
        ("server_cpu_us", report.cpu_us, data.get("paired_server_cpu_to_off", {})),
        ("client_cpu_us", report.client_cpu_us, data.get("paired_client_cpu_to_off", {})),
    ]
    return [
        Comparison("", figure, "off", report.ratios(figures), _recorded(saved))
        for figure, figures, saved in found
        if "off" in figures and len(figures) == len(report.runs)
    ]


def _alternate(data: dict[str, Any], path: pathlib.Path) -> SavedRun:
    saved = data["config"]
    scenarios = tuple(_scenario(name) for name in saved["scenarios"])
    cpus = saved.get("server_cpus")
    config = AlternateConfig(
        out=path.parent, variants=tuple((name, tuple(flags)) for name, flags in saved["variants"].items()),
        scenarios=scenarios, duration=saved["duration"], warmup=saved["warmup"], rounds=saved["rounds"],
        slices=saved.get("slices", 1), server_cpus=tuple(cpus) if cpus is not None else None,
    )  # fmt: skip
    runs = {
        s: {v: [result_from_json(r) for r in results] for v, results in by.items()} for s, by in data["runs"].items()
    }
    report = AlternateReport(config, runs, data.get("server_cpu_us_per_request", {}))
    base, recorded = config.variants[0][0], data.get("paired", {})
    comparisons = [
        Comparison(s.name, metric, base, report.paired(s, metric), _recorded(recorded.get(s.name, {}).get(metric, {})))
        for s in scenarios
        for metric in s.metrics
        if report.figures(s, metric)
    ]
    return SavedRun("alternate", report, comparisons)


def _scenario(name: str) -> Scenario:
    """``mlp_b8_c32`` as the scenario it names."""
    found = re.fullmatch(r"(.+)_b(\d+)_c(\d+)", name)
    if found is None:
        raise ValueError(f"scenario {name!r}: expected MODEL_bBATCH_cCONCURRENCY")
    return Scenario(found[1], int(found[2]), int(found[3]))


def _recorded(saved: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for variant, ratio in saved.items():
        mean, margin = (math.nan if ratio.get(k) is None else ratio[k] for k in ("mean", "margin"))
        out[variant] = f"{mean:.3f}" if math.isnan(margin) else f"{mean:.3f} ± {margin:.3f}"
    return out


def format_comparisons(comparisons: list[Comparison]) -> str:
    """Every paired ratio, one line per variant other than the base, with its interval and where it came from."""
    rows = []
    for c in comparisons:
        for variant, ratio in c.ratios.items():
            if variant == c.base:
                continue
            interval = "-" if math.isnan(ratio.low) else f"{ratio.low:.3f} to {ratio.high:.3f}"
            rows.append([c.scenario or "-", c.figure, f"{variant} ÷ {c.base}", str(ratio.pairs), str(ratio.rounds),
                         str(ratio), interval, c.recorded.get(variant, "-")])  # fmt: skip
    headers = ["scenario", "figure", "ratio", "pairs", "rounds", "now", "95% interval", "recorded"]
    return format_table(headers, ["<", "<", "<", ">", ">", ">", ">", ">"], rows)
