"""``infergate batch``: the command line of an offline run (see docs/offline.md).

Exit codes: 0 done (bad rows skipped with ``--on-error skip`` included);
1 the run failed (a bad row with ``--on-error stop``, a model that does not
load, a server that cannot be reached), or the summary could not be written
once the output was in place; 2 a bad command line, an input that cannot feed
the model, a file the run would destroy or cannot write, or a resume refused
(another run holds the output, the model changed); 130 stopped by Ctrl-C
(``--resume`` continues).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the run's modules load onnxruntime: imported when the command runs, not when it is parsed
    from infergate.offline.engine import Summary
    from infergate.offline.executors import Executor

__all__ = ["DEFAULT_CHUNK_ROWS", "add_parser", "main"]

DEFAULT_CHUNK_ROWS = 4096  # rows per unit of writing and resuming; a resume needs the same value
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def add_parser(commands: Any) -> None:
    """Add ``batch`` to the ``infergate`` command's subparsers."""
    batch = commands.add_parser(
        "batch",
        help="score a file offline with the same model version, batcher and runner the server uses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = batch.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-repository", type=Path, metavar="DIR", help="run the model in this process")
    where.add_argument("--url", metavar="HOST:PORT", help="send the rows to a running server instead")
    batch.add_argument("--model", required=True, metavar="NAME")
    batch.add_argument("--version", type=int, help="default: the version serving requests that name none")
    batch.add_argument("--input", type=Path, required=True, metavar="FILE", help=".npy .npz .parquet .csv .jsonl")
    batch.add_argument("--output", type=Path, required=True, metavar="FILE", help=".parquet .npz .jsonl")
    batch.add_argument("--batch-size", type=_positive, metavar="N", help="rows per request (default max_batch_size)")
    batch.add_argument("--instances", type=_positive, metavar="N", help="sessions in parallel (instance_group.count)")
    batch.add_argument("--chunk-rows", type=_positive, default=DEFAULT_CHUNK_ROWS, metavar="N", help="rows per chunk")
    batch.add_argument("--resume", action="store_true", help="continue after the last complete chunk of a run")
    batch.add_argument("--on-error", choices=["skip", "stop"], default="stop", help="what a bad row does")
    batch.add_argument("--errors", type=Path, metavar="FILE", help="bad rows as JSON lines (skip: OUTPUT.errors.jsonl)")
    batch.add_argument("--id-column", metavar="NAME", help="the column (or .npz array) holding each row's id")
    batch.add_argument("--concurrency", type=_positive, default=8, metavar="N", help="--url: requests in flight")
    batch.add_argument("--retries", type=_positive, default=5, metavar="N", help="--url: attempts per request")
    batch.add_argument("--timeout", type=float, default=60.0, metavar="S", help="--url: deadline per request")
    batch.add_argument("--summary", type=Path, metavar="FILE", help="write the run's summary as JSON")


def main(args: argparse.Namespace) -> int:
    """Run ``infergate batch``; returns the exit code."""
    try:
        return asyncio.run(_main(args))
    except asyncio.CancelledError:  # a second Ctrl-C: stopped at once; the state names the last chunk written
        print("infergate batch: stopped; --resume continues after the last complete chunk", file=sys.stderr)
        return INTERRUPTED


async def _main(args: argparse.Namespace) -> int:
    from infergate.configfile import ConfigError
    from infergate.models.runner import ModelLoadError
    from infergate.offline.engine import BadRowError, RunSettings, run, staging_of
    from infergate.offline.lock import check_free
    from infergate.offline.paths import PathError, check_paths
    from infergate.offline.readers import InputError
    from infergate.offline.state import ResumeError

    stop = asyncio.Event()
    _on_ctrl_c(stop)
    try:
        check_paths(args.input, args.output, args.errors, args.summary)  # before the model loads
        check_free(staging_of(args.output))
        executor = await _open(args)
    except (PathError, ResumeError) as exc:
        return _fail(exc, USAGE)
    except (InputError, ConfigError) as exc:
        return _fail(exc, USAGE)
    except ModelLoadError as exc:
        return _fail(exc, FAILED)
    except Exception as exc:  # the SDK's errors: the server cannot be reached, refuses the token...
        return _fail(exc, FAILED)
    settings = RunSettings(
        input=args.input,
        output=args.output,
        chunk_rows=args.chunk_rows,
        on_error=args.on_error,
        errors=args.errors,
        id_column=args.id_column,
        resume=args.resume,
    )
    try:
        summary = await run(settings, executor, stop)
    except (InputError, ResumeError, PathError) as exc:
        return _fail(exc, USAGE)
    except BadRowError as exc:
        return _fail(f"{exc}; --on-error skip skips bad rows", FAILED)
    except (OSError, ModelLoadError) as exc:
        return _fail(exc, FAILED)
    except Exception as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        return _fail(exc, FAILED)
    finally:
        await executor.aclose()
    summary.peak_rss_mb = _peak_rss_mb()
    _report(summary)
    if summary.interrupted:
        _write_summary(summary, args.summary)
        return INTERRUPTED
    return OK if _write_summary(summary, args.summary) else FAILED


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory since it started (``VmHWM``; Linux only).

    Not ``getrusage``: its ``ru_maxrss`` also counts the parent's memory from
    before this process's exec (fork and vfork share it), which would make a
    small run look as big as whatever launched it.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def _open(args: argparse.Namespace) -> Executor:
    from infergate.offline.executors import LocalExecutor, RemoteExecutor

    if args.url is not None:
        return await RemoteExecutor.open(
            args.url, args.model, args.version, args.batch_size, args.concurrency, args.retries, args.timeout
        )
    return await LocalExecutor.open(args.model_repository, args.model, args.version, args.batch_size, args.instances)


def _on_ctrl_c(stop: asyncio.Event) -> None:
    """First Ctrl-C: finish the chunks in flight, then stop. Second: stop at once."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def interrupted() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
            return
        stop.set()
        print("\ninfergate batch: stopping after the chunks in flight (Ctrl-C again to stop now)", file=sys.stderr)

    loop.add_signal_handler(signal.SIGINT, interrupted)


def _fail(error: object, code: int) -> int:
    print(f"infergate batch: {error}", file=sys.stderr)
    return code


def _report(summary: Summary) -> None:
    bad = f", {summary.bad_rows:,} bad (see {summary.errors_file})" if summary.errors_file else ""
    for note in summary.notes:
        print(f"infergate batch: {note}", file=sys.stderr)
    if summary.interrupted:
        print(
            f"infergate batch: interrupted after row {summary.resumed_from + summary.rows:,}; "
            "run again with --resume to continue",
            file=sys.stderr,
        )
    else:
        print(
            f"infergate batch: {summary.rows:,} rows{bad} in {summary.seconds:.1f} s "
            f"({summary.rows_per_second:,.0f} rows/s) -> {summary.output}",
            file=sys.stderr,
        )


def _write_summary(summary: Summary, path: Path | None) -> bool:
    """Write ``--summary`` when given; False (said on stderr) when it cannot be written. Its path was checked
    before the run, so what fails here is the writing itself (a full disk, a folder removed meanwhile)."""
    if path is None:
        return True
    body = asdict(summary) | {"rows_per_second": summary.rows_per_second}
    try:
        path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        done = "" if summary.interrupted else f"{summary.output} is complete, but "
        _fail(f"{done}the summary cannot be written to {path}: {exc}", FAILED)
        return False
    return True
