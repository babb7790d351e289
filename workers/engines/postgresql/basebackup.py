"""PostgreSQL physical backups: pg_basebackup's tar stream straight into the repository, and back.

The base backup is read from pg_basebackup's stdout (`-D - -F tar -X fetch`): one tar holding the data
directory, the WAL needed to make it consistent, the backup label and PostgreSQL's own backup manifest.
It flows through zstd and AES-256-GCM into a multipart upload as it is produced, so neither disk nor
memory ever holds the whole backup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deskvault_core.config import TargetSettings
from deskvault_core.errors import DeskvaultError
from workers.engines.postgresql.cluster import hand_over
from workers.engines.postgresql.conninfo import libpq_env, split_password, with_dbname
from workers.engines.postgresql.tarwatch import TarMemberWatcher
from workers.engines.postgresql.untar import unpack_tar
from workers.engines.postgresql.walnames import parse_size
from workers.engines.procstream import ProcessStream
from workers.repository import catalog
from workers.repository.objects import ObjectRepository, StoredObject
from workers.repository.streams import counted

log = logging.getLogger(__name__)

START_RE = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
END_RE = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")


class EngineError(DeskvaultError):
    """The database engine could not back up or restore a target."""


@dataclass(frozen=True)
class BackupResult:
    manifest: dict[str, Any]
    created: bool  # False when a previous attempt had already committed this backup


class PostgresEngine:
    """Full physical backups and restores of one PostgreSQL cluster (a deskvault target)."""

    def __init__(self, target: TargetSettings) -> None:
        self.target = target
        self.bin = Path(target.pg_bin)
        self.conninfo, password = split_password(target.conninfo)
        self.env = libpq_env(password)

    def full_backup(
        self,
        repo: ObjectRepository,
        *,
        backup_id: str,
        job_key: str,
        event_id: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> BackupResult:
        manifest_key = catalog.manifest_key(self.target.name, backup_id)
        if repo.exists(manifest_key):
            # An earlier attempt committed this backup and died before the ledger heard of it.
            return BackupResult(repo.get_json(manifest_key), created=False)

        server_version = int(self.query("SHOW server_version_num"))
        segment_size = self.wal_segment_size()
        started_at = datetime.now(UTC)
        prefix = catalog.backup_prefix(self.target.name, backup_id)
        if aborted := repo.abort_uploads(prefix):
            log.info("backup %s: aborted %d upload(s) left by an earlier attempt", backup_id, aborted)
        stream = _BaseBackupStream(self._basebackup_command(backup_id), self.env)
        # PostgreSQL's own backup_manifest lists every file with its size and time: the differential
        # layer compares the data directory against it.
        watcher = TarMemberWatcher("backup_manifest")
        stored = repo.put_stream(
            prefix + "base.tar.dv", watcher.tee(stream.chunks()), on_progress=on_progress
        )
        file_list_key = None
        if watcher.captured is not None:
            file_list_key = prefix + "files.dv"
            repo.put_json(file_list_key, json.loads(watcher.captured))
        finished_at = datetime.now(UTC)

        manifest = {
            "format": catalog.MANIFEST_FORMAT,
            "target": self.target.name,
            "engine": "postgresql",
            "kind": "full",
            "backup_id": backup_id,
            "parent": None,
            "server_version_num": server_version,
            "wal_segment_size": segment_size,
            "timeline": stream.timeline,
            "start_lsn": stream.start_lsn,
            "stop_lsn": stream.stop_lsn,
            "started_at": catalog.iso(started_at),
            "finished_at": catalog.iso(finished_at),
            "job_key": job_key,
            "event_id": event_id,
            "file_list": file_list_key,
            "objects": [object_entry("base.tar", stored)],
            "plain_size": stored.plain_size,
            "stored_size": stored.stored_size,
        }
        return commit(repo, manifest_key, manifest)

    def _basebackup_command(self, backup_id: str) -> list[str]:
        return [
            str(self.bin / "pg_basebackup"),
            "--dbname",
            self.conninfo,
            "--pgdata",
            "-",
            "--format",
            "tar",
            "--wal-method",
            "fetch",
            "--checkpoint",
            "fast",
            "--label",
            f"deskvault {backup_id}",
            "--no-password",
            "--verbose",
        ]

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


def object_entry(name: str, stored: StoredObject) -> dict[str, Any]:
    """How a manifest lists one of its data objects."""
    return {
        "name": name,
        "key": stored.key,
        "plain_size": stored.plain_size,
        "stored_size": stored.stored_size,
        "sha256": stored.sha256,
        "key_id": stored.key_id,
    }


def commit(repo: ObjectRepository, manifest_key: str, manifest: dict[str, Any]) -> BackupResult:
    """Write the manifest, the backup's commit point, unless another attempt already committed it."""
    committed, created = repo.commit_json(manifest_key, manifest)
    return BackupResult(committed, created=created)


class _BaseBackupStream:
    """pg_basebackup's stdout as chunks; raises (aborting the upload) if pg_basebackup fails."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.start_lsn: str | None = None
        self.stop_lsn: str | None = None
        self.timeline: int | None = None
        self._process = ProcessStream(command, env, on_line=self._read_line)

    def chunks(self) -> Iterator[bytes]:
        yield from self._process.chunks()
        if self._process.returncode != 0 or self.stop_lsn is None:
            code = self._process.returncode
            raise EngineError(f"pg_basebackup failed (exit {code}): {self._process.said()}")

    def _read_line(self, line: str) -> None:
        if m := START_RE.search(line):
            self.start_lsn, self.timeline = m.group(1), int(m.group(2))
        elif m := END_RE.search(line):
            self.stop_lsn = m.group(1)


def restore_full(
    repo: ObjectRepository,
    manifest: dict[str, Any],
    into: Path,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Download, verify, decrypt and unpack a full backup into an empty folder PostgreSQL can start from."""
    if into.exists() and any(into.iterdir()):
        raise EngineError(f"{into} is not empty; restore into a new or empty folder")
    into.mkdir(parents=True, exist_ok=True)
    os.chmod(into, 0o700)
    (entry,) = manifest["objects"]
    total = entry["plain_size"]
    try:
        plain = repo.get_stream(entry["key"], expect_sha256=entry["sha256"], expect_size=total)
        if on_progress is not None:
            plain = counted(plain, lambda done: on_progress(done, total))
        unpack_tar(plain, into)
    except BaseException:
        # Never leave a half-restored folder that someone might start.
        shutil.rmtree(into, ignore_errors=True)
        raise
    hand_over(into)
