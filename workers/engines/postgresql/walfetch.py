"""A restore's WAL, downloaded in the background while PostgreSQL already replays what has arrived.

Files are fetched in the order they are added (replay order), several at once, each written under a
temporary name and renamed into place whole. PostgreSQL's `restore_command` is the small shell script
written next to them: it copies a file that is there, waits for one that deskvault planned but has not
finished downloading, and reports anything else as missing, which is how recovery learns that the WAL
ends. The script, not deskvault, runs as the server's user, who need not be able to run deskvault.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from deskvault_core.errors import DeskvaultError
from workers.engines.postgresql.cluster import hand_over, server_ids
from workers.engines.postgresql.walarchive import PARTIAL, SUFFIX, WalEntry
from workers.repository.errors import ObjectNotFound
from workers.repository.objects import ObjectRepository

DOWNLOAD_THREADS = 4
EXPECTED_LIST = ".expected"
STOPPED_MARKER = ".stopped"
GAVE_UP_LIST = ".gave-up"  # planned files the script stopped waiting for
FAILED_SUFFIX = ".failed"  # beside a planned file whose download failed: why
FETCH_SCRIPT = "fetch-wal.sh"
# How long the restore_command waits for a planned file: far longer than one segment's download, short
# enough that a recovery whose deskvault process died ends instead of hanging.
WAIT_FOR_FILE_SECONDS = 600
_POLL_SECONDS = 0.2

_SCRIPT = """#!/bin/sh
# Written by deskvault restore: PostgreSQL's restore_command ("fetch-wal.sh %f %p"). Copies a WAL file
# from this folder, waiting for one that deskvault is still downloading; any other name is missing.
# A planned file that does not come is noted, so the restore can name it.
dir=$(dirname "$0")
polls=0
while [ ! -f "$dir/$1" ]; do
    grep -qxF "$1" "$dir/{expected}" 2>/dev/null || exit 1
    [ -f "$dir/{stopped}" ] && exit 1
    [ -f "$dir/$1{failed}" ] && exit 1
    if [ "$polls" -ge {max_polls} ]; then
        echo "$1" >> "$dir/{gave_up}"
        exit 1
    fi
    sleep {poll}
    polls=$((polls + 1))
done
# A hard link, not a copy: the file is never written again (PostgreSQL only reads it), and this folder
# goes once recovery ends. A copy where the two folders are on different file systems.
ln -f "$dir/$1" "$2" 2>/dev/null || exec cp "$dir/$1" "$2"
"""


def local_name(entry: WalEntry) -> str:
    """The file name PostgreSQL asks for: a partial segment is all there is of its segment."""
    return entry.filename.removesuffix(PARTIAL)


def restore_command(wal_dir: Path) -> str:
    """The restore_command setting that reads the WAL folder through its fetch script."""
    return f'"{wal_dir / FETCH_SCRIPT}" "%f" "%p"'


class WalDownloads:
    """Background downloads of WAL files into `wal_dir`, in the order they are added."""

    def __init__(
        self,
        repo: ObjectRepository,
        wal_dir: Path,
        on_progress: Callable[[str], None],
        *,
        planned: int = 0,
        threads: int = 0,
        patience: float = WAIT_FOR_FILE_SECONDS,
    ) -> None:
        self.repo = repo
        self.planned = planned  # how many files progress counts towards, if more are added later
        self.wal_dir = wal_dir
        self.on_progress = on_progress
        self._pool = ThreadPoolExecutor(threads or DOWNLOAD_THREADS, thread_name_prefix="wal-download")
        self._futures: dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        self._finished = 0
        self.patience = patience
        # The WAL holds every row: the folder is the server user's alone from the start, since
        # PostgreSQL reads from it while the restore still writes.
        wal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        hand_over(wal_dir)
        self._ids = server_ids()
        (wal_dir / EXPECTED_LIST).touch()
        script = wal_dir / FETCH_SCRIPT
        script.write_text(
            _SCRIPT.format(
                expected=EXPECTED_LIST,
                stopped=STOPPED_MARKER,
                failed=FAILED_SUFFIX,
                gave_up=GAVE_UP_LIST,
                max_polls=int(patience / _POLL_SECONDS),
                poll=_POLL_SECONDS,
            )
        )
        script.chmod(0o700)
        hand_over(script)

    def add(self, entries: Iterable[WalEntry]) -> None:
        """Queue `entries` for download; the fetch script waits for them from now on."""
        entries = list(entries)
        with (self.wal_dir / EXPECTED_LIST).open("a") as f:
            f.writelines(local_name(e) + "\n" for e in entries)
        for entry in entries:
            self._futures[local_name(entry)] = self._pool.submit(self._fetch, entry)

    def wait_all(self) -> None:
        """Until every queued file is in place; the first failure's error otherwise."""
        for future in list(self._futures.values()):
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop downloading; the fetch script stops waiting, so a running recovery ends."""
        (self.wal_dir / STOPPED_MARKER).touch()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def missing(self) -> str:
        """Why planned files did not reach PostgreSQL, as the fetch script and the downloads noted it."""
        reasons = [
            f"the download of WAL file {p.name.removesuffix(FAILED_SUFFIX)} failed: {p.read_text()}"
            for p in sorted(self.wal_dir.glob("*" + FAILED_SUFFIX))
        ]
        gave_up = self.wal_dir / GAVE_UP_LIST
        if gave_up.exists():
            reasons += [
                f"WAL file {name} was not downloaded within {self.patience:.0f}s, so PostgreSQL stopped "
                "waiting for it"
                for name in dict.fromkeys(gave_up.read_text().split())
            ]
        return "; ".join(reasons)

    def _fetch(self, entry: WalEntry) -> None:
        try:
            self._download(entry)
        except Exception as e:
            # The fetch script stops waiting for it, and the restore names it.
            (self.wal_dir / (local_name(entry) + FAILED_SUFFIX)).write_text(str(e)[:500])
            raise DeskvaultError(f"the download of WAL file {local_name(entry)} failed: {e}") from e

    def _write(self, path: Path, chunks: Iterable[bytes]) -> None:
        """A file for the server user alone (0600, its owner), never written through a link."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            if self._ids is not None:
                os.fchown(fd, *self._ids)
            for chunk in chunks:
                f.write(chunk)

    def _download(self, entry: WalEntry) -> None:
        path = self.wal_dir / local_name(entry)
        partial = path.with_name(path.name + ".download")
        try:
            self._write(partial, self.repo.get_stream(entry.key))
        except ObjectNotFound:
            if not entry.partial:
                raise
            # The segment was completed since the plan was made: the whole one holds at least as much.
            self._write(partial, self.repo.get_stream(entry.key.replace(PARTIAL + SUFFIX, SUFFIX)))
        # Only a whole, verified file ever carries the name PostgreSQL asks for.
        os.replace(partial, path)
        with self._lock:
            self._finished += 1
            done, total = self._finished, max(self.planned, len(self._futures))
        if done == total or done % max(total // 10, 1) == 0:
            self.on_progress(f"WAL {done}/{total} files downloaded and verified")
