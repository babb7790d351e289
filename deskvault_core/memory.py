"""Hand freed S3 part buffers back to the system instead of keeping them in the heap.

Backups and restores move data in chunks of 1-4 MiB and S3 parts of 16 MiB, from several threads.
glibc raises its mmap threshold to the size of each large buffer freed (up to 32 MiB), so later part
buffers come from the heap and stay there once freed, and each thread may grow a heap (arena) of its
own. Measured on a 185 MiB full run twice in one process (2 cores): peak RSS 180 MiB after the first,
231 MiB after the second. With a fixed threshold of 8 MiB (part buffers mapped and unmapped, chunks
still from the heap) and two arenas: 201 MiB after both. A threshold of 1 MiB kept it lower but cost
15% of a restore's speed in page faults. Set for this process (mallopt) and, through the environment
glibc reads at start, for the processes it spawns.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 8 * 2**20
ARENAS = 2
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
_M_ARENA_MAX = -8


def keep_heap_small() -> None:
    """Apply the limits above; a no-op where the C library is not glibc."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    os.environ.setdefault("MALLOC_ARENA_MAX", str(ARENAS))
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_ARENA_MAX, ARENAS)
