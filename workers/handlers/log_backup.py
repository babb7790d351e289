"""backup-due(kind=log): prove the WAL archive is current and whole, and record it as a log backup.

The WAL itself is archived continuously by `deskvault wal-stream`; this hourly job closes the current
segment, waits until that segment is in the bucket, checks that no segment is missing since the oldest
full backup, and writes a log manifest with the LSN and time range the archive now covers.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from messages.events import BackupDue
from producers.publisher import Publisher
from workers.backups import usage
from workers.context import WorkerContext
from workers.engines.postgresql.basebackup import PostgresEngine
from workers.engines.postgresql.walarchive import first_gap, list_wal, wal_key
from workers.engines.postgresql.walnames import Segment, parse_lsn
from workers.errors import HandlerError
from workers.repository import catalog

# How long the switched segment may take to reach the bucket (the streamer uploads every few seconds).
ARCHIVE_WAIT_SECONDS = 120.0


def take_log_backup(ctx: WorkerContext, event: BackupDue) -> str:
    target = ctx.settings.target(event.target)
    fulls = [m for m in catalog.list_manifests(ctx.repository, target.name) if m["kind"] == "full"]
    if not fulls:
        return "not done: no full backup yet, so there is no chain for the WAL to extend"
    engine = PostgresEngine(target)
    closed, switch_lsn = engine.switch_wal()
    _wait_archived(ctx, target.name, closed)

    oldest, newest = fulls[0], fulls[-1]
    segment_size = oldest.get("wal_segment_size") or engine.wal_segment_size()
    start = Segment.of(oldest["timeline"], parse_lsn(oldest["start_lsn"]), segment_size)
    newest_start = Segment.of(newest["timeline"], parse_lsn(newest["start_lsn"]), segment_size)
    end = Segment.parse(closed, segment_size)
    entries = list_wal(ctx.repository, target.name, segment_size)
    gap = first_gap(entries, newest_start, end)
    if gap is not None:
        # The current chain is broken: only a new full can start a whole one. Ask for it now.
        _request_full(ctx, target.name, gap.name(segment_size))
        raise HandlerError(
            f"WAL archive of {target.name} has a gap: segment {gap.name(segment_size)} is missing after the "
            f"newest full {newest['backup_id']}; a full backup was requested to start a new chain -- check "
            "that `deskvault wal-stream` runs"
        )
    older_gap = first_gap(entries, start, newest_start) if start < newest_start else None
    uploaded = {e.filename: e.uploaded_at for e in entries}
    backup_id = catalog.backup_id_for("log", event.slot)
    manifest = {
        "format": catalog.MANIFEST_FORMAT,
        "target": target.name,
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
        "older_chain_gap": older_gap.name(segment_size) if older_gap else None,
        "started_at": catalog.iso(datetime.now(UTC)),
        "finished_at": catalog.iso(datetime.now(UTC)),
        "plain_size": 0,
        "stored_size": 0,
        "job_key": event.idempotency_key,
        "event_id": event.event_id,
    }
    manifest, _ = ctx.repository.commit_json(catalog.manifest_key(target.name, backup_id), manifest)
    ctx.ledger.record_backup(
        target=target.name,
        backup_id=backup_id,
        kind="log",
        manifest_key=catalog.manifest_key(target.name, backup_id),
        started_at=datetime.fromisoformat(manifest["started_at"]),
        finished_at=datetime.fromisoformat(manifest["finished_at"]),
        start_lsn=manifest["start_lsn"],
        stop_lsn=manifest["stop_lsn"],
        plain_bytes=0,
        stored_bytes=0,
    )
    usage.record(ctx.ledger, ctx.repository, target.name)
    warning = ""
    if manifest.get("older_chain_gap"):
        warning = (
            f"; WARNING: segment {manifest['older_chain_gap']} is missing before full "
            f"{newest['backup_id']}, so moments between that gap and it cannot be restored"
        )
    return (
        f"log backup {backup_id}: WAL {manifest['from_segment']}..{manifest['to_segment']} archived, without "
        f"gaps since full {newest['backup_id']}, up to LSN {manifest['stop_lsn']}{warning}"
    )


def _request_full(ctx: WorkerContext, target: str, gap: str) -> None:
    """Publish a full backup for now, keyed by the gap so that every job that sees it asks only once."""
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    event = BackupDue.new(
        target=target, kind="full", slot=slot, idempotency_key=f"backup-due:{target}:full:gap-{gap}"
    )
    with Publisher(ctx.settings.broker.url, delivery_limit=ctx.settings.broker.delivery_limit) as publisher:
        publisher.publish(event)


def _wait_archived(ctx: WorkerContext, target: str, segment: str) -> None:
    deadline = time.monotonic() + ARCHIVE_WAIT_SECONDS
    while not ctx.repository.exists(wal_key(target, segment)):
        if time.monotonic() > deadline:
            raise HandlerError(
                f"WAL segment {segment} of {target} did not reach the archive within "
                f"{ARCHIVE_WAIT_SECONDS:.0f}s; check that `deskvault wal-stream` is running for it"
            )
        time.sleep(1.0)
