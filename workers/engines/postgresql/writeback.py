"""Dirty pages written back while a restore lays out its files, not all at once when PostgreSQL starts.

A restore writes its files without fsync and PostgreSQL syncs the whole data directory once as it starts
(`recovery_init_sync_method = syncfs`). On a host with plenty of memory the kernel starts writing dirty
pages back only past its background threshold (10% of RAM by default), so a base smaller than that sat
dirty until that one sync, and the disk, idle meanwhile, then wrote it all while replay waited. Syncing
in the background as the files arrive keeps the disk busy beside the download and leaves the final sync
little to do; `settle` does the rest before PostgreSQL starts.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PAUSE_SECONDS = 0.5  # between syncs: each writes what the last second or so dirtied


@contextmanager
def written_back_meanwhile(
    folders: Iterable[Path], pause: float = PAUSE_SECONDS
) -> Iterator[threading.Thread]:
    """Run the block with a thread syncing the file systems of `folders` every `pause` seconds; it ends
    with the block. syncfs(2), not sync(2): a busy server on the same host keeps its own writeback."""
    folders = list(folders)
    done = threading.Event()

    def run() -> None:
        while not done.wait(pause):
            for folder in folders:
                try:
                    _sync_file_system(folder)
                except FileNotFoundError:
                    pass  # not made yet: its files come later, and settle syncs them

    thread = threading.Thread(target=run, name="writeback", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        done.set()
        thread.join()


def settle(folders: Iterable[Path]) -> int:
    """Make the restored files under `folders` durable, then drop their pages from the page cache; the
    number of files dropped.

    PostgreSQL's start-up sync then has nothing left to write, and replay runs against a cold cache of
    the base: measured in bench/vs_pgbackrest.py, replay over a freshly written (hot) base took 3.5 s
    against 2.5 s cold, its kernel time 2.0 s against 0.9 s, the same WAL either way. Only files the
    restore wrote are touched (never through a link), so nothing else on the host loses its cache.
    """
    folders = list(folders)
    for folder in folders:
        _sync_file_system(folder)
    dropped = 0
    for folder in folders:
        for parent, _, names in os.walk(folder):  # os.walk does not follow links to folders
            for name in names:
                path = os.path.join(parent, name)
                try:
                    # No link followed; O_NONBLOCK so that a FIFO, were one there, cannot hold us.
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    continue  # a link, or gone: nothing of ours to drop
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    dropped += 1
                finally:
                    os.close(fd)
    return dropped


def _sync_file_system(folder: Path) -> None:
    """syncfs(2) of the file system holding `folder`: that one only, unlike sync(2)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs of {folder}: {os.strerror(error)}")
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
