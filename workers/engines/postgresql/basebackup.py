"""PostgreSQL physical backups: pg_basebackup's tar stream straight into the repository, and back.

The base backup is read from pg_basebackup's stdout (`-D - -F tar -X fetch`): one tar holding the data
directory, the WAL needed to make it consistent, the backup label and PostgreSQL's own backup manifest.
A temporary replication slot (`walhold`) keeps that WAL on the server until the copy ends.
It flows through zstd and AES-256-GCM into a multipart upload as it is produced, so neither disk nor
memory ever holds the whole backup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workers.engines.base import BackupResult, EngineError
from workers.engines.postgresql.cluster import hand_over
from workers.engines.postgresql.server import PgServer
from workers.engines.postgresql.tarwatch import TarMemberWatcher
from workers.engines.postgresql.untar import unpack_tar
from workers.engines.postgresql.walhold import wal_held
from workers.engines.procstream import ProcessStream
from workers.repository import catalog
from workers.repository.errors import ObjectNotFound
from workers.repository.objects import ObjectRepository, StoredObject
from workers.repository.streams import counted

log = logging.getLogger(__name__)

START_RE = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
END_RE = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")


def full_backup(
    server: PgServer,
    repo: ObjectRepository,
    *,
    backup_id: str,
    job_key: str,
    event_id: str,
    on_progress: Callable[[int], None] | None = None,
) -> BackupResult:
    """Stream pg_basebackup's tar into the repository and commit the full's manifest."""
    manifest_key = catalog.manifest_key(server.target.name, backup_id)
    if repo.exists(manifest_key):
        # An earlier attempt committed this backup and died before the ledger heard of it.
        return BackupResult(repo.get_json(manifest_key), created=False)

    server_version = int(server.query("SHOW server_version_num"))
    segment_size = server.wal_segment_size()
    started_at = datetime.now(UTC)
    if aborted := repo.abort_uploads(catalog.backup_prefix(server.target.name, backup_id)):
        log.info("backup %s: aborted %d upload(s) left by an earlier attempt", backup_id, aborted)
    # PostgreSQL's own backup_manifest lists every file with its size and time: the differential
    # layer compares the data directory against it.
    watcher = TarMemberWatcher("backup_manifest")
    prefix = catalog.attempt_prefix(server.target.name, backup_id)
    with wal_held(server.target.name, server.target.conninfo):
        stream = _BaseBackupStream(basebackup_command(server, backup_id), server.env)
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
        "target": server.target.name,
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


def basebackup_command(server: PgServer, backup_id: str) -> list[str]:
    """pg_basebackup's command line: the conninfo without its password, which travels in the environment."""
    return [
        str(server.bin / "pg_basebackup"),
        "--dbname",
        server.conninfo,
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
        *([f"--max-rate={server.target.full_max_rate_mib}M"] if server.target.full_max_rate_mib else []),
    ]


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
    """Write the manifest, the backup's commit point, unless another attempt already committed it.

    Only with every object it lists in the bucket at the size this attempt stored: a manifest never
    commits objects that were aborted or replaced under it.
    """
    for entry in manifest["objects"]:
        try:
            stored: int | None = repo.store.size(entry["key"])
        except ObjectNotFound:
            stored = None
        if stored != entry["stored_size"]:
            raise EngineError(
                f"backup {manifest['backup_id']}: object {entry['key']} holds {stored} bytes, not the "
                f"{entry['stored_size']} this attempt stored; not committing, a retry takes a new copy"
            )
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
