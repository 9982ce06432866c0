"""Do the served outputs match the CPU's? Every demo model, every variant, several batch shapes.

Each model is loaded the way the server loads it (``OnnxRunner.load`` with the
variant's config.yaml, so IO binding, padding and CUDA graphs are the server's
own code), batches of several row counts run through it, and every request's
outputs are compared with a plain CPU ``session.run`` of that request alone.
"""

from __future__ import annotations

import asyncio
import math
import pathlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from infergate.models.config import load_model_config
from infergate.models.runner import BatchOutcome, OnnxRunner

from ..compute import feeds, open_session, session_signature

__all__ = ["Agreement", "check_model"]

# Float outputs may differ across devices (TF32 matmuls, other reduction orders): an output agrees when its
# largest difference is within ATOL plus RTOL of its largest magnitude (a per-element relative bound would
# fail on elements near zero after cancellation). Everything else must be equal.
RTOL = 1e-2
ATOL = 1e-3


@dataclass(frozen=True)
class Agreement:
    """One model under one variant: how it ran and the largest difference from the CPU."""

    variant: str
    model: str
    provider: str
    execution: str
    batches: int
    requests: int
    max_abs_error: float
    max_rel_error: float  # largest difference ÷ largest magnitude of the CPU's output
    ok: bool
    error: str = ""
    load_s: float = math.nan


def _row_sets(max_batch_size: int, quick: bool) -> list[list[int]]:
    if max_batch_size <= 1:
        return [[1]]
    sets = [[1], [3], [2, 5, 1]] if quick else [[1], [2], [3], [2, 5, 1], [7, 9], [max_batch_size]]
    return [rows for rows in sets if sum(rows) <= max_batch_size]


async def _run(runner: OnnxRunner, payloads: list[dict[str, Any]], rows: list[int]) -> BatchOutcome:
    future: asyncio.Future[BatchOutcome | BaseException] = asyncio.get_running_loop().create_future()
    runner.start(payloads, rows, future.set_result)
    outcome = await future
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _difference(got: Any, want: Any) -> tuple[float, float, bool]:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        return math.inf, math.inf, False
    if got.dtype.kind != "f":
        same = bool(np.array_equal(got, want))
        return (0.0, 0.0, True) if same else (math.inf, math.inf, False)
    g, w = got.astype(np.float64), want.astype(np.float64)
    if not (np.isfinite(g) == np.isfinite(w)).all():
        return math.inf, math.inf, False
    finite = np.isfinite(w)
    abs_err = float(np.max(np.abs(g[finite] - w[finite]), initial=0.0))
    scale = float(np.max(np.abs(w[finite]), initial=0.0))
    return abs_err, abs_err / scale if scale > 0 else 0.0, abs_err <= ATOL + RTOL * scale


async def _compare(runner: OnnxRunner, reference: Any, name: str, quick: bool) -> tuple[float, float, bool, int, int]:
    signature = session_signature(reference, name)
    worst_abs = worst_rel = 0.0
    ok = True
    requests = batches = 0
    for seed, rows in enumerate(_row_sets(runner.spec.max_batch_size, quick)):
        payloads = [feeds(signature, n, seed * 100 + i) for i, n in enumerate(rows)]
        results, _ = await _run(runner, payloads, rows)
        batches += 1
        for payload, result in zip(payloads, results, strict=True):
            requests += 1
            if isinstance(result, Exception):
                raise result
            for output, want in zip(reference.get_outputs(), reference.run(None, payload), strict=True):
                abs_err, rel_err, close = _difference(result[output.name], want)
                worst_abs, worst_rel, ok = max(worst_abs, abs_err), max(worst_rel, rel_err), ok and close
    return worst_abs, worst_rel, ok, batches, requests


def check_model(repo: pathlib.Path, variant: str, name: str, quick: bool) -> Agreement:
    """Load ``repo/name`` as the server would and compare its outputs with the CPU's."""
    model_file = repo / name / "1" / "model.onnx"
    started = time.perf_counter()
    try:
        config = load_model_config(repo / name / "config.yaml")
        runner = OnnxRunner.load(model_file, config, name, 1)
    except Exception as exc:  # a load failure is a finding, not a crash of the check
        return Agreement(variant, name, "", "", 0, 0, math.nan, math.nan, False, f"load failed: {exc}")
    load_s = time.perf_counter() - started
    try:
        reference = open_session(model_file)
        abs_err, rel_err, ok, batches, requests = asyncio.run(_compare(runner, reference, name, quick))
    except Exception as exc:
        return Agreement(
            variant, name, runner.providers[0], runner.execution, 0, 0, math.nan, math.nan, False, str(exc), load_s
        )
    finally:
        runner.close()
    return Agreement(
        variant, name, runner.providers[0], runner.execution, batches, requests, abs_err, rel_err, ok, "", load_s
    )
