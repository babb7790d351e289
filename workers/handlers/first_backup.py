"""Waiting for a new target's first full backup, which is due with everything else.

The scheduler emits the newest slot of every kind at once, so a new target's first differential and
first drill arrive with its first full, which may take an hour. Each waits for it (a retry that is not a
failure, see workers.actors) for FIRST_BACKUP_WAIT from the event; after that, no full is the handler's
own finding (a differential refused, a failed drill).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import dramatiq

from workers.context import WorkerContext

log = logging.getLogger(__name__)

FIRST_BACKUP_WAIT = timedelta(hours=1)
FIRST_BACKUP_POLL_MS = 15_000


class WaitingForFirstBackup(dramatiq.Retry):
    """Nothing of the target to build on yet, and its first full backup may still be running."""


def wait_for_first_full(ctx: WorkerContext, occurred_at: datetime, what: str) -> None:
    """Raise WaitingForFirstBackup while the event is young enough to wait; return once it is not."""
    if ctx.ledger.now() - occurred_at > FIRST_BACKUP_WAIT:
        return
    log.info("%s: waits for the target's first full backup", what)
    raise WaitingForFirstBackup(delay=FIRST_BACKUP_POLL_MS)
