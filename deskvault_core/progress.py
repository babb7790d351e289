"""Progress of a long copy as a person reads it: how much of how much, how far, how fast."""

from __future__ import annotations

import time
from collections.abc import Callable

MIB = 2**20


def progress_line(label: str, done: int, total: int, seconds: float) -> str:
    """E.g. "base: 312.0 of 1024.0 MiB (30%), 85.2 MiB/s" (the rate since the copy began)."""
    percent = 100 * done // total if total else 100
    rate = done / MIB / seconds if seconds > 0 else 0.0
    return f"{label}: {done / MIB:.1f} of {total / MIB:.1f} MiB ({percent}%), {rate:.1f} MiB/s"


class ByteProgress:
    """An `on_progress(done, total)` that emits a progress_line at most every `interval` seconds (a
    copy reports every chunk), and once at the end, when done reaches total."""

    def __init__(
        self,
        label: str,
        emit: Callable[[str], None],
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self._started = self._last = clock()
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        finished = done >= total
        if self._finished or (not finished and now - self._last < self.interval):
            return
        self._last, self._finished = now, finished
        self.emit(progress_line(self.label, done, total, now - self._started))
