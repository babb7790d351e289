"""The evidence behind the live RPO: how far the server has flushed WAL, and how far the receiver holds it.

The receiver (`pg_receivewal --synchronous`) fsyncs what it received and only then reports it, and the
server records that report as its replication slot's `restart_lsn`. So once the slot's position has
passed the server's flush position read a moment earlier, everything the server had flushed by then is
on the spool's disk, and the upload round that follows puts it in the bucket. pg_replication_slots is
readable by any role, so this needs no privilege beyond what streaming already has.
"""

from __future__ import annotations

import pyodbc

from workers.engines.base import EngineError
from workers.engines.postgresql.conninfo import odbc_connection_string
from workers.engines.postgresql.walnames import parse_lsn, parse_size


class WalPositions:
    """One SQL session to a target, reopened after any error, reading WAL positions."""

    def __init__(self, target: str, conninfo: str, slot: str) -> None:
        self.target = target
        self.slot = slot
        self._connection_string = odbc_connection_string(conninfo)
        self._session: pyodbc.Connection | None = None

    def server_flushed(self) -> int:
        """The server's WAL flush position now: what a receiver can get, and must hold."""
        return parse_lsn(self._one("SELECT pg_current_wal_flush_lsn()::text"))

    def receiver_holds(self) -> int | None:
        """Up to where the receiver has fsynced WAL, as its slot records; None without a slot."""
        value = self._one("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = ?", self.slot)
        return parse_lsn(value) if value else None

    def segment_size(self) -> int:
        return parse_size(self._one("SHOW wal_segment_size") or "")

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _one(self, sql: str, *params: str) -> str | None:
        try:
            if self._session is None:
                self._session = pyodbc.connect(self._connection_string, autocommit=True, timeout=10)
                # A hung server must not stall the stream (psqlODBC has no statement timeout of its own).
                self._session.execute("SET statement_timeout = '10s'")
            row = self._session.execute(sql, *params).fetchone()
        except pyodbc.Error as e:
            self.close()
            raise EngineError(f"target {self.target}: cannot read WAL positions ({e.args[-1]})") from None
        return None if row is None else row[0]
