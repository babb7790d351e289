"""backup-due(kind=log): prove the target's log archive current and whole, and record it as a log backup.

The log itself is archived continuously (`deskvault wal-stream`); the engine closes the current log
file, waits until it is archived, checks the newest chain for holes and commits a log manifest. A hole
means only a new full can start a whole chain: one is requested at once.
"""

from __future__ import annotations

from datetime import UTC, datetime

from messages.events import BackupDue
from producers.publisher import Publisher
from workers.backups import usage
from workers.context import WorkerContext
from workers.engines.base import LogGap
from workers.engines.registry import engine_for
from workers.errors import HandlerError
from workers.repository import catalog


def take_log_backup(ctx: WorkerContext, event: BackupDue) -> str:
    target = ctx.settings.target(event.target)
    fulls = [m for m in catalog.list_manifests(ctx.repository, target.name) if m["kind"] == "full"]
    if not fulls:
        return "not done: no full backup yet, so there is no chain for the WAL to extend"
    backup_id = catalog.backup_id_for("log", event.slot)
    try:
        done = engine_for(target).log_backup(
            ctx.repository,
            backup_id=backup_id,
            fulls=fulls,
            job_key=event.idempotency_key,
            event_id=event.event_id,
        )
    except LogGap as gap:
        _request_full(ctx, target.name, gap.missing)
        raise HandlerError(
            f"{gap}; a full backup was requested to start a new chain -- check that "
            "`deskvault wal-stream` runs"
        ) from None
    manifest = done.manifest
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
    return f"log backup {backup_id}: {done.summary}"


def _request_full(ctx: WorkerContext, target: str, gap: str) -> None:
    """Publish a full backup for now, keyed by the gap so that every job that sees it asks only once."""
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    event = BackupDue.new(
        target=target, kind="full", slot=slot, idempotency_key=f"backup-due:{target}:full:gap-{gap}"
    )
    with Publisher(ctx.settings.broker.url, delivery_limit=ctx.settings.broker.delivery_limit) as publisher:
        publisher.publish(event)
