"""restore-drill: prove a target restorable by restoring it, instead of hoping.

The drill restores a random moment of the restorable window (chosen from the event's id, so a retry of
the same drill picks the same moment; the commit index resolves it to the last commit at or before it,
so every moment of the window is one recovery reaches) into a scratch server of the target's engine,
starts it, checks it (the engine's probes; for PostgreSQL pg_amcheck on every database where installed,
and exact row counts of each database's largest tables), tears it down, and records the outcome, the
moment, and the duration. A failed drill is the finding, not an error to retry: it is recorded and
reported, and the metric of the last verified restore stays old.
"""

from __future__ import annotations

import logging
import random
import time

from deskvault_core.errors import DeskvaultError
from messages.events import RestoreDrill
from workers import metrics
from workers.context import WorkerContext
from workers.engines.registry import engine_for
from workers.errors import UnknownTarget
from workers.jobs import run_once

log = logging.getLogger(__name__)


def handle_restore_drill(ctx: WorkerContext, event: RestoreDrill) -> str | None:
    if event.target not in ctx.settings.targets:
        known = ", ".join(sorted(ctx.settings.targets)) or "none"
        raise UnknownTarget(f"target: {event.target!r} is not configured (configured targets: {known})")
    return run_once(ctx, event, lambda: _drill(ctx, event))


def _drill(ctx: WorkerContext, event: RestoreDrill) -> str:
    target = ctx.settings.target(event.target)
    engine = engine_for(target)
    window = engine.plan_restore(ctx.repository, None).window
    point = window.point_at(random.Random(event.event_id).random())
    plan = engine.plan_restore(ctx.repository, point if window.latest > window.earliest else None)
    started = time.monotonic()
    with engine.scratch_server("drill") as server:
        try:
            result = engine.restore(ctx.repository, plan, server.datadir, start=True, port=server.port)
            succeeded, detail = True, "; ".join([f"stopped at {result.stop}", *engine.probe(server)])
        except DeskvaultError as e:
            succeeded, detail = False, str(e)
    seconds = int(time.monotonic() - started)
    ctx.ledger.record_drill(
        target=target.name,
        drill_id=event.idempotency_key[-64:],
        point_in_time=point,
        succeeded=succeeded,
        duration_seconds=seconds,
        detail=detail[:4000],
    )
    metrics.DRILLS.labels(target.name, "passed" if succeeded else "failed").inc()
    metrics.DRILL_SECONDS.labels(target.name).observe(seconds)
    moment = f"{point:%Y-%m-%dT%H:%M:%SZ}"
    if not succeeded:
        log.error("restore drill of %s to %s FAILED: %s", target.name, moment, detail)
        return f"drill FAILED: restoring {target.name} to {moment}: {detail}"
    return f"drill passed: {target.name} restored to {moment} in {seconds}s; {detail}"
