"""A target's running PostgreSQL server, reached through psql with the target's conninfo."""

from __future__ import annotations

import subprocess
from pathlib import Path

from deskvault_core.config import TargetSettings
from workers.engines.base import EngineError
from workers.engines.postgresql.conninfo import libpq_env, split_password, with_dbname
from workers.engines.postgresql.walnames import parse_size


class PgServer:
    """The server of one target: its client programs, conninfo (without the password) and environment."""

    def __init__(self, target: TargetSettings) -> None:
        self.target = target
        self.bin = Path(target.pg_bin)
        self.conninfo, password = split_password(target.conninfo)
        self.env = libpq_env(password)

    def query(self, sql: str, *, dbname: str | None = None) -> str:
        """One SQL statement through psql on the target (or on its database `dbname`); unaligned output."""
        conninfo = with_dbname(self.conninfo, dbname) if dbname else self.conninfo
        proc = subprocess.run(
            [str(self.bin / "psql"), "-X", "-At", "--no-password", "-d", conninfo, "-c", sql],
            capture_output=True,
            env=self.env,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise EngineError(
                f"target {self.target.name}: {sql!r} failed ({proc.stderr.strip()[:300]}); check "
                f"targets.{self.target.name}.conninfo, the role's rights and that the server is running"
            )
        return proc.stdout.strip()

    def drop_database(self, name: str) -> bool:
        """Drop database `name` (disconnecting its sessions); False if it did not exist."""
        identifier = '"' + name.replace('"', '""') + '"'
        literal = "'" + name.replace("'", "''") + "'"
        # Run from the maintenance database: a session cannot drop the database it is connected to.
        exists = self.query(f"SELECT count(*) FROM pg_database WHERE datname = {literal}", dbname="postgres")
        self.query(f"DROP DATABASE IF EXISTS {identifier} WITH (FORCE)", dbname="postgres")
        return exists == "1"

    def wal_segment_size(self) -> int:
        return parse_size(self.query("SHOW wal_segment_size"))

    def switch_wal(self) -> tuple[str, str]:
        """Close the current WAL segment; returns (the segment it closed, the switch LSN)."""
        name, lsn = self.query("SELECT pg_walfile_name(l), l FROM pg_switch_wal() AS l").split("|")
        return name, lsn

    def create_restore_point(self, name: str) -> str:
        """A named restore point now; returns its LSN. The transaction around it takes an ID, so its
        commit flushes the point's record to the WAL stream at once (the function alone does not)."""
        literal = "'" + name.replace("'", "''") + "'"
        lsn, _ = self.query(f"SELECT pg_create_restore_point({literal}), txid_current()").split("|")
        return lsn
