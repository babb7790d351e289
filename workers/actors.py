"""The pools' dramatiq actors: thin wrappers that decode an event and call its plain handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from deskvault_core.config import Settings
from messages.errors import InvalidEvent
from messages.events import decode_event
from messages.topology import EVENT_POOL, actor_name
from workers import context
from workers.broker import DeskvaultBroker
from workers.errors import PERMANENT_ERRORS
from workers.handlers.backup import handle_backup_due
from workers.handlers.drill import handle_restore_drill
from workers.handlers.export import handle_export_requested
from workers.handlers.first_backup import WaitingForFirstBackup
from workers.handlers.lifecycle import handle_account_expired, handle_account_reactivated
from workers.handlers.purge import handle_purge_due
from workers.handlers.snapshot import handle_snapshot_due
from workers.handlers.tenant_restore import handle_tenant_restore_requested
from workers.jobs import JobBusy
from workers.metrics import PoolMetrics

HANDLERS: dict[str, Callable[..., Any]] = {
    "backup-due": handle_backup_due,
    "snapshot-due": handle_snapshot_due,
    "account-expired": handle_account_expired,
    "account-reactivated": handle_account_reactivated,
    "export-requested": handle_export_requested,
    "tenant-restore-requested": handle_tenant_restore_requested,
    "restore-drill": handle_restore_drill,
    "purge-due": handle_purge_due,
}

# A backup of a large target takes hours; everything else takes seconds.
TIME_LIMIT_MS = {
    "backup": 12 * 3600 * 1000,
    "verify": 12 * 3600 * 1000,
    "snapshot": 3600 * 1000,
    "export": 6 * 3600 * 1000,
    "lifecycle": 10 * 60 * 1000,
}


def build_broker(settings: Settings) -> tuple[DeskvaultBroker, PoolMetrics]:
    """A broker with deskvault's middleware and every pool's actors declared on it."""
    pool_metrics = PoolMetrics()
    middleware = [
        # First, so its after-hooks run last (dramatiq runs them in reverse): Retries has decided by then.
        pool_metrics,
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(
            max_retries=settings.broker.max_retries,
            min_backoff=settings.broker.min_backoff_ms,
            max_backoff=settings.broker.max_backoff_ms,
        ),
    ]
    broker = DeskvaultBroker(
        url=settings.broker.url, delivery_limit=settings.broker.delivery_limit, middleware=middleware
    )
    for event_type, handler in HANDLERS.items():
        pool = EVENT_POOL[event_type]
        dramatiq.actor(
            _actor_body(event_type, handler),
            actor_name=actor_name(event_type),
            queue_name=pool,
            broker=broker,
            throws=PERMANENT_ERRORS,
            time_limit=TIME_LIMIT_MS[pool],
        )
    return broker, pool_metrics


def _retry_when(max_retries: int) -> Callable[[int, BaseException], bool]:
    """Retry failures up to the limit; waiting for a busy job, or for a new target's first backup, is
    not a failure and does not run out (the latter is bounded by its own deadline)."""

    def retry(retries: int, exception: BaseException) -> bool:
        return isinstance(exception, JobBusy | WaitingForFirstBackup) or retries < max_retries

    return retry


def _actor_body(event_type: str, handler: Callable[..., Any]) -> Callable[[Any], None]:
    def handle(payload: Any) -> None:
        event = decode_event(payload)
        if event.type != event_type:
            raise InvalidEvent("type", f"{event.type!r} sent to the {actor_name(event_type)} actor")
        handler(context.current(), event)

    handle.__name__ = actor_name(event_type)
    return handle
