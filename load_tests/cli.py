"""Command line of the load harness: argument parsing and dispatch only.

Exit codes: 0 done; 1 the run finished but measured nothing (no successful
request); 2 bad arguments or the run could not be carried out.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from .cli_load import add_load_commands, cmd_compare, cmd_load
from .procfs import parse_cpu_list
from .signature import NUMPY_DTYPES, ModelSignature, TensorSpec

if TYPE_CHECKING:
    from .interleave import OverheadRun

__all__ = ["build_parser", "main"]

T = TypeVar("T")

_DESCRIPTION = """\
Load harness for infergate (Open Inference Protocol / KServe V2 gRPC).

  closed    closed-loop load (N in flight) against any V2 gRPC server; a list of N sweeps
  open      open-loop load (a fixed rate, Poisson arrivals, no coordinated omission); a list sweeps
  compare   two result files side by side
  ceiling   the transport ceiling: a bare grpc.aio server with one fixed reply
  compute   the compute ceiling: in-process onnxruntime, no server
  suite     ceiling vs infergate vs onnxruntime side by side (--peers: and Triton, KServe,
            MLServer); writes suite.json/suite.md
  shadow    primary latency with no shadow, a 10x slower shadow and a failing one
  sequences stateful load: N sequences in flight (implicit state), every answer checked
  shm       a batch of 16 224x224 images over the wire and through system shared memory, same run
  telemetry-overhead  infergate with tracing and metrics off vs on, alternating, same run
  drift-overhead      infergate with drift monitoring off and at sample_fraction 0, 0.1, 1.0, same run
  auth-overhead       infergate with JWT auth off vs on (one cached token), interleaved, same run
  soak      mixed load for N minutes while the server's memory and open files are sampled
  alternate infergate under different serve flags (--variant NAME=FLAGS) or checkouts, alternating, same run
  report    a saved A/B run's JSON (alternate, *-overhead) reported again with today's statistics

Everything runs on loopback. Run from the repository root: python -m load_tests ...
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _batch_list(text: str) -> list[int]:
    try:
        return [_positive_int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,8,64: {exc}") from None


def _tensor(text: str) -> TensorSpec:
    """NAME:DATATYPE:DIMS, e.g. ``x:FP32:-1,16``."""
    try:
        name, datatype, dims = text.split(":")
        return TensorSpec(name, datatype.upper(), tuple(int(d) for d in dims.split(",")))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:DATATYPE:DIMS like x:FP32:-1,16 ({exc})") from None


def _add_ceiling(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from infergate.eventloop import EVENT_LOOPS  # type: ignore[import-untyped,unused-ignore]

    p = commands.add_parser(
        "ceiling",
        help="transport-ceiling server: one pre-serialised reply, request unparsed",
        description="A bare grpc.aio server on 127.0.0.1 answering ModelInfer with a "
        "pre-serialised ModelInferResponse (zeros, with the model's output names, datatypes "
        "and the request's batch size) without parsing the request; also ModelMetadata, "
        "ModelConfig, ModelStatistics, ModelReady, ServerLive/Ready/Metadata. Models come from "
        "--model-repository (DIR/<name>/<version>/model.onnx) or from --model with --input and "
        "--output. Runs until SIGINT/SIGTERM; prints one 'listening' line when ready.",
    )
    p.add_argument(
        "--port",
        metavar="PORT",
        type=int,
        default=0,
        help="port on 127.0.0.1 (default 0: any free)",
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="asyncio event loop, chosen as infergate's is (default auto: uvloop when installed)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model-repository",
        type=pathlib.Path,
        metavar="DIR",
        help="serve every ONNX model of this repository",
    )
    source.add_argument("--model", help="serve one model described by --input/--output")
    datatypes = ", ".join(NUMPY_DTYPES)
    p.add_argument(
        "--input",
        type=_tensor,
        action="append",
        default=[],
        metavar="NAME:DT:DIMS",
        help=f"with --model: an input, e.g. x:FP32:-1,16 (DT one of {datatypes})",
    )
    p.add_argument(
        "--output",
        type=_tensor,
        action="append",
        default=[],
        metavar="NAME:DT:DIMS",
        help="with --model: an output (its shape is the reply's; -1 in dimension 0 takes the request's batch size)",
    )
    p.add_argument(
        "--processes",
        metavar="K",
        type=_positive_int,
        default=1,
        help="server processes sharing the port with SO_REUSEPORT (default 1; >1 needs --port)",
    )


def _add_compute(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "compute",
        help="compute ceiling: in-process onnxruntime session.run",
        description="Run onnxruntime (CPU) session.run back to back on random inputs at each "
        "batch size for --duration seconds; report samples/s and per-call latency.",
    )
    p.add_argument("--model-file", type=pathlib.Path, required=True, metavar="FILE", help="path to model.onnx")
    p.add_argument(
        "--batches",
        metavar="LIST",
        type=_batch_list,
        default=[1, 8, 64],
        help="comma-separated batch sizes (default 1,8,64)",
    )
    p.add_argument(
        "--duration",
        metavar="S",
        type=_positive_float,
        default=3.0,
        help="seconds per batch size (default 3)",
    )
    p.add_argument(
        "--intra-op-threads",
        metavar="N",
        type=int,
        default=0,
        help="onnxruntime intra-op threads, per session (default 0: onnxruntime's choice)",
    )
    p.add_argument(
        "--sessions",
        metavar="N",
        type=_positive_int,
        default=1,
        help="sessions run at once, each from a thread of its own, as a server's model instances (default 1)",
    )
    p.add_argument("--json", type=pathlib.Path, metavar="FILE", help="also write all figures here")


def _add_suite(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "suite",
        help="ceiling vs infergate vs onnxruntime, with the project's target ratios",
        description="Write the demo repository to a temp dir, then, one after another: start the "
        "ceiling server and load it (matmul16 b1 at 1 and 64 in flight, mlp b1 at 64, mlp b8 at "
        "32); the same against infergate; in-process onnxruntime for mlp and matmul16 at batch "
        "1, 8, 64, as one session and as infergate served each (its sessions, each from a thread of "
        "its own). Prints and writes suite.json and suite.md with the target ratios. Servers are "
        "always stopped. Takes about 8 x (warmup + duration) + 12 x compute-duration seconds. "
        "With --peers, each peer (installed by scripts/install_peers.sh) is then started, checked "
        "and loaded the same way: 4 x (warmup + duration) more each, plus 10-40 s to start and stop.",
    )
    p.add_argument(
        "--duration",
        metavar="S",
        type=_positive_float,
        default=10.0,
        help="measured seconds per load run (default 10)",
    )
    p.add_argument(
        "--warmup",
        metavar="S",
        type=_non_negative_float,
        default=2.0,
        help="warm-up seconds per load run (default 2)",
    )
    p.add_argument(
        "--compute-duration",
        metavar="S",
        type=_positive_float,
        default=3.0,
        help="seconds per in-process batch size (default 3)",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="output folder (default results/suite-<UTC time>)",
    )
    p.add_argument(
        "--processes",
        metavar="K",
        type=_positive_int,
        default=1,
        help="generator processes per load run (default 1)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for infergate, repeatable: --server-arg=--workers=2",
    )
    p.add_argument(
        "--server-command",
        default=None,
        metavar="TEMPLATE",
        help="command that starts the server under test, with {python}, {repo} and "
        "{port} placeholders (default: '{python} -m infergate serve "
        "--model-repository {repo} --host 127.0.0.1 --port {port}')",
    )
    p.add_argument(
        "--ceiling-processes",
        metavar="K",
        type=_positive_int,
        default=1,
        help="processes of the ceiling server (default 1)",
    )
    p.add_argument(
        "--intra-op-threads",
        metavar="N",
        type=int,
        default=0,
        help="onnxruntime intra-op threads for the in-process runs in one session (default 0); each model "
        "is also run as infergate served it",
    )
    p.add_argument(
        "--model-repository",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="use this repository instead of writing the demo one (needs models matmul16 and mlp)",
    )
    p.add_argument(
        "--ready-timeout",
        metavar="S",
        type=_positive_float,
        default=60.0,
        help="seconds to wait for each server's ServerReady (default 60)",
    )
    p.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=(),
        metavar="LIST",
        help="run only these scenarios, comma-separated (default: all of matmul16_b1_c1, "
        "matmul16_b1_c64, mlp_b1_c64, mlp_b8_c32)",
    )
    p.add_argument(
        "--peers",
        nargs="?",
        const="all",
        default=None,
        type=_peer_list,
        metavar="LIST",
        help="also run peer servers after infergate: all (the default with a bare --peers) or a "
        "comma list of triton, kserve, mlserver; install them first with scripts/install_peers.sh",
    )
    p.add_argument(
        "--peer-intra-op-threads",
        metavar="N",
        type=_non_negative_int,
        default=1,
        help="onnxruntime intra-op threads in every peer (default 1; 0: onnxruntime's own choice)",
    )
    p.add_argument(
        "--peer-instances",
        metavar="N",
        type=_positive_int,
        default=1,
        help="onnxruntime sessions per model in the peers that have model instances: Triton's "
        "instance group, MLServer's parallel workers (default 1; KServe always runs one)",
    )
    p.add_argument(
        "--peer-queue-delay-us",
        metavar="US",
        type=_non_negative_int,
        default=None,
        help="queue delay for the peers that batch (Triton, MLServer) instead of each model's own "
        "max_queue_delay_microseconds",
    )


def _scenario_list(text: str) -> tuple[str, ...]:
    from .suite import SCENARIOS

    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [key for key in keys if key not in {s.key for s in SCENARIOS}]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {', '.join(unknown) or '(none)'}")
    return keys


def _peer_list(text: str) -> tuple[str, ...]:
    from .peers.launch import parse_peer_names

    try:
        return parse_peer_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_shadow(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shadow = commands.add_parser("shadow", help="does shadow traffic slow the caller? (starts its own servers)")
    shadow.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight (default 8)")
    shadow.add_argument("--duration", type=_positive_float, default=10.0, help="seconds per run (default 10)")
    shadow.add_argument("--rounds", type=_positive_int, default=2, help="times each scenario runs (default 2)")
    shadow.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/shadow"), help="output directory")


def _add_overload(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "overload",
        help="k times a model's capacity, open loop: how fast refusals are, what admitted calls see",
        description="Start infergate with limits.max_inference_calls=LIMIT, measure each model's capacity "
        "at LIMIT in flight, then send FACTOR times that rate open-loop (1 s deadline each). slow is "
        "compute-bound (about 20 ms per batch of 4); tiny is the 16x16 product, bound by per-call cost.",
    )
    p.add_argument("--models", default="slow,tiny", help="comma list of slow, tiny (default both)")
    p.add_argument("--limit", type=_positive_int, default=8, help="limits.max_inference_calls (default 8)")
    p.add_argument("--factor", type=_positive_float, default=10.0, help="times the capacity (default 10)")
    p.add_argument("--duration", type=_positive_float, default=8.0, help="open-loop seconds (default 8)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/overload"), help="output directory")
    p.add_argument(
        "--url",
        metavar="HOST:PORT",
        help="measure a server already running there instead of starting one (serve --write-repository's "
        "models with its server.yaml; pass its limit as --limit): keeps the generator off the server's cores",
    )
    p.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        help="generator processes sharing the offered rate (default 1; one Python process sends about what "
        "a server answers on one core, so a server on a bigger machine needs more)",
    )
    p.add_argument(
        "--server-cpus",
        type=_argument(parse_cpu_list),
        metavar="LIST",
        help="pin the server this command starts to these cores (taskset's list form, e.g. 0,1 or 0-3) and "
        "the generator to the others, so that on one machine the generator does not take the server's CPU",
    )
    p.add_argument(
        "--write-repository",
        type=pathlib.Path,
        metavar="DIR",
        help="write the models and server.yaml (limit --limit) into DIR, print the serve command, and stop",
    )


def _add_sequences(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "sequences",
        help="stateful load: N sequences in flight, each answer checked (starts its own server)",
        description="Start infergate on a repository with one stateful model (a running sum kept as "
        "implicit state) and keep N sequences in flight, each sending its requests one after another, "
        "then a new sequence. Every answer is checked against the running sum. With --url, load a "
        "server that already serves that model (load_tests.sequences.build_repository writes it).",
    )
    p.add_argument(
        "--concurrency", type=_positive_int, default=32, metavar="N", help="sequences in flight (default 32)"
    )
    p.add_argument("--length", type=_positive_int, default=20, metavar="L", help="requests per sequence (default 20)")
    p.add_argument("--duration", type=_positive_float, default=10.0, metavar="S", help="measured s (default 10)")
    p.add_argument("--warmup", type=_non_negative_float, default=2.0, metavar="S", help="warm-up s (default 2)")
    p.add_argument("--url", "-u", dest="target", metavar="HOST:PORT", help="load this server instead of starting one")
    p.add_argument("--target", dest="target", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # older spelling
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="extra `infergate serve` argument")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/sequences"), help="output directory")


def _add_shm(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "shm",
        help="16 images of 3x224x224 FP32 per request, over the wire and through shared memory (starts its server)",
        description="Start infergate with --allow-client-shm on a model that takes a batch of 16 FP32 "
        "3x224x224 images (9.6 MB) and answers 16x1000 scores, then per round load it closed-loop twice: "
        "with the tensors in the request and reply, and through system shared memory (regions per slot, "
        "the batch copied in and the scores copied out on every request). Every answer is checked. "
        "With --target, load a server on this host that serves that model with --allow-client-shm "
        "(load_tests.shm.build_repository writes it). Writes shm.json and shm.md.",
    )
    p.add_argument("--concurrency", type=_positive_int, default=2, metavar="N", help="in flight (default 2)")
    p.add_argument("--duration", type=_positive_float, default=10.0, metavar="S", help="measured s (default 10)")
    p.add_argument("--warmup", type=_non_negative_float, default=2.0, metavar="S", help="warm-up s (default 2)")
    p.add_argument("--rounds", type=_positive_int, default=2, help="times each variant runs (default 2)")
    p.add_argument("--target", metavar="HOST:PORT", help="load this server (same host) instead of starting one")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="extra `infergate serve` argument")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/shm"), help="output directory")


def _add_overhead_run(p: argparse.ArgumentParser, config: type[OverheadRun], model_help: str) -> None:
    """The options every overhead command shares (``interleave.OverheadRun``), defaulting as ``config`` does."""
    default = {f.name: f.default for f in dataclasses.fields(config)}
    p.add_argument("--model", default=default["model"], help=f"{model_help} (default {default['model']})")
    p.add_argument(
        "--concurrency", type=_positive_int, default=default["concurrency"], metavar="N",
        help=f"in flight (default {default['concurrency']})",
    )  # fmt: skip
    p.add_argument(
        "--duration", type=_positive_float, default=default["duration"], metavar="S",
        help=f"measured s per slice (default {default['duration']:g})",
    )  # fmt: skip
    p.add_argument(
        "--warmup", type=_non_negative_float, default=default["warmup"], metavar="S",
        help=f"warm-up s per slice (default {default['warmup']:g})",
    )  # fmt: skip
    p.add_argument("--rounds", type=_positive_int, default=default["rounds"], metavar="R",
                   help=f"rounds, each with fresh servers (default {default['rounds']})")  # fmt: skip
    p.add_argument(
        "--slices", type=_positive_int, default=default["slices"], metavar="K",
        help=f"per round, load every variant K times in turn, servers kept up (default {default['slices']})",
    )  # fmt: skip
    _add_pinned_servers(p)


def _add_pinned_servers(p: argparse.ArgumentParser) -> None:
    """``--server-cpus``, for the commands that start servers and load them in alternating slots."""
    p.add_argument(
        "--server-cpus", type=_argument(_sorted_cpu_list), metavar="LIST",
        help="run the servers on these cores only (taskset's list form, e.g. 0) and the client on the others, "
        "so that the client takes no CPU from them, as when clients run elsewhere (default: not pinned)",
    )  # fmt: skip


def _sorted_cpu_list(text: str) -> tuple[int, ...]:
    return tuple(sorted(parse_cpu_list(text)))


def _overhead_run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``OverheadRun`` fields :func:`_add_overhead_run`'s options gave (all but ``out``)."""
    from .interleave import OverheadRun

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(OverheadRun) if f.name != "out"}


def _add_telemetry_overhead(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .telemetry import VARIANTS, OverheadConfig, variants

    p = commands.add_parser(
        "telemetry-overhead",
        help="infergate with tracing and metrics off vs on, in one run",
        description="Per round, start infergate once per variant (off, metrics, and traces sampled at "
        "100, 10 and 1%% with metrics; spans go over OTLP to a sink process), all kept up, and load each in "
        "turn the same way (--slices times, the order rotating). Writes overhead.json and overhead.md.",
    )
    _add_overhead_run(p, OverheadConfig, "model to load")
    p.add_argument("--variants", type=variants, default=VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", type=pathlib.Path, default=None, metavar="DIR", help="default results/overhead-<time>")
    _add_cost_table(p, "each telemetry step's")


def _add_cost_table(p: argparse.ArgumentParser, whose: str) -> None:
    """``--costs-only`` and ``--cold``: the in-process cost table of an overhead command (costs.py)."""
    p.add_argument("--costs-only", action="store_true", help=f"only print {whose} CPU µs per call, in-process")
    p.add_argument(
        "--cold",
        action="store_true",
        help="time each call of the cost table alone after evicting the CPU caches, as a server between requests",
    )


def _print_costs(costs: dict[str, float], cold: bool) -> None:
    for step, micros in costs.items():
        print(f"{micros:8.1f} µs  {step}{' (cold caches)' if cold else ''}")


def _add_alternate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .alternate import parse_checkout, parse_scenario, parse_variant

    p = commands.add_parser(
        "alternate",
        help="infergate under different serve flags, alternating, in one run",
        description="Per round, start infergate on the demo models once per --variant, all kept up, and run "
        "matmul16 b1 at 64 and 1 in flight and mlp b8 at 32 against each in turn (--slices times, the order "
        "rotating). Writes alternate.json and alternate.md.",
    )
    p.add_argument(
        "--variant", type=_argument(parse_variant), action="append", required=True, metavar="NAME=FLAGS",
        help='a name and its serve flags, e.g. asyncio="--event-loop asyncio" (repeat; at least two)',
    )  # fmt: skip
    p.add_argument(
        "--checkout", type=_argument(parse_checkout), action="append", default=[], metavar="NAME=DIR",
        help="the variant NAME serves infergate from DIR, another checkout (e.g. a git worktree of an older commit)",
    )  # fmt: skip
    p.add_argument(
        "--scenario", type=_argument(parse_scenario), action="append", default=[], metavar="MODEL:BATCH:CONCURRENCY",
        help="a load to run instead of the three default ones, e.g. matmul16:1:1 (repeat)",
    )  # fmt: skip
    p.add_argument("--duration", type=_positive_float, default=6.0, metavar="S", help="measured s (default 6)")
    p.add_argument("--warmup", type=_non_negative_float, default=1.0, metavar="S", help="warm-up s (default 1)")
    p.add_argument("--rounds", type=_positive_int, default=3, metavar="R", help="rounds (default 3)")
    p.add_argument(
        "--slices", type=_positive_int, default=1, metavar="K",
        help="per round, load every variant K times in turn, servers kept up (default 1)",
    )  # fmt: skip
    _add_pinned_servers(p)
    p.add_argument("--out", type=pathlib.Path, default=None, metavar="DIR", help="default results/alternate-<time>")


def _add_report(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "report",
        help="a saved A/B run's JSON reported again with today's statistics",
        description="Read the JSON an interleaved A/B command wrote (alternate, auth-overhead, telemetry-overhead, "
        "drift-overhead), print that command's table as it prints it today, then every paired ratio: the geometric "
        "mean of the per-slot ratios, ± half the width of its 95% interval over the rounds, and the ratio the file "
        "recorded. Starts nothing.",
    )
    p.add_argument("file", type=pathlib.Path, metavar="FILE.json", help="the JSON the command wrote")
    p.add_argument(
        "--md", type=pathlib.Path, metavar="FILE", help="also write the table to FILE, as the command writes its .md"
    )


_RATIO_NOTE = (
    "Ratios: the geometric mean of the per-slot ratios, ± half the width of its 95% Student t interval over the "
    "rounds' means (rounds - 1 degrees of freedom; none with one round). Recorded: as the file holds it, with "
    "the statistics it was written with."
)


def _cmd_report(args: argparse.Namespace) -> int:
    from .saved import format_comparisons, read_saved_run

    run = read_saved_run(args.file)
    table = run.report.table()
    print(f"{args.file} ({run.kind})\n\n{table}\n\n{_RATIO_NOTE}\n\n{format_comparisons(run.comparisons)}")
    if args.md is not None:
        args.md.write_text(table + "\n", encoding="utf-8")
        print(f"\nwrote {args.md}")
    return 0


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type``: its ValueError becomes the option's error message."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names the type in some messages
    return convert


def _cmd_alternate(args: argparse.Namespace) -> int:
    from .alternate import AlternateConfig, run_alternate

    names = [name for name, _ in args.variant]
    if len(names) < 2 or len(set(names)) != len(names):
        print("alternate: give at least two --variant, each with its own name", file=sys.stderr)
        return 2
    unknown = [name for name, _ in args.checkout if name not in names]
    if unknown:
        print(f"alternate: --checkout names no --variant: {', '.join(unknown)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_exit)
    out = _out_dir(args, "alternate")
    config = AlternateConfig(
        out=out,
        variants=tuple(args.variant),
        checkouts=tuple(args.checkout),
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        slices=args.slices,
        server_cpus=args.server_cpus,
        **({"scenarios": tuple(args.scenario)} if args.scenario else {}),
    )
    report = run_alternate(config)
    print(report.table())
    print(f"\nwrote {out / 'alternate.json'} and {out / 'alternate.md'}")
    return 0


def _add_auth_overhead(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .auth import ALGORITHMS, VARIANTS, AuthOverheadConfig, variants

    p = commands.add_parser(
        "auth-overhead",
        help="infergate with JWT auth off vs on, interleaved, in one run",
        description="Per round, start infergate on the demo models once per variant (off: no auth, no token; "
        "header: no auth, every call carrying the token anyway; jwt: JWT auth, every call carrying the same "
        "token), keep all up and load each in turn --slices times. Prints and writes each ÷ off, throughput "
        "and server CPU per request, paired slot by slot (geometric mean, 95% interval over rounds), and the "
        "client's CPU per request (auth-overhead.json, auth-overhead.md).",
    )
    _add_overhead_run(p, AuthOverheadConfig, "model to load")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="HS256", help="token signature (default HS256)")
    p.add_argument(
        "--variants", type=variants, default=VARIANTS, help=f"comma list of {', '.join(VARIANTS)}, off among them"
    )
    _add_cost_table(p, "auth's")
    p.add_argument("--out", type=pathlib.Path, default=None, metavar="DIR", help="default results/auth-<time>")


def _cmd_auth_overhead(args: argparse.Namespace) -> int:
    from .auth import AuthOverheadConfig, auth_step_costs, run_auth_overhead

    if args.costs_only:
        _print_costs(auth_step_costs(cold=args.cold), args.cold)
        return 0
    signal.signal(signal.SIGTERM, _raise_exit)
    out = _out_dir(args, "auth")
    config = AuthOverheadConfig(out=out, algorithm=args.algorithm, variants=args.variants, **_overhead_run(args))
    report = run_auth_overhead(config)
    print(report.table())
    print(f"\nwrote {out / 'auth-overhead.json'} and {out / 'auth-overhead.md'}")
    return 0


def _add_drift_overhead(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .drift import VARIANTS, DriftOverheadConfig, variants

    p = commands.add_parser(
        "drift-overhead",
        help="infergate with drift monitoring off and at sample_fraction 0, 0.1 and 1.0, in one run",
        description="Per round, start infergate once per variant (no monitoring block, then monitoring.drift "
        "at each sample_fraction, with a reference profile of the generator's distribution), all kept up, and "
        "load each in turn the same way (--slices times, the order rotating). Writes drift-overhead.json and "
        "drift-overhead.md.",
    )
    _add_overhead_run(p, DriftOverheadConfig, "demo model with one [batch, N] input")
    p.add_argument("--window", type=_positive_int, default=2000, metavar="ROWS", help="drift window (default 2000)")
    p.add_argument("--variants", type=variants, default=tuple(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", type=pathlib.Path, default=None, metavar="DIR", help="default results/drift-<time>")


def _add_soak(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .soak import DEFAULT_MODELS

    p = commands.add_parser(
        "soak",
        help="mixed load for N minutes; the server's RSS and open files sampled, RSS growth against a bound",
        description="Mixed load (unary and streaming inference over several models, metadata, fresh "
        "connections, and calls that must fail: bad shape, unknown model, 1 ms deadline, cancelled stream) "
        "against a server started here over the demo repository, or --url. The server's process tree is "
        "sampled from /proc every --sample-seconds. Prints each sample and the RSS growth from the end of the "
        "warm-up to the end; writes soak.json. Exit 1 when no call succeeded or any outcome was unexpected "
        "(with --check, also when RSS grew past the bound).",
    )
    p.add_argument("--minutes", type=_positive_float, default=10.0, metavar="M", help="length of the run (default 10)")
    p.add_argument("--url", "-u", dest="target", metavar="HOST:PORT", help="soak this server (on this machine)")
    p.add_argument("--target", dest="target", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # older spelling
    p.add_argument("--pid", type=_positive_int, metavar="PID", help="with --url: its process (default: the listener)")
    p.add_argument(
        "--models", default=DEFAULT_MODELS, metavar="MIX", help=f"weighted models (default {DEFAULT_MODELS})"
    )
    p.add_argument("--concurrency", type=_positive_int, default=8, metavar="N", help="callers (default 8)")
    p.add_argument("--sample-seconds", type=_positive_float, default=5.0, metavar="S", help="sampling (default 5)")
    p.add_argument(
        "--warmup-minutes",
        type=_non_negative_float,
        default=2.0,
        metavar="M",
        help="RSS growth is measured from here to the end (default 2; half the run when that is shorter)",
    )
    p.add_argument("--bound-percent", type=_positive_float, default=5.0, metavar="P", help="RSS growth bound (5)")
    p.add_argument("--check", action="store_true", help="exit 1 when RSS grew past the bound")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="extra infergate serve argument")
    p.add_argument("--out", type=pathlib.Path, default=None, metavar="DIR", help="default results/soak-<UTC time>")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m load_tests`` parser and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m load_tests",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_load_commands(commands)
    commands_to_add = (
        _add_ceiling, _add_compute, _add_suite, _add_shadow, _add_sequences, _add_overload,
        _add_telemetry_overhead, _add_drift_overhead, _add_soak,
        _add_shm, _add_alternate, _add_auth_overhead, _add_report,
    )  # fmt: skip
    for add in commands_to_add:
        add(commands)
    return parser


def _ceiling_models(args: argparse.Namespace) -> dict[str, ModelSignature]:
    if args.model_repository is not None:
        from .repository import read_repository

        return read_repository(args.model_repository)
    if not args.input or not args.output:
        raise ValueError("--model needs at least one --input and one --output")
    signature = ModelSignature(args.model, tuple(args.input), tuple(args.output))
    return {signature.name: signature}


def _out_dir(args: argparse.Namespace, prefix: str) -> pathlib.Path:
    """``--out``, or ``results/PREFIX-<UTC time>`` when it was not given."""
    out: pathlib.Path | None = args.out
    return out or pathlib.Path("results") / time.strftime(f"{prefix}-%Y%m%d-%H%M%S", time.gmtime())


def _cmd_ceiling(args: argparse.Namespace) -> int:
    from .ceiling import run_ceiling

    run_ceiling(_ceiling_models(args), args.port, args.processes, args.event_loop)
    return 0


def _cmd_compute(args: argparse.Namespace) -> int:
    from .compute import Layout, format_compute_table, run_compute
    from .report import write_json

    layout = Layout(args.sessions, args.intra_op_threads)
    results = run_compute(args.model_file, args.batches, args.duration, layout=layout)
    print(format_compute_table(results))
    if args.json:
        write_json(args.json, results)
    return 0


def _raise_exit(signum: int, frame: object) -> NoReturn:
    # SystemExit unwinds through `finally`, so server subprocesses still get stopped.
    raise SystemExit(128 + signum)


def _cmd_suite(args: argparse.Namespace) -> int:
    from .suite import DEFAULT_SERVER_COMMAND, SuiteConfig, print_summary, run_suite

    signal.signal(signal.SIGTERM, _raise_exit)
    out = _out_dir(args, "suite")
    config = SuiteConfig(
        out=out,
        duration=args.duration,
        warmup=args.warmup,
        compute_duration=args.compute_duration,
        processes=args.processes,
        ceiling_processes=args.ceiling_processes,
        server_args=tuple(args.server_arg),
        server_command=args.server_command or DEFAULT_SERVER_COMMAND,
        intra_op_threads=args.intra_op_threads,
        model_repository=args.model_repository,
        ready_timeout=args.ready_timeout,
        scenarios=args.scenarios,
        peers=args.peers or (),
        peer_intra_op_threads=args.peer_intra_op_threads,
        peer_instances=args.peer_instances,
        peer_queue_delay_us=args.peer_queue_delay_us,
    )
    _check_peers_installed(config.peers)
    report = run_suite(config)
    print_summary(report)
    print(f"\nwrote {out / 'suite.json'} and {out / 'suite.md'}")
    return 0 if not report.failures else 1


def _check_peers_installed(names: Sequence[str]) -> None:
    """Refuse before anything starts when a peer asked for has no environment yet."""
    from .peers.launch import PEERS

    missing = [name for name in names if not PEERS[name].installed]
    if missing:
        raise FileNotFoundError(
            f"peer(s) not installed: {', '.join(missing)}; run scripts/install_peers.sh {' '.join(missing)}"
        )


def _cmd_shadow(args: argparse.Namespace) -> int:
    from .shadow import format_shadow_table, run_shadow_benchmark

    args.out.mkdir(parents=True, exist_ok=True)
    runs = run_shadow_benchmark(args.concurrency, args.duration, args.rounds, args.out)
    table = format_shadow_table(runs)
    (args.out / "shadow.md").write_text(table + "\n")
    print(table)
    return 0 if all(run.result.requests for run in runs) else 1


def _cmd_overload(args: argparse.Namespace) -> int:
    from .overload import (
        MODELS,
        OverloadPlan,
        format_overload,
        run_overload,
        run_overload_against,
        write_overload_repository,
    )

    if args.write_repository is not None:
        command = write_overload_repository(args.write_repository, args.limit)
        print(shlex.join([*command, "--host", "0.0.0.0", "--port", "8001"]))
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in models if m not in MODELS]:
        raise SystemExit(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    if args.url and args.server_cpus is not None:
        raise SystemExit("--server-cpus pins a server this command starts; with --url, pin yours with taskset")
    plans = [OverloadPlan(m, args.limit, args.factor, args.duration, args.processes) for m in models]
    if args.url:
        runs = [run_overload_against(args.url, plan, args.out) for plan in plans]
    else:
        runs = [run_overload(plan, args.out, args.server_cpus) for plan in plans]
    table = format_overload(runs)
    (args.out / "overload.md").write_text(table + "\n")
    print(table)
    return 0 if all(r.admitted for r in runs) else 1


def _cmd_sequences(args: argparse.Namespace) -> int:
    from .report import write_json
    from .sequences import format_sequence_run, run_sequences, run_sequences_against

    signal.signal(signal.SIGTERM, _raise_exit)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.target:
        run = run_sequences_against(args.target, args.concurrency, args.length, args.warmup, args.duration)
    else:
        server_args = tuple(args.server_arg)
        run = run_sequences(args.concurrency, args.length, args.warmup, args.duration, args.out, server_args)
    write_json(args.out / "sequences.json", run)
    print(format_sequence_run(run))
    print(f"\nwrote {args.out / 'sequences.json'}")
    return 0 if run.result.requests else 1


def _cmd_shm(args: argparse.Namespace) -> int:
    from .report import write_json
    from .shm import format_shm_runs, run_shm, run_shm_against

    signal.signal(signal.SIGTERM, _raise_exit)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.target:
        run = run_shm_against(args.target, args.concurrency, args.warmup, args.duration, args.rounds)
    else:
        run = run_shm(args.concurrency, args.warmup, args.duration, args.rounds, args.out, args.server_arg)
    table = format_shm_runs(run)
    write_json(args.out / "shm.json", {"rounds": run.rounds, "ratios": run.ratios()})
    (args.out / "shm.md").write_text(table + "\n", encoding="utf-8")
    print(f"{table}\n\nwrote {args.out / 'shm.json'} and {args.out / 'shm.md'}")
    return 0 if all(r.requests for taken in run.rounds for r in taken.values()) else 1


def _cmd_telemetry_overhead(args: argparse.Namespace) -> int:
    from .telemetry import OverheadConfig, per_call_costs, run_overhead

    _print_costs(per_call_costs(cold=args.cold), args.cold)
    if args.costs_only:
        return 0
    signal.signal(signal.SIGTERM, _raise_exit)
    out = _out_dir(args, "overhead")
    config = OverheadConfig(out=out, variants=args.variants, **_overhead_run(args))
    report = run_overhead(config)
    print(report.table())
    print(f"\nwrote {out / 'overhead.json'} and {out / 'overhead.md'}")
    return 0


def _cmd_drift_overhead(args: argparse.Namespace) -> int:
    from .drift import DriftOverheadConfig, run_drift_overhead

    signal.signal(signal.SIGTERM, _raise_exit)
    out = _out_dir(args, "drift")
    config = DriftOverheadConfig(out=out, window=args.window, variants=args.variants, **_overhead_run(args))
    report = run_drift_overhead(config)
    print(report.table())
    print(f"\nwrote {out / 'drift-overhead.json'} and {out / 'drift-overhead.md'}")
    return 0


def _cmd_soak(args: argparse.Namespace) -> int:
    from .mix import parse_mix
    from .report import write_json
    from .soak import SoakConfig, format_report, run_soak

    signal.signal(signal.SIGTERM, _raise_exit)
    out = _out_dir(args, "soak")
    config = SoakConfig(
        minutes=args.minutes, models=parse_mix(args.models), concurrency=args.concurrency,
        sample_seconds=args.sample_seconds, warmup_minutes=args.warmup_minutes, bound_percent=args.bound_percent,
    )  # fmt: skip
    report = run_soak(config, out, args.target, args.pid, args.server_arg)
    write_json(out / "soak.json", report)
    print(format_report(report))
    print(f"\nwrote {out / 'soak.json'}")
    failed = not report["calls"] or report["unexpected"]["count"] or (args.check and not report["rss"]["within_bound"])
    return 1 if failed else 0


_COMMANDS = {
    "closed": cmd_load,
    "open": cmd_load,
    "compare": cmd_compare,
    "ceiling": _cmd_ceiling,
    "compute": _cmd_compute,
    "suite": _cmd_suite,
    "alternate": _cmd_alternate,
    "shadow": _cmd_shadow,
    "overload": _cmd_overload,
    "sequences": _cmd_sequences,
    "shm": _cmd_shm,
    "telemetry-overhead": _cmd_telemetry_overhead,
    "drift-overhead": _cmd_drift_overhead,
    "auth-overhead": _cmd_auth_overhead,
    "soak": _cmd_soak,
    "report": _cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from .answers import WrongAnswer
    from .generator import GeneratorError
    from .servers import ServerFailed

    try:
        return _COMMANDS[args.command](args)
    except (GeneratorError, ServerFailed, WrongAnswer, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
