"""Full backups read straight from the data directory under the backup API, stored as parts.

Where the worker runs on the database host (`targets.<name>.data_directory`, as differentials need),
a full needs neither pg_basebackup nor the walsender: `pg_backup_start` checkpoints, the files are
read, compressed, encrypted and uploaded in parallel parts (see `parts`), `pg_backup_stop` returns the
backup label, and the WAL from the checkpoint to the stop is copied from `pg_wal` into a part of its
own, so the full restores to a consistent state without the WAL archive. A temporary replication slot
(`walhold`) keeps that WAL on the server from before the checkpoint until it is copied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyodbc

from deskvault_core.config import TargetSettings
from workers.engines.base import BackupResult, EngineError
from workers.engines.postgresql import datafiles, parts
from workers.engines.postgresql.basebackup import TABLESPACES, commit
from workers.engines.postgresql.conninfo import odbc_connection_string
from workers.engines.postgresql.datafiles import DataFile
from workers.engines.postgresql.walhold import wal_held
from workers.engines.postgresql.walnames import Segment, parse_lsn, parse_size
from workers.errors import PermanentError
from workers.repository import catalog
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

WAL_PART = "wal"
# Each database's folder: a restore of one tenant lays out only its database's parts (see `subset`).
DATABASES = "SELECT oid, datname, dattablespace FROM pg_database ORDER BY oid"


@dataclass
class BackupSession:
    """A running backup of the server (between pg_backup_start and pg_backup_stop), in its own session."""

    cursor: Any
    start_lsn: str
    timeline: int
    spaces: list[dict[str, Any]]
    databases: list[dict[str, Any]]
    stop_lsn: str = ""
    backup_label: str = ""
    tablespace_map: str = ""

    def stop(self) -> None:
        """End the backup: its stop LSN, backup label and tablespace map are kept here."""
        stop_lsn, label, spcmap = self.cursor.execute(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
        ).fetchone()
        self.stop_lsn, self.backup_label, self.tablespace_map = stop_lsn, label, spcmap or ""

    def manifest(
        self,
        target: str,
        kind: str,
        backup_id: str,
        started_at: datetime,
        objects: list[dict[str, Any]],
        **fields: Any,
    ) -> dict[str, Any]:
        """The manifest of a parts backup this session took (`fields`: what its kind adds)."""
        return {
            "format": catalog.MANIFEST_FORMAT,
            "layout": parts.LAYOUT,
            "target": target,
            "engine": "postgresql",
            "kind": kind,
            "backup_id": backup_id,
            **fields,
            "timeline": self.timeline,
            "start_lsn": self.start_lsn,
            "stop_lsn": self.stop_lsn,
            "started_at": catalog.iso(started_at),
            "finished_at": catalog.iso(datetime.now(UTC)),
            "backup_label": self.backup_label,
            "tablespace_map": self.tablespace_map,
            "tablespaces": self.spaces,
            "databases": self.databases,
            "objects": objects,
            "plain_size": sum(o["plain_size"] for o in objects),
            "stored_size": sum(o["stored_size"] for o in objects),
        }


@contextlib.contextmanager
def backup_session(target: TargetSettings, backup_id: str) -> Iterator[BackupSession]:
    """pg_backup_start (with a fast checkpoint) in a session of its own; the folder checked to be the
    server's. Closing the session ends a backup that failed midway."""
    datadir = Path(target.data_directory)
    try:
        session = pyodbc.connect(odbc_connection_string(target.conninfo), autocommit=True, timeout=30)
    except pyodbc.Error as e:
        raise EngineError(f"target {target.name}: cannot open a backup session ({e.args[-1]})") from None
    try:
        cur = session.cursor()
        try:
            label = f"deskvault {backup_id}"
            start_lsn = cur.execute("SELECT pg_backup_start(?, true)::text", label).fetchone()[0]
        except pyodbc.Error as e:
            raise EngineError(f"target {target.name}: pg_backup_start failed ({e.args[-1]})") from None
        timeline = int(cur.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0])
        check_directory_is_the_servers(target, datadir, start_lsn, timeline)
        spaces = [
            {"oid": int(oid), "name": name, "location": location}
            for oid, name, location in cur.execute(TABLESPACES).fetchall()
        ]
        databases = [
            {"oid": int(oid), "name": name, "tablespace": int(space)}
            for oid, name, space in cur.execute(DATABASES).fetchall()
        ]
        yield BackupSession(cur, start_lsn, timeline, spaces, databases)
    finally:
        session.close()


def check_directory_is_the_servers(
    target: TargetSettings, datadir: Path, start_lsn: str, timeline: int
) -> None:
    """Refuse to copy files from a data directory the server does not run on (a copy that was promoted
    elsewhere, the old primary's folder after a switch): the backup would restore as corrupt.

    pg_backup_start has just checkpointed, so the server's own pg_control records that checkpoint.
    """
    proc = subprocess.run(
        [str(Path(target.pg_bin) / "pg_controldata"), "-D", str(datadir)],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        timeout=60,
    )
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    redo = fields.get("Latest checkpoint's REDO location", "").strip()
    on = fields.get("Latest checkpoint's TimeLineID", "").strip()
    if proc.returncode != 0 or not redo or parse_lsn(redo) < parse_lsn(start_lsn) or on != str(timeline):
        raise PermanentError(
            f"targets.{target.name}.data_directory ({datadir}) is not the data directory of the server at "
            f"targets.{target.name}.conninfo: the server checkpointed at {start_lsn} on timeline {timeline}, "
            f"the folder's last checkpoint is {redo or '?'} on timeline {on or '?'} "
            f"({proc.stderr.strip()[:200] or 'pg_controldata'}); point data_directory at the server's folder"
        )


def full_from_files(
    target: TargetSettings,
    repo: ObjectRepository,
    *,
    backup_id: str,
    job_key: str,
    event_id: str,
    parallel: int,
    on_progress: Callable[[int], None] | None = None,
) -> BackupResult:
    """A full backup of the target's data directory as parts, `parallel` of them at once."""
    manifest_key = catalog.manifest_key(target.name, backup_id)
    if repo.exists(manifest_key):
        # An earlier attempt committed this backup and died before the ledger heard of it.
        return BackupResult(repo.get_json(manifest_key), created=False)
    datadir = Path(target.data_directory)
    prefix = catalog.attempt_prefix(target.name, backup_id)
    if aborted := repo.abort_uploads(catalog.backup_prefix(target.name, backup_id)):
        log.info("backup %s: aborted %d upload(s) left by an earlier attempt", backup_id, aborted)
    started_at = datetime.now(UTC)
    with wal_held(target.name, target.conninfo):
        with backup_session(target, backup_id) as session:
            version, segment_text = session.cursor.execute(
                "SELECT current_setting('server_version_num'), current_setting('wal_segment_size')"
            ).fetchone()
            segment_size = parse_size(segment_text)
            files, folders = datafiles.walk(datadir)
            planned = parts.plan(files, folders)
            log.info(
                "full %s/%s: %d files, %.0f MiB in %d parts, %d at once",
                target.name,
                backup_id,
                len(files),
                sum(f.size for f in files) / 2**20,
                len(planned),
                parallel,
            )
            objects = parts.store_all(
                repo,
                datadir,
                planned,
                prefix,
                parallel=parallel,
                max_rate=target.full_max_rate_mib * 2**20,
                on_progress=on_progress,
            )
            session.stop()
        # Still under the slot: the WAL from the checkpoint to the stop cannot have been recycled.
        wal = _wal_part(datadir, session.timeline, session.start_lsn, session.stop_lsn, segment_size)
        objects += parts.store_all(repo, datadir, [wal], prefix, parallel=1)
    part_of = {f.path: p.name for p in planned for f in ([p.slice_of] if p.slice_of else p.files)}
    file_list_key = prefix + "files.dv"
    repo.put_stream(file_list_key, datafiles.file_list_lines(files, part_of))
    manifest = session.manifest(
        target.name,
        "full",
        backup_id,
        started_at,
        objects,
        parent=None,
        server_version_num=int(version),
        wal_segment_size=segment_size,
        job_key=job_key,
        event_id=event_id,
        file_list=file_list_key,
        file_list_format=datafiles.FILE_LIST_FORMAT,
        files=len(files),
    )
    return commit(repo, manifest_key, manifest)


def _wal_part(datadir: Path, timeline: int, start_lsn: str, stop_lsn: str, segment_size: int) -> parts.Part:
    """The segments from the checkpoint's to the stop's, as `pg_wal/<name>` files of a part of its own."""
    first = Segment.of(timeline, parse_lsn(start_lsn), segment_size)
    last = Segment.of(timeline, parse_lsn(stop_lsn) - 1, segment_size)
    segments = []
    for segno in range(first.segno, last.segno + 1):
        name = Segment(timeline, segno).name(segment_size)
        path = datadir / "pg_wal" / name
        if not path.is_file():
            raise EngineError(
                f"WAL segment {name}, needed to make the backup consistent, is not in {path.parent} "
                "although a replication slot held it; not committing, a retry takes a new copy"
            )
        segments.append(DataFile(f"pg_wal/{name}", segment_size, path.stat().st_mtime))
    return parts.Part(WAL_PART, "pg_wal", files=segments)
