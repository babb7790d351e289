"""Run a handler's work exactly once per idempotency key, holding a renewed lease while it runs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import dramatiq

from messages.events import Event
from messages.topology import EVENT_POOL
from workers import metrics
from workers.context import WorkerContext
from workers.errors import HandlerError
from workers.ledger.ledger import LeaseLost, LedgerError
from workers.repository import fencing

log = logging.getLogger(__name__)


class JobBusy(dramatiq.Retry):
    """Another live worker holds this job; look again once its lease could have run out.

    Not dropped: if that worker died, this delivery is what finishes the job. Not counted against the
    retry limit either (see workers.actors), since a long backup keeps a duplicate waiting for hours.
    """


# Margin after the holder's lease expiry before looking again, so a renewal has time to land.
BUSY_MARGIN = timedelta(seconds=5)
# A worker stops writing once its lease has gone unrenewed for this share of its length: before the
# lease can run out in the ledger and another worker take the job over.
FENCE_SHARE = 2 / 3


class LeaseExpired(HandlerError):
    """This attempt's lease lapsed (the control database was unreachable, or the worker stalled): it stops
    writing, so that the redelivered attempt, which may already be running, owns the job alone."""


class Lease:
    """What the renewing thread knows of the lease, checked by the repository before every write."""

    def __init__(self, key: str, seconds: float) -> None:
        self.key = key
        self.limit = seconds * FENCE_SHARE
        self.renewed_at = time.monotonic()
        self.lost: str | None = None

    def renewed(self) -> None:
        self.renewed_at = time.monotonic()

    def check(self) -> None:
        if self.lost is not None:
            raise LeaseExpired(f"job {self.key}: {self.lost}; stopped writing, a redelivery takes over")
        unrenewed = time.monotonic() - self.renewed_at
        if unrenewed > self.limit:
            raise LeaseExpired(
                f"job {self.key}: lease not renewed for {unrenewed:.0f} s (is the control database "
                "reachable?); stopped writing before another worker can take the job, a redelivery "
                "takes over"
            )


def run_once(ctx: WorkerContext, event: Event, work: Callable[[], str]) -> str | None:
    """Claim the event's job, run `work`, record its outcome; a finished job is skipped as a duplicate.

    Returns the outcome, or None for a duplicate. Raises JobBusy while another live worker holds
    the job; any exception from `work` marks the job failed (so a later delivery may take it) and
    propagates to dramatiq, which retries or dead-letters it.
    """
    pool = EVENT_POOL[event.type]
    key = event.idempotency_key
    claim = ctx.ledger.claim(key, pool=pool, event_type=event.type, event_id=event.event_id, owner=ctx.owner)
    if claim.status == "duplicate":
        metrics.EVENTS_DUPLICATE.labels(pool, event.type).inc()
        log.info("%s %s: already done, skipped as a duplicate", event.type, key)
        return None
    if claim.status == "busy":
        log.info(
            "%s %s: running elsewhere (lease until %s); will look again",
            event.type,
            key,
            claim.lease_expires_at,
        )
        raise JobBusy(delay=_busy_delay_ms(ctx, claim.lease_expires_at))

    log.info("%s %s: started (attempt %d)", event.type, key, claim.attempts)
    with _lease_kept(ctx, key) as lease, fencing.fenced(lease.check):
        try:
            outcome = work()
        except BaseException as e:
            try:
                ctx.ledger.fail(key, ctx.owner, f"{type(e).__name__}: {e}"[:4000])
            except (LeaseLost, LedgerError) as ledger_error:
                log.error("%s %s: could not record failure: %s", event.type, key, ledger_error)
            raise
    ctx.ledger.complete(key, ctx.owner, outcome)
    log.info("%s %s: done: %s", event.type, key, outcome)
    return outcome


def _busy_delay_ms(ctx: WorkerContext, lease_expires_at: datetime | None) -> int:
    wait = ctx.ledger.lease if lease_expires_at is None else lease_expires_at - ctx.ledger.now()
    return int(max(wait + BUSY_MARGIN, BUSY_MARGIN).total_seconds() * 1000)


@contextmanager
def _lease_kept(ctx: WorkerContext, key: str) -> Iterator[Lease]:
    """Renew the lease every third of its length until the block ends; the Lease says whether it holds."""
    stop = threading.Event()
    interval = ctx.ledger.lease.total_seconds() / 3
    lease = Lease(key, ctx.ledger.lease.total_seconds())

    def renew() -> None:
        try:
            while not stop.wait(interval):
                try:
                    ctx.ledger.renew(key, ctx.owner)
                    lease.renewed()
                except LeaseLost:
                    lease.lost = "lease lost to another worker"
                    log.error("job %s: lease lost to another worker; its writes are fenced off", key)
                    return
                except LedgerError as e:
                    log.warning("job %s: could not renew lease (%s); retrying", key, e)
        finally:
            ctx.ledger.close()  # this thread's own connection

    thread = threading.Thread(target=renew, name=f"lease {key}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
