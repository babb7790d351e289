"""A PostgreSQL tool's stdout as a stream of chunks, its stderr kept for the error message."""

from __future__ import annotations

import collections
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import IO

READ_SIZE = 1024 * 1024


class ProcessStream:
    """Runs `command`; `chunks()` yields its stdout, then `returncode` and `tail` (stderr) are set.

    `on_line` sees every stderr line as it arrives (pg_basebackup reports its LSNs there). A consumer
    that stops early kills the process.
    """

    def __init__(
        self, command: list[str], env: dict[str, str], on_line: Callable[[str], None] | None = None
    ) -> None:
        self.command = command
        self.env = env
        self.on_line = on_line
        self.returncode: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)

    def chunks(self) -> Iterator[bytes]:
        proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        assert proc.stdout is not None and proc.stderr is not None
        reader = threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True)
        reader.start()
        try:
            while chunk := proc.stdout.read(READ_SIZE):
                yield chunk
            self.returncode = proc.wait()
            reader.join(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def said(self, limit: int = 1500) -> str:
        """The end of what the tool wrote to stderr, for an error message."""
        return " | ".join(self.tail)[-limit:]

    def _read_stderr(self, stderr: IO[bytes]) -> None:
        for raw in stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            if self.on_line is not None:
                self.on_line(line)
