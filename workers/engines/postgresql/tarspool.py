"""pg_basebackup's tar files, read while it writes them and freed on disk as they are read.

`pg_basebackup -F tar` writes a single tablespace to stdout and no more; with tablespaces it writes one
tar per tablespace into a folder, one after the other: each `<oid>.tar`, then the data directory's
`base.tar`, then `backup_manifest`. Each tar is read as it grows, and the bytes read are punched out of
the file (`fallocate`), so the folder only ever holds what the upload has not taken yet -- never a
second copy of the backup. Reading the server is far faster than compressing and uploading, so the
writer is paused (SIGSTOP) while more than `max_pending` bytes wait unread and resumed at half: the
same backpressure a pipe gives, which keeps a full of any size within a bounded spool.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024
POLL_SECONDS = 0.05
MAX_PENDING = 256 * 1024 * 1024
MANIFEST = "backup_manifest"
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class TarSpool:
    """Runs `command`, which writes tars into `folder`; `archives()` yields each as (name, chunks).

    Each archive's chunks must be read to their end before the next archive is asked for. `on_line` sees
    every stderr line as it arrives (pg_basebackup reports its LSNs there). A consumer that stops early
    kills the process.
    """

    def __init__(
        self,
        command: list[str],
        env: dict[str, str],
        folder: Path,
        on_line: Callable[[str], None],
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.command = command
        self.max_pending = max_pending
        self.paused = 0  # how many times the writer was paused for the reader to catch up
        self.env = env
        self.folder = folder
        self.on_line = on_line
        self.returncode: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._read = 0  # bytes read of the tar being read (the ones before it are deleted)
        self._punch = _hole_puncher()

    def archives(self) -> Iterator[tuple[str, Iterator[bytes]]]:
        proc = self._proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env
        )
        assert proc.stderr is not None
        reader = threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True)
        reader.start()
        taken: set[str] = set()
        threading.Thread(target=self._pace, args=(taken,), daemon=True).start()
        try:
            while (name := self._next_archive(taken)) is not None:
                taken.add(name)
                yield name, self._follow(name, taken)
                (self.folder / name).unlink(missing_ok=True)
                self._read = 0
            self.returncode = proc.wait()
            reader.join(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()  # a stopped process is killed too
                proc.wait()

    def manifest(self) -> bytes | None:
        """PostgreSQL's backup_manifest, once the run has ended; None if it wrote none."""
        try:
            return (self.folder / MANIFEST).read_bytes()
        except FileNotFoundError:
            return None

    def said(self, limit: int = 1500) -> str:
        """The end of what the tool wrote to stderr, for an error message."""
        return " | ".join(self.tail)[-limit:]

    def _tars(self, taken: set[str]) -> list[Path]:
        try:
            found = [p for p in self.folder.iterdir() if p.name.endswith(".tar") and p.name not in taken]
        except FileNotFoundError:
            return []  # pg_basebackup creates the folder once connected
        # One tar is written at a time, each closed before the next opens; base.tar always comes last.
        return sorted(found, key=lambda p: (p.name == "base.tar", p.stat().st_mtime_ns))

    def _next_archive(self, taken: set[str]) -> str | None:
        while True:
            exited = self._exited()
            if tars := self._tars(taken):
                return tars[0].name
            if exited:
                return None
            time.sleep(POLL_SECONDS)

    def _exited(self) -> bool:
        assert self._proc is not None
        return self._proc.poll() is not None

    def _finished(self, taken: set[str]) -> bool:
        """Whether the archive being read is complete: the tool moved on to another file, or ended."""
        return self._exited() or bool(self._tars(taken)) or (self.folder / f"{MANIFEST}.tmp").exists()

    def _follow(self, name: str, taken: set[str]) -> Iterator[bytes]:
        offset = 0
        # Read-write: fallocate frees bytes only through a descriptor open for writing.
        with open(self.folder / name, "r+b") as f:
            while True:
                finished = self._finished(taken)  # checked before the read that may find the end
                chunk = f.read(READ_SIZE)
                if chunk:
                    self._punch(f.fileno(), offset, len(chunk))
                    offset += len(chunk)
                    self._read = offset
                    yield chunk
                elif finished:
                    return
                else:
                    time.sleep(POLL_SECONDS)

    def _pace(self, taken: set[str]) -> None:
        """Every poll while the writer runs: pause it while more than `max_pending` bytes of its tars
        wait unread, resume it once half of that is read. Independent of how fast chunks are taken."""
        assert self._proc is not None
        while self._proc.poll() is None:
            try:
                written = sum(p.stat().st_size for p in self.folder.glob("*.tar"))
            except FileNotFoundError:  # a tar deleted between listing and stat: count again
                continue
            pending = written - self._read
            if not self._stopped and pending > self.max_pending:
                os.kill(self._proc.pid, signal.SIGSTOP)
                self._stopped, self.paused = True, self.paused + 1
            elif self._stopped and pending <= self.max_pending // 2:
                os.kill(self._proc.pid, signal.SIGCONT)
                self._stopped = False
            time.sleep(POLL_SECONDS)

    def _read_stderr(self, stderr: IO[bytes]) -> None:
        for raw in stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            self.on_line(line)


def _hole_puncher() -> Callable[[int, int, int], None]:
    """fallocate(PUNCH_HOLE) where the file system has it; otherwise the spool keeps each whole tar."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    supported = [True]

    def punch(fd: int, offset: int, length: int) -> None:
        if supported[0] and fallocate(fd, _PUNCH_HOLE, offset, length) != 0:
            supported[0] = False
            err = ctypes.get_errno()
            log.warning(
                "cannot free spooled backup data as it uploads (%s); each tar stays on disk until uploaded",
                os.strerror(err),
            )

    return punch
