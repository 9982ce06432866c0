"""The last flush at shutdown, within a budget: a collector that is down cannot hold up the stop.

When the server stops it flushes the spans and metrics still queued for export
(``Telemetry.shutdown``). An OTLP exporter whose collector refuses connections or
never answers waits out its timeout (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s unless set)
and retries, and the SDK's ``BatchSpanProcessor.shutdown`` takes no timeout (it
waits up to 30 s). Waiting for that would take the pod past its termination grace:
SIGKILLed, it would lose the audit trail's last lines and exit as if it crashed.

So :func:`run_within` runs each provider's shutdown on a daemon thread of its own
and waits for them :data:`FLUSH_BUDGET_SECONDS` at most, all together; whatever is
still running then is given up (the process exits with ``os._exit``, which waits
for no thread). Where the SDK takes a timeout (``MeterProvider.shutdown``) it is
passed the same budget, so that it stops its exporter itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from infergate import threadnames

__all__ = ["FLUSH_BUDGET_SECONDS", "run_within"]

log = logging.getLogger(__name__)

# Plenty for a collector that answers (a flush is one or two exports of milliseconds each), and it fits in
# the margins after the drain's grace: the chart's terminationGracePeriodSeconds leaves 15 s (helm/infergate
# templates/_helpers.tpl) and the --workers supervisor SIGKILLs a worker 10 s after the grace
# (workers/supervisor.py). 5 s of flush leaves the rest for the audit trail's last lines, the log lines still
# queued (2 s at most for a stalled output: telemetry/logs.py) and the exit.
FLUSH_BUDGET_SECONDS = 5.0


def run_within(jobs: Mapping[str, Callable[[], object]], budget: float) -> list[str]:
    """Start every job at once, each on a daemon thread of its own; wait ``budget`` seconds at most, for all.

    Returns the names of the jobs still running then, in the order given: they are left running, and
    nothing waits for them any more. A job that raises is done; its error is logged.
    """
    deadline = time.monotonic() + budget
    threads = {
        name: threading.Thread(target=_logged, args=(name, job), name=f"flush-{name}", daemon=True)
        for name, job in jobs.items()
    }
    for thread in threads.values():
        thread.start()
    late = []
    for name, thread in threads.items():
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            late.append(name)
    return late


def _logged(name: str, job: Callable[[], object]) -> None:
    threadnames.name_after_python()
    try:
        job()
    except Exception as exc:  # e.g. MeterProvider.shutdown naming a reader that failed: the stop goes on
        log.warning("telemetry: flushing %s failed: %s", name, exc)
