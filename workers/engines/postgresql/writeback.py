"""Dirty pages written back while a restore lays out its files, not all at once when PostgreSQL starts.

A restore writes its files without fsync and PostgreSQL syncs the whole data directory once as it starts
(`recovery_init_sync_method = syncfs`). On a host with plenty of memory the kernel starts writing dirty
pages back only past its background threshold (10% of RAM by default), so a base smaller than that sat
dirty until that one sync, and the disk, idle meanwhile, then wrote it all while replay waited. Syncing
in the background as the files arrive keeps the disk busy beside the download and leaves the final sync
little to do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

PAUSE_SECONDS = 0.5  # between syncs: each writes what the last second or so dirtied


@contextmanager
def written_back_meanwhile(pause: float = PAUSE_SECONDS) -> Iterator[threading.Thread]:
    """Run the block with a thread calling sync(2) every `pause` seconds; it ends with the block."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(pause):
            os.sync()

    thread = threading.Thread(target=run, name="writeback", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        done.set()
        thread.join()
