"""``infergate-client``: poke a server from the shell.

Exit codes:

- 0: done (``health``: the server is live and ready);
- 1: ``health`` got an answer, but the server (or the model) is not ready: the JSON
  lists each model that is not ready and why (``not_ready``), also said on stderr;
- 2: bad command line, input file or input value (nothing was sent);
- 3: the server could not be reached in time (UNAVAILABLE, DEADLINE_EXCEEDED);
- 4: the server refused or failed the call (NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._calls import ModelMetadata, TensorMetadata
from ._codec import DATATYPES, Array
from .client import Client
from .errors import DeadlineExceeded, InferGateError, InvalidArgument, Unavailable, Unimplemented
from .options import Tls

__all__ = ["build_parser", "main"]

OK, NOT_READY, USAGE, UNREACHABLE, REFUSED = 0, 1, 2, 3, 4


class UsageError(Exception):
    """A bad argument or input file, found before anything was sent."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infergate-client",
        description="Call an infergate (Open Inference Protocol / KServe V2 gRPC) server.",
        epilog="Exit codes: 0 done; 1 not ready (health); 2 bad arguments or input; "
        "3 server unreachable or too slow; 4 the server refused or failed the call.",
    )
    parser.add_argument("--url", default="127.0.0.1:8001", help="HOST:PORT, dns:///NAME:PORT or IP:PORT,IP:PORT")
    parser.add_argument("--token", help="bearer token sent as 'authorization: Bearer TOKEN'")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S", help="deadline per call (default 30)")
    parser.add_argument("-H", "--header", action="append", default=[], metavar="KEY=VALUE", help="extra metadata")
    tls = parser.add_argument_group("TLS (any of these turns TLS on)")
    tls.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    tls.add_argument("--ca", type=Path, metavar="PEM", help="root certificates to trust")
    tls.add_argument("--cert", type=Path, metavar="PEM", help="client certificate chain (mTLS, with --key)")
    tls.add_argument("--key", type=Path, metavar="PEM", help="client private key (mTLS, with --cert)")
    tls.add_argument("--server-name", help="name to check in the server's certificate")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    health = commands.add_parser("health", help="is the server (or a model) live and ready")
    health.add_argument("--model", help="also check this model is ready")
    models = commands.add_parser("models", help="list the models and their versions")
    models.add_argument(
        "--long", "-l", action="store_true", help="also each version's governance metadata (or why it is not ready)"
    )
    metadata = commands.add_parser("metadata", help="a model's inputs and outputs, as JSON")
    metadata.add_argument("model")
    metadata.add_argument("--model-version", default=None)
    infer = commands.add_parser("infer", help="run a model once", description=_INFER_HELP)
    infer.add_argument("model")
    infer.add_argument("--input", "-i", action="append", default=[], metavar="NAME=@FILE.npy|NAME=JSON")
    infer.add_argument("--output", "-o", action="append", default=[], metavar="NAME", help="only these outputs")
    infer.add_argument("--output-dir", type=Path, metavar="DIR", help="write NAME.npy per output (default: print)")
    infer.add_argument("--model-version", default=None)
    infer.add_argument("--request-id", default="")
    return parser


_INFER_HELP = """Send one ModelInfer. Each --input is NAME=@FILE.npy (the array as saved) or
NAME=JSON (nested lists, cast to the input's datatype from ModelMetadata), e.g.
-i x='[[1,2,3]]'. Outputs are printed as JSON (NaN and infinities as the strings
"nan", "inf" and "-inf"), or saved with --output-dir."""


def _client(args: argparse.Namespace, health_check: bool = True) -> Client:
    headers = []
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--header {item!r}: expected KEY=VALUE")
        headers.append((key, value))
    tls = None
    if args.tls or args.ca or args.cert or args.key or args.server_name:
        try:
            tls = Tls(args.ca, args.key, args.cert, args.server_name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return Client(
        args.url, tls=tls, token=args.token, metadata=headers, timeout=args.timeout, health_check=health_check
    )


def _cmd_health(client: Client, args: argparse.Namespace) -> int:
    live, ready = client.is_server_live(), client.is_server_ready()
    status: dict[str, Any] = {"live": live, "ready": ready}
    if args.model:
        status[f"model {args.model} ready"] = client.is_model_ready(args.model)
    if all(status.values()):
        print(json.dumps(status))
        return OK
    # A ready server with a model that is not: that model. A server that is not ready: every model that
    # is not (the one asked about may be fine while another failed to load).
    status["not_ready"] = reasons = _not_ready(client, args.model if ready else None)
    print(json.dumps(status))
    why = "; ".join(f"model {r['model']}{' version ' + r['version'] if r['version'] else ''}: {r['reason']}"
                    for r in reasons)  # fmt: skip
    if not why:
        why = f"model {args.model} is not in the repository" if ready else "the server is starting or draining"
    print(f"infergate-client: not ready: {why}", file=sys.stderr)
    return NOT_READY


def _not_ready(client: Client, model: str | None) -> list[dict[str, str]]:
    """The models that are not ready and why, from RepositoryIndex (empty where it cannot be read:
    the health answer stands on its own)."""
    try:
        rows = client.repository_index()
    except InferGateError:
        return []
    return [
        {"model": r.name, "version": r.version, "state": r.state, "reason": r.reason or r.state}
        for r in rows
        if r.state != "READY" and (model is None or r.name == model)
    ]


def _cmd_models(client: Client, args: argparse.Namespace) -> int:
    try:
        rows = [(m.name, m.version, m.state, m.reason) for m in client.repository_index()]
    except Unimplemented:  # servers without model control still list what they serve in their statistics
        stats = client.model_statistics()
        rows = [(s.name, s.version, "READY", "") for s in stats.model_stats]
    for name, version, state, reason in rows:
        print(f"{name}\t{version or '-'}\t{state or '-'}")
        if args.long:
            for key, value in _details(client, name, version, state, reason):
                # A value of several lines (a sha256 pin of several files) stays under its key.
                print(f"    {key}: " + ("\n" + " " * (len(key) + 6)).join(value.splitlines()))
    return OK


def _details(client: Client, name: str, version: str, state: str, reason: str) -> list[tuple[str, str]]:
    """``models --long``: a ready version's ModelConfig parameters (its governance metadata), else the reason."""
    if state != "READY" or not version:
        return [("reason", reason)] if reason else []
    config = client.model_config(name, version)
    return sorted((key, param.string_value) for key, param in config.parameters.items())


def _tensors(items: Sequence[TensorMetadata]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]


def _cmd_metadata(client: Client, args: argparse.Namespace) -> int:
    meta = client.model_metadata(args.model, args.model_version)
    body = {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform}
    print(json.dumps({**body, "inputs": _tensors(meta.inputs), "outputs": _tensors(meta.outputs)}, indent=2))
    return OK


def parse_input(text: str, metadata: ModelMetadata) -> tuple[str, Array]:
    """``NAME=@FILE.npy`` or ``NAME=JSON`` as (name, array); JSON is cast to the input's datatype."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise UsageError(f"--input {text!r}: expected NAME=@FILE.npy or NAME=JSON")
    if value.startswith("@"):
        try:
            return name, np.load(value[1:], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--input {name}: cannot read {value[1:]}: {exc}") from None
    datatype = next((t.datatype for t in metadata.inputs if t.name == name), None)
    if datatype is None:
        raise UsageError(f"--input {name}: model {metadata.name!r} has no such input")
    try:
        return name, _as_datatype(json.loads(value, parse_float=_json_float), datatype)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input {name}: not JSON ({exc})") from None
    except (ArithmeticError, TypeError, ValueError) as exc:  # 2**70 for INT64, 1e39 or "one" for FP32, ragged
        raise UsageError(f"--input {name}: {value} cannot be {datatype}: {exc}") from None


def _json_float(text: str) -> float:
    """A JSON number with a fraction or exponent; OverflowError where ``float`` would read it as infinity."""
    number = float(text)
    if math.isinf(number):
        raise OverflowError(f"{text} is out of range")
    return number


def _as_datatype(data: Any, datatype: str) -> Array:
    """Parsed JSON as an array of ``datatype``. A finite number that a float datatype cannot hold
    (1e39 for FP32, 70000 for FP16) raises OverflowError instead of becoming an infinity."""
    dtype = DATATYPES[datatype]
    if dtype.kind in "iub":
        _check_leaves(data, dtype)
    if dtype.kind != "f":
        return np.array(data, dtype=dtype)
    wide = np.array(data, dtype=np.float64)  # "inf", "nan" and "-inf" strings read as themselves
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype)
    overflow = np.isinf(narrow) & np.isfinite(wide)
    if overflow.any():
        first = wide[overflow][0]
        raise OverflowError(f"{first:g} is out of range (largest finite {datatype} is {np.finfo(dtype).max:g})")
    return narrow


def _check_leaves(data: Any, dtype: np.dtype[Any]) -> None:
    """Refuse what numpy would cast silently: 1.5 or true for an integer (1), 5 or "false" for a BOOL (True).
    Integers take whole numbers (2.0 too) in range, and text numpy reads as one; BOOL takes true, false, 0, 1.
    """
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(value)
        elif dtype.kind == "b":
            if not (isinstance(value, bool) or (type(value) is int and value in (0, 1))):
                raise ValueError(f"{value!r} is not true, false, 0 or 1")
        elif isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{value!r} is not a whole number")
        elif isinstance(value, (int, float)) and not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise OverflowError(f"{shown} is out of range")


NON_FINITE: dict[str, Callable[[Array], Array]] = {"nan": np.isnan, "inf": np.isposinf, "-inf": np.isneginf}


def _jsonable(value: Any) -> Any:
    """An output as nested lists; BYTES elements as text, NaN and infinities as "nan", "inf" and "-inf"
    (strict JSON has no number for them; numpy reads those strings back as floats)."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [_jsonable(v) for v in value]
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            text = value.astype(object)
            for word, where in NON_FINITE.items():
                text[where(value)] = word
            return text.tolist()
        return value.tolist()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _cmd_infer(client: Client, args: argparse.Namespace) -> int:
    if not args.input:
        raise UsageError("infer needs at least one --input")
    metadata = client.model_metadata(args.model, args.model_version)
    inputs = dict(parse_input(text, metadata) for text in args.input)
    result = client.infer(
        args.model, inputs, outputs=args.output, model_version=args.model_version, request_id=args.request_id
    )
    if args.output_dir is None:
        print(json.dumps({name: _jsonable(array) for name, array in result.items()}, allow_nan=False))
        return OK
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, array in result.items():
        path = args.output_dir / f"{name}.npy"
        np.save(path, array, allow_pickle=array.dtype == object)
        print(f"{name}: {array.dtype} {list(array.shape)} -> {path}")
    return OK


_COMMANDS = {"health": _cmd_health, "models": _cmd_models, "metadata": _cmd_metadata, "infer": _cmd_infer}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        # health asks a server whatever its state; the others go where the inference service is SERVING.
        with _client(args, health_check=args.command != "health") as client:
            return _COMMANDS[args.command](client, args)
    except UsageError as exc:
        print(f"infergate-client: {exc}", file=sys.stderr)
        return USAGE
    except (Unavailable, DeadlineExceeded) as exc:
        print(f"infergate-client: cannot reach {args.url}: {exc}", file=sys.stderr)
        return UNREACHABLE
    except InferGateError as exc:
        print(f"infergate-client: {exc}", file=sys.stderr)
        refused_here = isinstance(exc, InvalidArgument) and exc.code is None  # the SDK could not encode it
        return USAGE if refused_here else REFUSED
    except (OSError, ValueError) as exc:  # an unreadable PEM file, a malformed URL
        print(f"infergate-client: {exc}", file=sys.stderr)
        return USAGE
