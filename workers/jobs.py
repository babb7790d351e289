"""Run a handler's work exactly once per idempotency key, holding a renewed lease while it runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import dramatiq

from messages.events import Event
from messages.topology import EVENT_POOL
from workers import metrics
from workers.context import WorkerContext
from workers.ledger.ledger import LeaseLost, LedgerError

log = logging.getLogger(__name__)


class JobBusy(dramatiq.Retry):
    """Another live worker holds this job; look again once its lease could have run out.

    Not dropped: if that worker died, this delivery is what finishes the job. Not counted against the
    retry limit either (see workers.actors), since a long backup keeps a duplicate waiting for hours.
    """


# Margin after the holder's lease expiry before looking again, so a renewal has time to land.
BUSY_MARGIN = timedelta(seconds=5)


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
    with _lease_kept(ctx, key):
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
def _lease_kept(ctx: WorkerContext, key: str) -> Iterator[None]:
    """Renew the lease every third of its length until the block ends."""
    stop = threading.Event()
    interval = ctx.ledger.lease.total_seconds() / 3

    def renew() -> None:
        try:
            while not stop.wait(interval):
                try:
                    ctx.ledger.renew(key, ctx.owner)
                except LeaseLost:
                    log.error("job %s: lease lost to another worker; its result will not be recorded", key)
                    return
                except LedgerError as e:
                    log.warning("job %s: could not renew lease (%s); retrying", key, e)
        finally:
            ctx.ledger.close()  # this thread's own connection

    thread = threading.Thread(target=renew, name=f"lease {key}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
