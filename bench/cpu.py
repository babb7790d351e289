"""How busy the whole machine was: CPU seconds from /proc/stat, every process and the kernel alike.

On a machine whose object store and database run beside the tool, a stage's cost is not only the
tool's own CPU: SeaweedFS hashes and writes what is uploaded, PostgreSQL replays. Counting the machine's
busy time (user, nice, system, irq, softirq; not idle or iowait) charges each stage all of it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CORES = os.cpu_count() or 1
_TICKS = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the machine has spent busy since boot, summed over its cores."""
    user, nice, system, _idle, _iowait, irq, softirq = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / _TICKS


class Busy:
    """`with Busy() as b: ...`, then b.cpu_seconds, b.wall_seconds and b.share (of every core's time)."""

    def __enter__(self) -> Busy:
        self._cpu, self._wall = busy_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_seconds = busy_seconds() - self._cpu
        self.wall_seconds = time.monotonic() - self._wall

    @property
    def share(self) -> float:
        return self.cpu_seconds / (self.wall_seconds * CORES) if self.wall_seconds > 0 else 0.0
