"""infergate started with different flags, alternating, on the same scenarios: an A/B in one run.

    python -m load_tests alternate --variant asyncio="--event-loop asyncio" \\
        --variant uvloop="--event-loop uvloop" --rounds 3 --out results/loop

A variant may also run another checkout of infergate, to measure a change of
code rather than of flags (``--checkout NAME=DIR``: DIR's ``server/`` goes
first on that variant's PYTHONPATH)::

    git worktree add /tmp/before HEAD~3
    python -m load_tests alternate --variant before= --checkout before=/tmp/before \
        --variant after= --rounds 6 --out results/change

Each round starts infergate once per variant on the same demo repository,
keeps them all up, and runs every scenario against each in turn with the same
closed-loop client (``matmul16`` b1 at 64 and at 1 in flight, ``mlp`` b8 at
32: the three loads the batching targets in BENCHMARKS.md name), ``--slices``
times with the order rotating (``interleave``). Alternating so closely lets
drift on a shared machine hit the variants alike. Writes alternate.json and
alternate.md: per scenario, each variant's figure in every slot, its mean, and
its ratio to the first variant's, paired slot by slot (``ratios``: the
geometric mean of the slots' ratios, ± the half-width of its 95% interval over
rounds; one round gives no interval). The figures are the load's (rate or
latencies) and the server's CPU per answered request, read from /proc around
each slot: what a change does to the work per request, beside what it does to
the rate.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .generator import LoadConfig
from .interleave import Variant, interleaved, measure, pinning_note
from .ratios import Ratio, paired
from .report import LoadResult, format_table
from .suite import REPO_ROOT, environment

__all__ = [
    "SCENARIOS",
    "AlternateConfig",
    "AlternateReport",
    "Scenario",
    "parse_checkout",
    "parse_scenario",
    "parse_variant",
    "run_alternate",
]


@dataclass(frozen=True)
class Scenario:
    model: str
    batch: int
    concurrency: int

    @property
    def name(self) -> str:
        return f"{self.model}_b{self.batch}_c{self.concurrency}"

    @property
    def latency_bound(self) -> bool:
        """One in flight: the figures that matter are the latencies, not the rate."""
        return self.concurrency == 1

    @property
    def metrics(self) -> tuple[str, ...]:
        """The figures reported (:class:`LoadResult` fields, and the server's CPU per request): the p50
        and the tail at one in flight, else the rate and the p99."""
        load = ("p50_ms", "p99_ms", "max_ms") if self.latency_bound else ("samples_per_s", "p99_ms")
        return (*load, SERVER_CPU)


SCENARIOS = (Scenario("matmul16", 1, 64), Scenario("matmul16", 1, 1), Scenario("mlp", 8, 32))
SERVER_CPU = "server_cpu_us"  # the metric that is not a LoadResult field: µs of server CPU per answered request


@dataclass(frozen=True)
class AlternateConfig:
    out: pathlib.Path
    variants: tuple[tuple[str, tuple[str, ...]], ...]  # (name, serve flags)
    checkouts: tuple[tuple[str, pathlib.Path], ...] = ()  # (variant name, checkout it serves from)
    scenarios: tuple[Scenario, ...] = SCENARIOS
    duration: float = 6.0
    warmup: float = 1.0
    rounds: int = 3
    slices: int = 1
    server_cpus: tuple[int, ...] | None = None  # the servers' cores, the client on the others (None: not pinned)


@dataclass
class AlternateReport:
    config: AlternateConfig
    runs: dict[str, dict[str, list[LoadResult]]] = field(default_factory=dict)  # scenario -> variant -> slots
    cpu_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # the server's CPU µs per request, alike

    def figures(self, scenario: Scenario, metric: str) -> dict[str, list[float]]:
        """Each variant's ``metric`` (a :class:`LoadResult` field, or :data:`SERVER_CPU`) per slot (none: a
        run saved before the server's CPU was read)."""
        if metric == SERVER_CPU:
            return self.cpu_us.get(scenario.name, {})
        runs = self.runs[scenario.name]
        return {variant: [getattr(r, metric) for r in results] for variant, results in runs.items()}

    def paired(self, scenario: Scenario, metric: str) -> dict[str, Ratio]:
        """Each variant's ``metric`` ÷ the first variant's, slot by slot (``ratios.paired``)."""
        figures = self.figures(scenario, metric)
        return paired(figures, next(iter(figures)), self.config.slices)

    def table(self) -> str:
        rows = []
        for scenario in self.config.scenarios:
            for metric in scenario.metrics:
                unit, fmt = _UNITS[metric]
                by_variant = self.figures(scenario, metric)
                if not by_variant:
                    continue
                ratios = self.paired(scenario, metric)
                for variant, figures in by_variant.items():
                    per_slot = " / ".join(fmt.format(f) for f in figures)
                    mean = fmt.format(statistics.fmean(figures))
                    rows.append([scenario.name, variant, unit, per_slot, mean, str(ratios[variant])])
        first = self.config.variants[0][0]
        headers = ["scenario", "variant", "figure", "per slot", "mean", f"paired ÷ {first}"]
        return format_table(headers, ["<", "<", "<", ">", ">", ">"], rows) + pinning_note(self.config.server_cpus)


_UNITS = {"samples_per_s": ("samples/s", "{:,.0f}"), "p50_ms": ("p50 ms", "{:.3f}"),
          "p99_ms": ("p99 ms", "{:.3f}"), "max_ms": ("max ms", "{:.1f}"),
          SERVER_CPU: ("server CPU µs/req", "{:.0f}")}  # fmt: skip


def parse_scenario(text: str) -> Scenario:
    """``--scenario MODEL:BATCH:CONCURRENCY``, e.g. ``matmul16:1:1``."""
    model, batch, concurrency = text.split(":") if text.count(":") == 2 else ("", "", "")
    if not model or not batch.isdigit() or not concurrency.isdigit() or int(batch) < 1 or int(concurrency) < 1:
        raise ValueError(f"expected MODEL:BATCH:CONCURRENCY with whole numbers >= 1, got {text!r}")
    return Scenario(model, int(batch), int(concurrency))


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """``--variant NAME=FLAGS``: a name and the serve flags it adds (shell words; may be empty)."""
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise ValueError(f"expected NAME=FLAGS, got {text!r}")
    return name, tuple(shlex.split(flags))


def parse_checkout(text: str) -> tuple[str, pathlib.Path]:
    """``--checkout NAME=DIR``: the variant NAME serves infergate from DIR, a checkout of this repository."""
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"expected NAME=DIR, got {text!r}")
    path = pathlib.Path(directory).resolve()
    if not (path / "server" / "infergate" / "__init__.py").is_file():
        raise ValueError(f"{directory}: not a checkout of infergate (no server/infergate/__init__.py)")
    return name, path


def _commit(checkout: pathlib.Path) -> str:
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "unknown"


def run_alternate(config: AlternateConfig) -> AlternateReport:
    """Every variant in every slot of every round (see ``interleave``); writes alternate.json and alternate.md."""
    from infergate.demo import write_demo_repository  # type: ignore[import-untyped,unused-ignore]

    names = [name for name, _ in config.variants]
    report = AlternateReport(
        config,
        {s.name: {n: [] for n in names} for s in config.scenarios},
        {s.name: {n: [] for n in names} for s in config.scenarios},
    )
    config.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        repo = pathlib.Path(tmp) / "models"
        write_demo_repository(repo)
        serve = (sys.executable, "-m", "infergate", "serve", "--model-repository", str(repo))
        paths = {name: {"PYTHONPATH": str(checkout / "server")} for name, checkout in config.checkouts}
        variants = [Variant(name, (*serve, *flags), paths.get(name)) for name, flags in config.variants]
        models = sorted({s.model for s in config.scenarios})
        slots = interleaved(variants, config.rounds, config.slices, config.out, REPO_ROOT, models, config.server_cpus)
        for slot in slots:
            name = slot.variant.name
            for scenario in config.scenarios:
                load = LoadConfig(
                    target=slot.target, model=scenario.model, batch=scenario.batch,
                    concurrency=scenario.concurrency, duration=config.duration, warmup=config.warmup,
                    label=f"{name} {scenario.name}",
                )  # fmt: skip
                sample = measure(slot, load)
                result = sample.result
                report.runs[scenario.name][name].append(result)
                report.cpu_us[scenario.name][name].append(sample.server_cpu_us)
                print(
                    f"round {slot.round + 1} slice {slot.slice + 1} {name} {scenario.name}: "
                    f"{result.samples_per_s:,.0f} samples/s, p50 {result.p50_ms:.3f} ms, "
                    f"server CPU {sample.server_cpu_us:.0f} µs/req",
                    file=sys.stderr,
                )
    _write(report)
    return report


def _write(report: AlternateReport) -> None:
    config = report.config
    data = {
        "environment": environment(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {
            "variants": {name: list(flags) for name, flags in config.variants},
            "checkouts": {name: {"path": str(path), "commit": _commit(path)} for name, path in config.checkouts},
            "scenarios": [s.name for s in config.scenarios],
            "duration": config.duration,
            "warmup": config.warmup,
            "rounds": config.rounds,
            "slices": config.slices,
            "server_cpus": config.server_cpus,
        },
        "paired": {
            s.name: {m: {v: vars(r) for v, r in report.paired(s, m).items()} for m in s.metrics}
            for s in config.scenarios
        },
        "runs": {s: {v: [vars(r) for r in runs] for v, runs in by.items()} for s, by in report.runs.items()},
        "server_cpu_us_per_request": report.cpu_us,
    }
    (config.out / "alternate.json").write_text(json.dumps(data, indent=2, default=str))
    (config.out / "alternate.md").write_text(report.table() + "\n")
