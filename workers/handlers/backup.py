"""backup-due: take the backup the event asks for and index it."""

from __future__ import annotations

import logging
from datetime import datetime

from messages.events import BackupDue
from workers import catalog, metrics
from workers.context import WorkerContext
from workers.engines.postgresql import PostgresEngine
from workers.errors import UnknownTarget
from workers.handlers.log_backup import take_log_backup
from workers.jobs import run_once

log = logging.getLogger(__name__)

PROGRESS_EVERY = 256 * 1024 * 1024


def handle_backup_due(ctx: WorkerContext, event: BackupDue) -> str | None:
    if event.target not in ctx.settings.targets:
        known = ", ".join(sorted(ctx.settings.targets)) or "none"
        raise UnknownTarget(f"target: {event.target!r} is not configured (configured targets: {known})")
    if event.kind == "log":
        return run_once(ctx, event, lambda: take_log_backup(ctx, event))
    if event.kind == "diff":
        # The differential layer is not built yet; say so rather than pretend.
        return run_once(ctx, event, lambda: "not done: differential backups are not built yet")
    return run_once(ctx, event, lambda: _full_backup(ctx, event))


def _full_backup(ctx: WorkerContext, event: BackupDue) -> str:
    target = ctx.settings.target(event.target)
    backup_id = catalog.backup_id_for("full", event.slot)
    next_report = [PROGRESS_EVERY]

    def progress(done: int) -> None:
        if done >= next_report[0]:
            log.info("backup %s/%s: %d MiB read", event.target, backup_id, done // 2**20)
            next_report[0] += PROGRESS_EVERY

    result = PostgresEngine(target).full_backup(
        ctx.repository,
        backup_id=backup_id,
        job_key=event.idempotency_key,
        event_id=event.event_id,
        on_progress=progress,
    )
    m = result.manifest
    ctx.ledger.record_backup(
        target=event.target,
        backup_id=backup_id,
        kind="full",
        manifest_key=catalog.manifest_key(event.target, backup_id),
        started_at=datetime.fromisoformat(m["started_at"]),
        finished_at=datetime.fromisoformat(m["finished_at"]),
        start_lsn=m["start_lsn"],
        stop_lsn=m["stop_lsn"],
        plain_bytes=m["plain_size"],
        stored_bytes=m["stored_size"],
    )
    if result.created:
        metrics.BACKUP_BYTES.labels(event.target, "full").inc(m["plain_size"])
    metrics.BACKUP_LAST_SUCCESS.labels(event.target, "full").set(
        datetime.fromisoformat(m["finished_at"]).timestamp()
    )
    verb = "stored" if result.created else "found already committed"
    return (
        f"full backup {backup_id} {verb}: {m['plain_size']} bytes read, {m['stored_size']} stored, "
        f"LSN {m['start_lsn']}..{m['stop_lsn']}"
    )
