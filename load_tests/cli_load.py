"""The ``closed``, ``open`` and ``compare`` subcommands: parsing, sweeps and output files.

A comma-separated ``--concurrency`` (closed) or ``--rate`` (open) is a sweep:
one run per value, one after the other, reported together. Every run is
printed as a table row; ``--out DIR`` also writes ``runs.json``, ``runs.csv``
and ``runs.png`` (throughput against latency percentiles).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_load_commands", "cmd_compare", "cmd_load"]

AddParser = Callable[..., argparse.ArgumentParser]


def _number_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a number or a list like 1,8,64: {exc}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be > 0")
        return values

    return parse


def _npy_input(text: str) -> tuple[str, str]:
    """``NAME=FILE.npy`` or ``NAME=@FILE.npy`` (the spelling infergate-client uses)."""
    name, sep, path = text.partition("=")
    path = path.removeprefix("@")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FILE.npy")
    return name, path


def _add_common(p: argparse.ArgumentParser) -> None:
    # --url, as infergate-client and tritonclient (-u) spell it; --target is the older spelling, still accepted.
    p.add_argument(
        "--url",
        "-u",
        dest="target",
        default="127.0.0.1:8001",
        metavar="HOST:PORT",
        help="HOST:PORT of the V2 gRPC server (default 127.0.0.1:8001, as infergate-client)",
    )
    p.add_argument("--target", dest="target", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--model", required=True, help="model name, or a weighted mix like mlp:3,matmul16:1")
    p.add_argument("--batch", metavar="N", type=int, default=1, help="batch size of random inputs (default 1)")
    p.add_argument("--duration", metavar="S", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument(
        "--requests", metavar="N", type=int, default=None, help="count-limited: measure N requests (overrides duration)"
    )
    p.add_argument("--warmup", metavar="S", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    p.add_argument("--processes", metavar="K", type=int, default=1, help="generator processes sharing the load")
    p.add_argument(
        "--connections",
        metavar="C",
        type=int,
        default=1,
        help="connections per process (raw client; default 1): the kernel spreads connections, not calls, "
        "over the workers of a --workers N server, so use many more than N",
    )
    p.add_argument(
        "--client",
        choices=("raw", "tritonclient", "sdk"),
        default="raw",
        help="raw: one pre-serialised request sent as bytes, replies unparsed (cheapest; default). "
        "tritonclient: tritonclient.grpc.aio with set_data_from_numpy on every call. "
        "sdk: infergate_client.AsyncClient, numpy in and out on every call",
    )
    p.add_argument("--timeout", metavar="S", type=float, default=10.0, help="per-call deadline (default 10)")
    p.add_argument(
        "--no-deadline",
        dest="deadline",
        action="store_false",
        help="send calls without a gRPC deadline, like perf_analyzer (--timeout still bounds the run)",
    )
    p.add_argument("--token", default="", help="bearer token sent as 'authorization: Bearer TOKEN'")
    p.add_argument(
        "--input",
        type=_npy_input,
        action="append",
        default=[],
        metavar="NAME=@FILE.npy",
        help="send this array for input NAME instead of random data (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs and arrivals (default 0)")
    p.add_argument("--label", default="", help="name shown in the table (default: the URL)")
    p.add_argument("--json", type=pathlib.Path, metavar="FILE", help="write the runs as JSON")
    p.add_argument("--csv", type=pathlib.Path, metavar="FILE", help="write the runs as CSV")
    p.add_argument("--plot", type=pathlib.Path, metavar="FILE.png", help="plot throughput vs latency")
    p.add_argument("--out", type=pathlib.Path, metavar="DIR", help="write DIR/runs.json, runs.csv and runs.png")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a live status line on stderr (default: when stderr is a terminal)",
    )


def add_load_commands(commands: Any) -> None:
    """Register ``closed``, ``open`` and ``compare`` on the harness's subparsers."""
    closed = commands.add_parser(
        "closed",
        help="closed-loop load: N requests in flight (a list sweeps)",
        description="Keep --concurrency ModelInfer requests in flight against --url, then report requests/s, "
        "samples/s, p50/p90/p99 latency, errors by gRPC status and the generator's own CPU. Only requests "
        "completing inside the measurement window count. Inputs come from ModelMetadata (-1 becomes the batch "
        "size in dimension 0, 1 elsewhere) and are random (fixed seed), or from --input files.",
    )
    _add_common(closed)
    closed.add_argument(
        "--concurrency", metavar="N[,N...]", type=_number_list(int), default=[64], help="in flight (default 64)"
    )
    open_ = commands.add_parser(
        "open",
        help="open-loop load: a fixed request rate with Poisson arrivals (a list sweeps)",
        description="Send --rate requests/s with exponential gaps (Poisson arrivals) whether or not earlier ones "
        "were answered. Latency runs from each request's intended send time, so a server (or generator) that "
        "falls behind shows as latency, not as a lower rate: no coordinated omission. Requests whose intended "
        "time falls in the window count.",
    )
    _add_common(open_)
    open_.add_argument("--rate", required=True, metavar="R[,R...]", type=_number_list(float), help="requests/s")
    open_.add_argument(
        "--max-in-flight",
        metavar="N",
        type=int,
        default=10_000,
        help="outstanding requests per process before arrivals are dropped as GENERATOR_FULL (default 10000)",
    )
    compare = commands.add_parser(
        "compare", help="two result files side by side", description="Lay the runs of two JSON files side by side."
    )
    compare.add_argument("a", type=pathlib.Path, metavar="A.json")
    compare.add_argument("b", type=pathlib.Path, metavar="B.json")
    compare.add_argument("--names", nargs=2, default=None, metavar=("A", "B"), help="column names (default: files)")
    compare.add_argument("--plot", type=pathlib.Path, metavar="FILE.png", help="plot both on one chart")


def _configs(args: argparse.Namespace) -> list[Any]:
    from .generator import LoadConfig

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    common = dict(
        target=args.target, model=args.model, batch=args.batch, duration=args.duration, warmup=args.warmup,
        processes=args.processes, client=args.client, timeout=args.timeout, seed=args.seed, label=args.label,
        requests=args.requests, token=args.token, inputs=tuple(args.input), progress=progress, mode=args.command,
        deadline=args.deadline, connections=args.connections,
    )  # fmt: skip
    if args.command == "closed":
        return [LoadConfig(**common, concurrency=c) for c in args.concurrency]
    return [
        LoadConfig(**common, rate=r, concurrency=args.processes, max_in_flight=args.max_in_flight) for r in args.rate
    ]


def _write_outputs(args: argparse.Namespace, results: list[Any]) -> None:
    from .plots import plot_runs
    from .report import write_csv, write_json

    json_path, csv_path, plot_path = args.json, args.csv, args.plot
    if args.out is not None:
        json_path = json_path or args.out / "runs.json"
        csv_path = csv_path or args.out / "runs.csv"
        plot_path = plot_path or args.out / "runs.png"
    if json_path:
        write_json(json_path, {"runs": results})
    if csv_path:
        write_csv(csv_path, results)
    if plot_path:
        title = f"{args.model} at {args.target}, {args.command} loop, batch {args.batch}"
        plot_runs(plot_path, {args.label or args.target: results}, title)
    for path in (json_path, csv_path, plot_path):
        if path:
            print(f"wrote {path}")


def cmd_load(args: argparse.Namespace) -> int:
    """Run one configuration per sweep value; exit 1 when a run measured nothing."""
    from .generator import run_load
    from .report import format_load_table

    results = []
    for config in _configs(args):
        results.append(run_load(config))
        if len(results) > 1 or config.progress:  # show each sweep step as it finishes
            print(format_load_table(results[-1:]).splitlines()[1], file=sys.stderr)
    print(format_load_table(results))
    _write_outputs(args, results)
    return 0 if all(r.requests for r in results) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_table
    from .plots import plot_runs
    from .report import read_results

    a, b = read_results(args.a), read_results(args.b)
    names = tuple(args.names) if args.names else (args.a.stem, args.b.stem)
    if names[0] == names[1]:
        names = (f"A:{names[0]}", f"B:{names[1]}")
    print(f"A = {args.a}\nB = {args.b}\n")
    print(compare_table(a, b, (names[0], names[1])))
    if args.plot:
        plot_runs(args.plot, {names[0]: a, names[1]: b}, "compare")
        print(f"wrote {args.plot}")
    return 0
