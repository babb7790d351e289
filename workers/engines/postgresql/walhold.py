"""A temporary replication slot that keeps the server from removing WAL while a full backup copies.

`pg_basebackup -X fetch` collects the backup's WAL at the very end, from the server's `pg_wal`. On a busy
server, checkpoints remove the start segment long before a large copy ends, and the backup fails after
hours of work. A physical slot reserved before the backup starts pins WAL from its restart point on.

The slot is temporary and belongs to one session held open for the backup's duration: if the worker dies,
the session ends and PostgreSQL drops the slot, so none is left behind to fill the server's disk. Each
attempt names its own slot, so two fulls of one target hold WAL independently.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyodbc

from workers.engines.base import EngineError
from workers.engines.postgresql.conninfo import odbc_connection_string

SLOT_PREFIX = "deskvault_full_"


@contextmanager
def wal_held(target: str, conninfo: str) -> Iterator[str]:
    """Pin the server's WAL from now until the block ends; yields the slot's name."""
    slot = f"{SLOT_PREFIX}{uuid.uuid4().hex[:16]}"
    try:
        session = pyodbc.connect(odbc_connection_string(conninfo), autocommit=True, timeout=30)
    except pyodbc.Error as e:
        raise EngineError(f"target {target}: cannot open a session to hold WAL ({e.args[-1]})") from None
    try:
        try:
            # immediately_reserve: the slot holds WAL from this moment, not from its first client.
            session.execute("SELECT pg_create_physical_replication_slot(?, true, true)", slot).fetchall()
        except pyodbc.Error as e:
            raise EngineError(
                f"target {target}: cannot create a temporary replication slot to hold the backup's WAL "
                f"({e.args[-1]}); the role needs REPLICATION and the server a free slot "
                "(max_replication_slots)"
            ) from None
        yield slot
    finally:
        session.close()  # ends the session, and PostgreSQL drops the temporary slot with it
