"""Progress of a batch run: a tqdm bar (rows/s, ETA) on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

__all__ = ["Progress"]

PLAIN_INTERVAL_S = 10.0  # a line this often when stderr is a file or a pipe (a CI log)


class Progress:
    """Counts rows done since ``initial`` (a resumed run's rows) towards ``total`` (None: unknown)."""

    def __init__(
        self, total: int | None, initial: int = 0, stream: TextIO | None = None, interval: float = PLAIN_INTERVAL_S
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.done = total, initial
        self._started, self._initial = time.monotonic(), initial
        self._interval, self._next_line = interval, time.monotonic() + interval
        self._bar = None
        if self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # the offline extra is not installed: plain lines it is
                return
            self._bar = tqdm(
                total=total, initial=initial, unit="row", unit_scale=True, file=self.stream, dynamic_ncols=True
            )

    @property
    def rate(self) -> float:
        """Rows per second in this run (a resumed run's earlier rows not counted)."""
        elapsed = time.monotonic() - self._started
        return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

    def update(self, rows: int) -> None:
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
        elif time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + self._interval
            print(f"infergate batch: {self.line()}", file=self.stream, flush=True)

    def line(self) -> str:
        """``12,288/100,000 rows (12.3%), 4,100 rows/s, ETA 0:00:21``."""
        rate = self.rate
        if self.total is None:
            return f"{self.done:,} rows, {rate:,.0f} rows/s"
        share = self.done / self.total if self.total else 1.0
        eta = timedelta(seconds=round((self.total - self.done) / rate)) if rate > 0 else "?"
        return f"{self.done:,}/{self.total:,} rows ({share:.1%}), {rate:,.0f} rows/s, ETA {eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
