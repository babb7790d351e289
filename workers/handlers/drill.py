"""restore-drill: prove a target restorable by restoring it, instead of hoping.

The drill restores a random moment of the restorable window (chosen from the event's id, so a retry of
the same drill picks the same moment) into a scratch folder, starts PostgreSQL there, checks it
(pg_amcheck on every database where installed, and exact row counts of each database's largest tables),
tears it down, and records the outcome, the moment, and the duration. A failed drill is the finding,
not an error to retry: it is recorded and reported, and the metric of the last verified restore stays old.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from deskvault_core.errors import DeskvaultError
from messages.events import RestoreDrill
from workers import metrics
from workers.context import WorkerContext
from workers.engines.postgresql.cluster import PgCluster, free_port
from workers.engines.postgresql.restore import plan_restore, restore
from workers.errors import UnknownTarget
from workers.jobs import run_once

log = logging.getLogger(__name__)

TABLES_PROBED = 5


def handle_restore_drill(ctx: WorkerContext, event: RestoreDrill) -> str | None:
    if event.target not in ctx.settings.targets:
        known = ", ".join(sorted(ctx.settings.targets)) or "none"
        raise UnknownTarget(f"target: {event.target!r} is not configured (configured targets: {known})")
    return run_once(ctx, event, lambda: _drill(ctx, event))


def _drill(ctx: WorkerContext, event: RestoreDrill) -> str:
    target = ctx.settings.target(event.target)
    window = plan_restore(ctx.repository, target.name, None).window
    point = window.point_at(random.Random(event.event_id).random())
    plan = plan_restore(ctx.repository, target.name, point if window.latest > window.earliest else None)
    scratch = Path(tempfile.mkdtemp(prefix=f"deskvault-drill-{target.name}-"))
    scratch.chmod(0o755)  # the postgres user runs the restored server inside it
    cluster = PgCluster(scratch / "data", free_port(), Path(target.pg_bin))
    started = time.monotonic()
    try:
        restore(ctx.repository, plan, cluster.datadir, start=True, port=cluster.port, pg_bin=cluster.pg_bin)
        findings = _check(cluster)
        succeeded, detail = True, "; ".join(findings)
    except DeskvaultError as e:
        succeeded, detail = False, str(e)
    finally:
        cluster.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
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


def _check(cluster: PgCluster) -> list[str]:
    """Checks of a restored, running cluster; raises DeskvaultError on a failed check."""
    findings = []
    databases = cluster.psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1").split()
    amcheck = cluster.pg_bin / "pg_amcheck"
    if amcheck.exists():
        proc = subprocess.run(
            [
                str(amcheck),
                "-h",
                "127.0.0.1",
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "--all",
                "--install-missing",
                "--heapallindexed",
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if proc.returncode != 0:
            raise DeskvaultError(f"pg_amcheck found problems: {(proc.stdout + proc.stderr).strip()[:1500]}")
        findings.append(f"pg_amcheck clean on {len(databases)} databases")
    for db in databases:
        tables = cluster.psql(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            f"ORDER BY c.relpages DESC LIMIT {TABLES_PROBED}",
            db,
        ).split()
        counts = [f"{t}={cluster.psql(f'SELECT count(*) FROM {t}', db).strip()}" for t in tables]
        findings.append(f"{db}: {', '.join(counts) or 'no tables'}")
    return findings
