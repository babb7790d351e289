"""restore-drill: prove a target restorable by restoring it, instead of hoping.

The drill restores a random moment of the restorable window (chosen from the event's id, so a retry of
the same drill picks the same moment; the commit index resolves it to the last commit at or before it,
so every moment of the window is one recovery reaches) into a scratch server of the target's engine,
starts it, checks it (the engine's probes; for PostgreSQL pg_amcheck on every database where installed,
and exact row counts of each database's largest tables), tears it down, and records the outcome, the
moment, and the duration. A failed drill is the finding, not an error to retry: it is recorded and
reported, and the metric of the last verified restore stays old. The scratch server's log is kept
(KEPT_LOGS) when it fails.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import stat
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from deskvault_core.errors import DeskvaultError
from messages.events import RestoreDrill
from workers import metrics
from workers.context import WorkerContext
from workers.engines.base import NoBackupYet
from workers.engines.registry import engine_for
from workers.errors import UnknownTarget
from workers.handlers.first_backup import wait_for_first_full
from workers.jobs import run_once

log = logging.getLogger(__name__)

KEPT_LOGS = "deskvault-drill-logs"  # in the system's temp folder: failed drills' server logs


def handle_restore_drill(ctx: WorkerContext, event: RestoreDrill) -> str | None:
    if event.target not in ctx.settings.targets:
        known = ", ".join(sorted(ctx.settings.targets)) or "none"
        raise UnknownTarget(f"target: {event.target!r} is not configured (configured targets: {known})")
    if (job := ctx.ledger.job(event.idempotency_key)) is None or job.state != "done":
        _wait_for_first_backup(ctx, event)  # a drill already done is a duplicate, never a wait
    return run_once(ctx, event, lambda: _drill(ctx, event))


def _wait_for_first_backup(ctx: WorkerContext, event: RestoreDrill) -> None:
    try:
        engine_for(ctx.settings.target(event.target)).plan_restore(ctx.repository, None)
    except NoBackupYet:
        wait_for_first_full(ctx, event.occurred_at, f"restore-drill of {event.target}")
    except DeskvaultError:
        return  # any other reason it cannot restore is the drill's to record


def _drill(ctx: WorkerContext, event: RestoreDrill) -> str:
    target = ctx.settings.target(event.target)
    engine = engine_for(target)
    rng = random.Random(event.event_id)  # a retry of this drill drills the same moment
    started = time.monotonic()
    point = event.slot  # recorded as the moment when not even the window could be planned
    with engine.scratch_server("drill") as server:
        try:
            window = engine.plan_restore(ctx.repository, None).window
            point = window.point_at(rng.random())
            plan = engine.plan_restore(ctx.repository, point if window.latest > window.earliest else None)
            result = engine.restore(ctx.repository, plan, server.datadir, start=True, port=server.port)
            succeeded, detail = True, "; ".join([f"stopped at {result.stop}", *engine.probe(server)])
        except DeskvaultError as e:
            succeeded, detail = False, _with_kept_log(str(e), server.log_file, target.name)
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


def _with_kept_log(detail: str, log_file: Path, target: str) -> str:
    """The failure, pointing at a copy of the server's log: the scratch folder holding it goes next."""
    if not log_file.is_file():
        return detail  # the server never started
    try:
        kept = _keep_log(log_file, target)
    except OSError as e:
        return f"{detail}\n(the server log could not be kept: {e})"
    if str(log_file) in detail:  # the restore's error names the log and quotes its end
        return detail.replace(str(log_file), str(kept))
    return f"{detail}\nserver log {kept}"


def _keep_log(log_file: Path, target: str) -> Path:
    """Copy the log into KEPT_LOGS, readable by this user only (a server log can quote data)."""
    folder = Path(tempfile.gettempdir()) / KEPT_LOGS
    folder.mkdir(mode=0o700, exist_ok=True)
    found = folder.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
        # A shared temp folder: a name someone else made first is not ours to write into.
        raise OSError(f"{folder} is not a folder of this user's")
    folder.chmod(0o700)
    kept = folder / f"{target}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}.log"
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out, log_file.open("rb") as source:
        shutil.copyfileobj(source, out)
    return kept
