"""backup-due: take the backup the event asks for (full, differential or log) and index it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from messages.events import BackupDue
from workers import metrics
from workers.backups import usage
from workers.context import WorkerContext
from workers.engines.base import BackupResult
from workers.engines.registry import engine_for
from workers.errors import PermanentError, UnknownTarget
from workers.handlers.first_backup import wait_for_first_full
from workers.handlers.log_backup import take_log_backup
from workers.jobs import run_once
from workers.repository import catalog
from workers.repository.errors import RepositoryError

log = logging.getLogger(__name__)

PROGRESS_EVERY = 256 * 1024 * 1024


def handle_backup_due(ctx: WorkerContext, event: BackupDue) -> str | None:
    if event.target not in ctx.settings.targets:
        known = ", ".join(sorted(ctx.settings.targets)) or "none"
        raise UnknownTarget(f"target: {event.target!r} is not configured (configured targets: {known})")
    if event.kind == "log":
        return run_once(ctx, event, lambda: take_log_backup(ctx, event))
    if event.kind == "diff":
        _wait_for_a_full(ctx, event)
        return run_once(ctx, event, lambda: _diff_backup(ctx, event))
    return run_once(ctx, event, lambda: _full_backup(ctx, event))


def _wait_for_a_full(ctx: WorkerContext, event: BackupDue) -> None:
    """A new target's first differential, due with its first full, waits for it instead of being
    refused; a differential already done is a duplicate, never a wait."""
    target = ctx.settings.target(event.target)
    if target.diff_without_full == "full" or catalog.has_full(ctx.repository, target.name):
        return
    if (job := ctx.ledger.job(event.idempotency_key)) is None or job.state != "done":
        wait_for_first_full(ctx, event.occurred_at, f"diff of {target.name}")


def _full_backup(ctx: WorkerContext, event: BackupDue) -> str:
    target = ctx.settings.target(event.target)
    backup_id = catalog.backup_id_for("full", event.slot)
    result = engine_for(target).full_backup(
        ctx.repository,
        backup_id=backup_id,
        job_key=event.idempotency_key,
        event_id=event.event_id,
        on_progress=_progress(event.target, backup_id),
    )
    outcome = _recorded(ctx, event.target, result)
    # A new full is what lets older chains go: apply the retention policy now. The full is committed
    # whatever retention does, so a retention failure is reported (log, metric, alert), not raised.
    try:
        expired = usage.expire_and_record(ctx.ledger, ctx.repository, target, datetime.now(UTC))
    except RepositoryError as e:
        metrics.RETENTION_STOPPED.labels(event.target).inc()
        log.error("retention of %s stopped: %s", event.target, e)
        return f"{outcome}; retention stopped, nothing deleted: {e}"
    if expired.plan.expired_backups:
        outcome += f"; retention expired {', '.join(expired.plan.expired_backups)}"
    return outcome


def _diff_backup(ctx: WorkerContext, event: BackupDue) -> str:
    target = ctx.settings.target(event.target)
    fulls = [m for m in catalog.list_manifests(ctx.repository, target.name) if m["kind"] == "full"]
    if not fulls:
        if target.diff_without_full == "full":
            log.info("diff %s: no full backup yet; taking a full instead", target.name)
            return _full_backup(ctx, event)
        raise PermanentError(
            f"kind: no full backup of {target.name} for a differential to extend; take a full first, or set "
            f'targets.{target.name}.diff_without_full = "full"'
        )
    backup_id = catalog.backup_id_for("diff", event.slot)
    result = engine_for(target).diff_backup(
        ctx.repository,
        backup_id=backup_id,
        full=fulls[-1],
        job_key=event.idempotency_key,
        event_id=event.event_id,
        on_progress=_progress(event.target, backup_id),
    )
    return _recorded(ctx, event.target, result)


def _progress(target: str, backup_id: str) -> Callable[[int], None]:
    next_report = [PROGRESS_EVERY]

    def progress(done: int) -> None:
        if done >= next_report[0]:
            log.info("backup %s/%s: %d MiB read", target, backup_id, done // 2**20)
            next_report[0] += PROGRESS_EVERY

    return progress


def _recorded(ctx: WorkerContext, target: str, result: BackupResult) -> str:
    """Index the committed backup, count it, and describe it for the ledger."""
    m = result.manifest
    ctx.ledger.record_backup(
        target=target,
        backup_id=m["backup_id"],
        kind=m["kind"],
        manifest_key=catalog.manifest_key(target, m["backup_id"]),
        started_at=datetime.fromisoformat(m["started_at"]),
        finished_at=datetime.fromisoformat(m["finished_at"]),
        start_lsn=m["start_lsn"],
        stop_lsn=m["stop_lsn"],
        plain_bytes=m["plain_size"],
        stored_bytes=m["stored_size"],
    )
    if result.created:
        metrics.BACKUP_BYTES.labels(target, m["kind"]).inc(m["plain_size"])
    verb = "stored" if result.created else "found already committed"
    base = f" on full {m['parent']}" if m["kind"] == "diff" else ""
    return (
        f"{m['kind']} backup {m['backup_id']}{base} {verb}: {m['plain_size']} bytes read, "
        f"{m['stored_size']} stored, LSN {m['start_lsn']}..{m['stop_lsn']}"
    )
