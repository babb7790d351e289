"""PostgreSQL's log backup: prove the WAL archive current and whole, and commit a log manifest.

The WAL itself is archived continuously by `deskvault wal-stream`; the hourly log backup closes the
current segment, waits until that segment is in the bucket, checks that no segment is missing since the
newest full backup, and writes a log manifest with the LSN and time range the archive now covers.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from workers.engines.base import LogBackupResult, LogGap
from workers.engines.postgresql.commitindex import index_key
from workers.engines.postgresql.server import PgServer
from workers.engines.postgresql.walarchive import WalArchive, list_wal, read_histories, wal_key
from workers.engines.postgresql.walnames import Segment, parse_lsn
from workers.errors import HandlerError
from workers.repository import catalog
from workers.repository.objects import ObjectRepository

# How long the switched segment may take to reach the bucket (the streamer uploads every few seconds).
ARCHIVE_WAIT_SECONDS = 120.0


def log_backup(
    server: PgServer,
    repo: ObjectRepository,
    *,
    backup_id: str,
    fulls: list[dict[str, Any]],
    job_key: str,
    event_id: str,
) -> LogBackupResult:
    """Commit the log manifest of `backup_id`; LogGap if the newest chain misses a segment."""
    target = server.target.name
    closed, switch_lsn = server.switch_wal()
    _wait_archived(repo, target, closed)

    oldest, newest = fulls[0], fulls[-1]
    segment_size = oldest.get("wal_segment_size") or server.wal_segment_size()
    start = Segment.of(oldest["timeline"], parse_lsn(oldest["start_lsn"]), segment_size)
    newest_start = Segment.of(newest["timeline"], parse_lsn(newest["start_lsn"]), segment_size)
    end = Segment.parse(closed, segment_size)
    entries = list_wal(repo, target, segment_size)
    archive = WalArchive(target, entries, segment_size, read_histories(repo, entries))
    gap = archive.first_gap(newest_start.timeline, newest_start.segno, end.segno)
    if gap is not None:
        missing = archive.name(archive.timeline_at(newest_start.timeline, gap), gap)
        raise LogGap(
            f"WAL archive of {target} has a gap: segment {missing} is missing after the newest full "
            f"{newest['backup_id']}",
            missing,
        )
    older_gap = (
        archive.first_gap(start.timeline, start.segno, newest_start.segno) if start < newest_start else None
    )
    uploaded = {e.filename: e.uploaded_at for e in entries}
    manifest = {
        "format": catalog.MANIFEST_FORMAT,
        "target": target,
        "engine": "postgresql",
        "kind": "log",
        "backup_id": backup_id,
        "parent": oldest["backup_id"],
        "timeline": end.timeline,
        "wal_segment_size": segment_size,
        "from_segment": start.name(segment_size),
        "to_segment": closed,
        "segments": end.segno - start.segno + 1,
        "start_lsn": oldest["start_lsn"],
        "stop_lsn": switch_lsn,
        "covers_from": oldest["finished_at"],
        "covers_until": catalog.iso(uploaded[closed]),
        "older_chain_gap": (
            archive.name(archive.timeline_at(start.timeline, older_gap), older_gap)
            if older_gap is not None
            else None
        ),
        "started_at": catalog.iso(datetime.now(UTC)),
        "finished_at": catalog.iso(datetime.now(UTC)),
        "plain_size": 0,
        "stored_size": 0,
        "job_key": job_key,
        "event_id": event_id,
    }
    manifest, _ = repo.commit_json(catalog.manifest_key(target, backup_id), manifest)
    warning = ""
    if manifest.get("older_chain_gap"):
        warning = (
            f"; WARNING: segment {manifest['older_chain_gap']} is missing before full "
            f"{newest['backup_id']}, so moments between that gap and it cannot be restored"
        )
    return LogBackupResult(
        manifest,
        f"WAL {manifest['from_segment']}..{manifest['to_segment']} archived, without gaps since full "
        f"{newest['backup_id']}, up to LSN {manifest['stop_lsn']}{warning}",
    )


def _wait_archived(repo: ObjectRepository, target: str, segment: str) -> None:
    """Until the segment and its commit index (written after it) are in the bucket."""
    deadline = time.monotonic() + ARCHIVE_WAIT_SECONDS
    while not (repo.exists(wal_key(target, segment)) and repo.exists(index_key(target, segment))):
        if time.monotonic() > deadline:
            raise HandlerError(
                f"WAL segment {segment} of {target} did not reach the archive within "
                f"{ARCHIVE_WAIT_SECONDS:.0f}s; check that `deskvault wal-stream` is running for it"
            )
        time.sleep(1.0)
