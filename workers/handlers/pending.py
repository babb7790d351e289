"""snapshot-due: validated and recorded, but the work itself is not built yet.

They say so in the ledger and the log; they never report a snapshot or export that was not made.
"""

from __future__ import annotations

import logging

from messages.events import SnapshotDue
from workers.context import WorkerContext
from workers.errors import UnknownTarget
from workers.jobs import run_once

log = logging.getLogger(__name__)


def handle_snapshot_due(ctx: WorkerContext, event: SnapshotDue) -> str | None:
    if event.server not in ctx.settings.servers:
        known = ", ".join(sorted(ctx.settings.servers)) or "none"
        raise UnknownTarget(f"server: {event.server!r} is not configured (configured servers: {known})")

    def record() -> str:
        log.warning(
            "snapshot-due for %s recorded, but server snapshots are not built yet: NO snapshot taken",
            event.server,
        )
        return "not done: server snapshots are not built yet; no snapshot was taken"

    return run_once(ctx, event, record)
