"""The scheduler: turns each target's and server's cron policy into due events.

Each (subject, kind) is due at the newest cron slot at or before now; its event's idempotency key is
derived from target, kind and slot, so several schedulers running at once, or one restarted after a
crash, publish the same key and the workers do the job once. After downtime only the newest missed slot
of each kind is emitted: one fresh backup, not a burst of stale ones. A brand-new target therefore gets
its first full backup at once, not next Sunday.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from deskvault_core.config import Settings
from deskvault_core.cron import Cron
from messages import outbound
from messages.events import BackupDue, Event, ExportRequested, PurgeDue, RestoreDrill, SnapshotDue
from producers.publisher import Publisher
from workers.ledger.ledger import Ledger
from workers.tenants.registry import TenantRegistry

log = logging.getLogger(__name__)

TICK_SECONDS = 20.0
SCHEDULED_EXPORT_REQUESTER = "deskvault scheduler"
# Slots of scheduled exports recorded per ledger transaction.
MARK_BATCH = 500
BACKUP_KINDS = ("full", "diff", "log")


@dataclass(frozen=True)
class Due:
    subject: str
    kind: str
    slot: datetime
    event: Event


def due_now(settings: Settings, now: datetime) -> list[Due]:
    """The newest slot of every (target, kind) and (server, snapshot), as events ready to publish."""
    due = []
    for name, target in sorted(settings.targets.items()):
        for kind in BACKUP_KINDS:
            slot = Cron.parse(getattr(target.schedule, kind)).latest_at_or_before(now)
            due.append(Due(f"target:{name}", kind, slot, BackupDue.new(target=name, kind=kind, slot=slot)))
        slot = Cron.parse(target.schedule.drill).latest_at_or_before(now)
        due.append(Due(f"target:{name}", "drill", slot, RestoreDrill.new(target=name, slot=slot)))
    for name, server in sorted(settings.servers.items()):
        slot = Cron.parse(server.schedule).latest_at_or_before(now)
        due.append(Due(f"server:{name}", "snapshot", slot, SnapshotDue.new(server=name, slot=slot)))
    return due


class Scheduler:
    def __init__(
        self, settings: Settings, ledger: Ledger, publisher: Publisher, clock: Callable[[], datetime]
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.publisher = publisher
        self.clock = clock

    def tick(self) -> list[Event]:
        """Publish every due event not yet published; returns what was published."""
        published = []
        now = self.clock()
        # The lifecycle sweep: expired tenants past their purge date and under no legal hold.
        purges = [
            Due(f"tenant:{tenant}", "purge", when, PurgeDue.new(tenant=tenant, purge_after=when))
            for tenant, when in self.ledger.due_purges(now)
        ]
        for due in [*due_now(self.settings, now), *purges]:
            if self.ledger.was_emitted(due.subject, due.kind, due.slot):
                continue
            # Publish first, then remember: a crash in between re-publishes (deduplicated by the workers)
            # rather than losing the slot.
            self.publisher.publish(due.event)
            self.ledger.mark_emitted(due.subject, due.kind, due.slot, due.event.idempotency_key)
            log.info(
                "emitted %s for %s slot %s (key %s)",
                due.event.type,
                due.subject,
                f"{due.slot:%Y-%m-%dT%H:%MZ}",
                due.event.idempotency_key,
            )
            published.append(due.event)
        self._warn_of_purges(now)
        published += self._request_scheduled_exports(now)
        return published

    def _request_scheduled_exports(self, now: datetime) -> list[Event]:
        """The nightly downloadable backup of every entitled, active tenant (once per slot).

        Read in bulk and marked in batches: with 100,000 tenants, per-tenant queries would cost more
        than the publishing (bench/publish_load.py).
        """
        slot = Cron.parse(self.settings.downloads.scheduled).latest_at_or_before(now)
        if self.ledger.was_emitted("tenants", "scheduled-export", slot):
            return []
        statuses = self.ledger.account_statuses()
        already = self.ledger.emitted_subjects("scheduled-export", slot)
        published: list[Event] = []
        marks: list[tuple[str, str]] = []
        for tenant in TenantRegistry(self.settings).all():
            subject = f"tenant:{tenant.id}"
            if not tenant.downloadable_backups or statuses.get(tenant.id, "active") != "active":
                continue
            if subject in already:
                continue
            event = ExportRequested.new(
                tenant=tenant.id,
                request_id=f"scheduled-{slot:%Y%m%dT%H%MZ}",
                requested_by=SCHEDULED_EXPORT_REQUESTER,
                kind="scheduled",
            )
            # Published before it is marked, as everywhere here: a crash re-publishes at most a batch,
            # which the workers skip as duplicates (same idempotency key).
            self.publisher.publish(event)
            published.append(event)
            marks.append((subject, event.idempotency_key))
            if len(marks) >= MARK_BATCH:
                self.ledger.mark_emitted_many("scheduled-export", slot, marks)
                marks = []
        if marks:
            self.ledger.mark_emitted_many("scheduled-export", slot, marks)
        # Marked last: a tick that failed midway tries the tenants it missed again.
        self.ledger.mark_emitted("tenants", "scheduled-export", slot, f"{len(published)} tenant(s)")
        if published:
            log.info("requested %d scheduled downloadable backup(s) for slot %s", len(published), slot)
        return published

    def _warn_of_purges(self, now: datetime) -> None:
        """purge-upcoming, once per tenant and purge date, `purge_notice_days` before the purge."""
        notice = timedelta(days=self.settings.lifecycle.purge_notice_days)
        for tenant, when in self.ledger.upcoming_purges(now, notice):
            subject = f"tenant:{tenant}"
            if self.ledger.was_emitted(subject, "purge-upcoming", when):
                continue
            message = outbound.purge_upcoming(tenant, when, now)
            self.publisher.publish_outbound(message)
            self.ledger.mark_emitted(subject, "purge-upcoming", when, message["event_id"])
            log.info("told the SaaS: tenant %s is purged after %s", tenant, f"{when:%Y-%m-%dT%H:%MZ}")

    def run(
        self,
        stop: threading.Event,
        tick_seconds: float = TICK_SECONDS,
        on_tick: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        """Tick until `stop` is set; `on_tick(ok)` after each tick, whether it published what was due."""
        log.info(
            "scheduler running: %d targets, %d servers",
            len(self.settings.targets),
            len(self.settings.servers),
        )
        while True:
            try:
                self.tick()
                on_tick(True)
            except Exception as e:  # keep scheduling; the next tick retries what failed
                log.error("scheduler tick failed: %s", e)
                on_tick(False)
            if stop.wait(tick_seconds):
                return
