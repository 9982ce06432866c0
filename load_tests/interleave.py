"""Variants of infergate up side by side and loaded in short alternating slices: A/B runs that drift cannot sway.

An A/B run that starts a fresh server per variant and loads it for ten seconds
compares figures taken minutes apart. On a shared two-core machine throughput
drifts by a quarter over a few minutes, and such rounds scatter by ±10%, more
than the few percent being asked about. So every round here starts one server
per variant, all of them, and then loads them in turn, one short slice each,
``slices`` times; the order rotates slot by slot (:func:`slot_order`).
Each slot (a round and a slice) gives every variant a figure taken seconds from
the others', so their ratio is one paired sample the drift hardly touches; a
fresh set of processes each round averages out what one process's luck
(memory layout, hash seed) gives. A server not being loaded waits in epoll,
using no CPU of its own meanwhile.

``ratios.paired`` turns the per-slot figures into each variant's ratio to a
base variant (the geometric mean of the slots' ratios) with a 95% interval
taken across rounds, since the slots of one round share its processes. On one
machine the servers can have cores of their own (``server_cpus``): the client
then takes no CPU from them, as when clients run elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .generator import LoadConfig, run_load
from .pinning import cpu_list, generator_pinned, on_cpus
from .procfs import tree_cpu_seconds
from .ratios import Ratio, paired
from .report import LoadResult
from .servers import free_port, running_server

__all__ = [
    "OverheadRun",
    "Sample",
    "Slot",
    "SlotFigures",
    "Variant",
    "interleaved",
    "measure",
    "measured",
    "pinning_note",
    "slot_order",
]


@dataclass(frozen=True)
class Variant:
    """One server configuration: its serve command (without ``--port``), added environment, and the
    bearer token its clients send (empty: none)."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    token: str = ""


@dataclass(frozen=True)
class Slot:
    """One variant's turn: round and slice (from 0), and the server that is up for it."""

    round: int
    slice: int
    variant: Variant
    target: str
    pid: int


@dataclass(frozen=True)
class Sample:
    """One slot's load and the CPU per answered request (µs, warm-up included) of the server and of
    the client (this process and the load processes it ran)."""

    result: LoadResult
    server_cpu_us: float
    client_cpu_us: float


V = TypeVar("V")


def slot_order(variants: Sequence[V], index: int) -> list[V]:
    """The variants in the order slot ``index`` (from 0, counted over the whole run) loads them.

    Each slot starts one variant later than the one before. With one fixed
    order the same variant would always follow the same other one (whose load
    may still be letting go of the CPU) and sit at the same place in every
    slot; rotating puts every variant in every place equally often over
    ``len(variants)`` slots.
    """
    shift = index % len(variants) if variants else 0
    return [*variants[shift:], *variants[:shift]]


def interleaved(
    variants: Sequence[Variant],
    rounds: int,
    slices: int,
    logs: pathlib.Path,
    cwd: pathlib.Path,
    models: Sequence[str] = (),
    server_cpus: Iterable[int] | None = None,
) -> Iterator[Slot]:
    """Each variant's slot, round by round and slice by slice, with every server of the round up.

    Starts the round's servers one after another (each ready, ``models`` too,
    before the next starts) and stops them all when the round's last slot is
    done; logs go to ``logs/NAME.log``, one file per variant over the rounds.
    ``server_cpus``: the servers run on those cores only, and this process and
    its load on the others (``pinning.py``), for as long as the slots last.
    """
    with generator_pinned(server_cpus):
        yield from _interleaved(variants, rounds, slices, logs, cwd, models, server_cpus)


def _interleaved(
    variants: Sequence[Variant],
    rounds: int,
    slices: int,
    logs: pathlib.Path,
    cwd: pathlib.Path,
    models: Sequence[str],
    server_cpus: Iterable[int] | None,
) -> Iterator[Slot]:
    for round_ in range(rounds):
        with contextlib.ExitStack() as up:
            targets: dict[str, tuple[str, int]] = {}
            for variant in variants:
                port = free_port()
                target = f"127.0.0.1:{port}"
                argv = [*variant.argv, "--port", str(port)]
                if server_cpus is not None:
                    argv = on_cpus(argv, server_cpus)
                log = logs / f"{variant.name}.log"
                server = running_server(
                    variant.name, argv, target, log, cwd, env=variant.env, models=models, token=variant.token
                )
                targets[variant.name] = (target, up.enter_context(server).pid)
            for slice_ in range(slices):
                for variant in slot_order(variants, round_ * slices + slice_):
                    target, pid = targets[variant.name]
                    yield Slot(round_, slice_, variant, target, pid)


def measure(slot: Slot, load: LoadConfig) -> Sample:
    """Run ``load`` (its target and token are the slot's) and read the server's CPU around it."""
    load = dataclasses.replace(load, target=slot.target, token=slot.variant.token)
    before, client_before = tree_cpu_seconds(slot.pid), _client_cpu_seconds()
    result = run_load(load)
    cpu = tree_cpu_seconds(slot.pid) - before  # the tree: a --workers N variant serves from child processes
    client = _client_cpu_seconds() - client_before
    served = max(result.requests * (load.warmup + load.duration) / load.duration, 1.0)  # CPU covers the warm-up
    return Sample(result, cpu / served * 1e6, client / served * 1e6)


def _client_cpu_seconds() -> float:
    """This process's CPU (every thread) and its reaped children's: the load processes a slot ran
    are reaped before it ends, the servers (children too) only when their round does."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@dataclass(frozen=True)
class OverheadRun:
    """What the overhead commands share: where they write, the closed loop each slot runs, how many slots."""

    out: pathlib.Path
    model: str = "matmul16"
    concurrency: int = 64
    duration: float = 8.0
    warmup: float = 2.0
    rounds: int = 3
    slices: int = 1
    server_cpus: tuple[int, ...] | None = None  # the servers' cores, the client on the others (None: not pinned)

    def pinning(self) -> str:
        """What a report says under its table about where the servers ran ("" when not pinned)."""
        return pinning_note(self.server_cpus)

    def load(self) -> LoadConfig:
        """The load of one slot (its target is the slot's: see :func:`measure`)."""
        return LoadConfig(
            target="", model=self.model, concurrency=self.concurrency, duration=self.duration, warmup=self.warmup
        )


class SlotFigures:
    """A report's loads and the server's and client's CPU per request, per variant in slot order
    (the report declares all three, and its run's configuration)."""

    config: OverheadRun
    runs: dict[str, list[LoadResult]]
    cpu_us: dict[str, list[float]]
    client_cpu_us: dict[str, list[float]]

    def add(self, slot: Slot, sample: Sample) -> None:
        name = slot.variant.name
        self.runs[name].append(sample.result)
        self.cpu_us[name].append(sample.server_cpu_us)
        self.client_cpu_us.setdefault(name, []).append(sample.client_cpu_us)

    def figures_json(self) -> dict[str, object]:
        """The per-slot figures, as the reports write them."""
        return {
            "runs": {v: [vars(r) for r in runs] for v, runs in self.runs.items()},
            "server_cpu_us_per_request": self.cpu_us,
            "client_cpu_us_per_request": self.client_cpu_us,
        }

    def mean_client_cpu(self, variant: str) -> str:
        """The client's mean CPU µs per request in ``variant``'s slots, for a table ("-" before any)."""
        figures = self.client_cpu_us.get(variant, [])
        return f"{statistics.fmean(figures):.0f}" if figures else "-"

    def paired_rates(self, base: str = "off") -> dict[str, Ratio]:
        """Each variant's throughput ÷ ``base``'s, slot by slot; empty when ``base`` did not run."""
        if base not in self.runs:
            return {}
        return self.ratios({v: [r.requests_per_s for r in runs] for v, runs in self.runs.items()}, base)

    def ratios(self, figures: Mapping[str, Sequence[float]], base: str = "off") -> dict[str, Ratio]:
        """Each variant's ``figures`` (one per slot, in slot order) ÷ ``base``'s (``ratios.paired``)."""
        return paired(figures, base, self.config.slices)


def measured(
    variants: Sequence[Variant], run: OverheadRun, cwd: pathlib.Path, describe: Callable[[str], str] = str
) -> Iterator[tuple[Slot, Sample]]:
    """:func:`measure` ``run``'s load in every slot of :func:`interleaved` (servers ready with its model),
    saying each figure on stderr with ``describe(variant name)``."""
    load = run.load()
    for slot in interleaved(variants, run.rounds, run.slices, run.out, cwd, (run.model,), run.server_cpus):
        label = describe(slot.variant.name)
        sample = measure(slot, dataclasses.replace(load, label=label))
        where = f"round {slot.round + 1} slice {slot.slice + 1}"
        print(f"{where} {label}: {sample.result.requests_per_s:,.0f} req/s", file=sys.stderr)
        yield slot, sample


def pinning_note(server_cpus: Iterable[int] | None) -> str:
    """The line a report adds under its table when the servers had cores of their own ("" when not)."""
    if server_cpus is None:
        return ""
    return f"\n\nServers pinned to cores {cpu_list(server_cpus)}; the client ran on the others."
