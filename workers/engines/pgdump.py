"""A tenant's database as PostgreSQL's custom-format dump (`pg_dump -Fc`), streamed as it is written.

The custom format is what the self-hosted product's importer and any `pg_restore` read; pg_dump
compresses it itself, so the repository's zstd adds little on top.
"""

from __future__ import annotations

import collections
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from workers.engines.conninfo import libpq_env, split_password, with_dbname
from workers.engines.postgresql import EngineError

READ_SIZE = 1024 * 1024


def dump_stream(pg_bin: Path, conninfo: str, database: str) -> Iterator[bytes]:
    """The custom-format dump of `database`; EngineError (after the last chunk) if pg_dump fails."""
    plain, password = split_password(conninfo)
    command = [
        str(pg_bin / "pg_dump"),
        "--format=custom",
        "--no-password",
        f"--dbname={with_dbname(plain, database)}",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=libpq_env(password))
    assert proc.stdout is not None and proc.stderr is not None
    tail: collections.deque[str] = collections.deque(maxlen=20)
    reader = threading.Thread(target=_collect, args=(proc.stderr, tail), daemon=True)
    reader.start()
    try:
        while chunk := proc.stdout.read(READ_SIZE):
            yield chunk
        returncode = proc.wait()
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if returncode != 0:
        raise EngineError(
            f"pg_dump of database {database} failed (exit {returncode}): {' | '.join(tail)[-1000:]}"
        )


def _collect(stream: IO[bytes], tail: collections.deque[str]) -> None:
    for raw in stream:
        tail.append(raw.decode("utf-8", "replace").rstrip())
