"""PNG plots of runs: throughput against latency percentiles (matplotlib, Agg backend, no display).

One point per run of a sweep, one line per percentile: where latency turns up
as throughput grows is where the server saturates. Several labelled series
(``compare``) share one set of axes.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence

from .report import LoadResult

__all__ = ["plot_runs"]

_PERCENTILES = (("p50_ms", "p50", "-"), ("p90_ms", "p90", "--"), ("p99_ms", "p99", ":"))


def _point_label(result: LoadResult) -> str:
    return f"c{result.concurrency}" if result.mode == "closed" else f"{result.rate:,.0f}/s"


def plot_runs(path: pathlib.Path, series: Mapping[str, Sequence[LoadResult]], title: str = "") -> None:
    """Write a PNG of req/s (x) against p50/p90/p99 latency in ms (y, log scale) for each series."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, results) in enumerate(series.items()):
        runs = [r for r in results if not math.isnan(r.p50_ms)]
        xs = [r.requests_per_s for r in runs]
        for attribute, percentile, style in _PERCENTILES:
            ys = [getattr(r, attribute) for r in runs]
            colour = colours[index % len(colours)]
            axes.plot(xs, ys, style, marker="o", color=colour, label=f"{name} {percentile}".strip())
        for run in runs:
            axes.annotate(_point_label(run), (run.requests_per_s, run.p99_ms), fontsize=7, alpha=0.7)
    axes.set_xlabel("throughput (requests/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title or "throughput vs latency")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
