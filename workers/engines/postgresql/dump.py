"""A tenant's database as PostgreSQL's custom-format dump (`pg_dump -Fc`), streamed as it is written.

The custom format is what the self-hosted product's importer and any `pg_restore` read; pg_dump
compresses it itself, so the repository's zstd adds little on top.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from workers.engines.base import EngineError
from workers.engines.postgresql.conninfo import libpq_env, split_password, with_dbname
from workers.engines.procstream import ProcessStream


def dump_stream(pg_bin: Path, conninfo: str, database: str, *, compress: bool = True) -> Iterator[bytes]:
    """The custom-format dump of `database`; EngineError (after the last chunk) if pg_dump fails.
    Without `compress`, for a dump read at once by pg_restore on the same host: compressing it would
    only cost CPU the restore needs."""
    plain, password = split_password(conninfo)
    command = [
        str(pg_bin / "pg_dump"),
        "--format=custom",
        *([] if compress else ["--compress=0"]),
        "--no-password",
        f"--dbname={with_dbname(plain, database)}",
    ]
    process = ProcessStream(command, libpq_env(password))
    yield from process.chunks()
    if process.returncode != 0:
        raise EngineError(
            f"pg_dump of database {database} failed (exit {process.returncode}): {process.said(1000)}"
        )
