"""`deskvault check`: can deskvault protect what its configuration names, right now?

One line per check, OK, WARN or FAIL, and for each that is not OK what to do. Exit 0 every check OK,
1 any WARN, 2 any FAIL (Nagios' convention, so a monitoring system can run it as is). Nothing is
created or changed, but for the bucket's probe object, written and removed again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pika.exceptions

from deskvault.status import live_wal
from deskvault_core.checks import FAIL, OK, WARN, Check
from deskvault_core.config import Settings, TargetSettings
from deskvault_core.cron import Cron
from deskvault_core.errors import DeskvaultError
from workers.context import open_ledger, open_store
from workers.engines.registry import engine_for
from workers.ledger.ledger import Ledger, LedgerError
from workers.ledger.schema import SCHEMA_VERSION
from workers.queues import topology_problems
from workers.repository.errors import KeyFileError
from workers.repository.keyring import Keyring

# The live RPO's thresholds: the RPO alert fires past a minute (ops/prometheus/alerts.yml).
RPO_WARN_SECONDS = 60
RPO_FAIL_SECONDS = 300
PROBE_PREFIX = "checks/probe-"
NOW_SHELL = "$(date -u +%FT%TZ)"  # the slot of an event published by hand: now


def run_checks(
    settings: Settings, *, targets: list[str] | None = None, prometheus_url: str = ""
) -> list[Check]:
    names = targets or sorted(settings.targets)
    checks = [
        Check(
            "configuration",
            OK,
            f"{settings.source}: {len(settings.targets)} target(s), {len(settings.servers)} server(s), "
            f"{len(settings.tenants)} tenant(s) in [tenants]",
        ),
        broker(settings),
        key_file(settings),
        *bucket(settings),
    ]
    control = control_db(settings)
    checks.append(control)
    ledger = open_ledger(settings) if control.level == OK else None
    warnings: list[str] = []
    archived, problems = live_wal(settings, prometheus_url, None, warnings)
    now = datetime.now(UTC)
    for name in names:
        target = settings.target(name)
        checks += engine_for(target).readiness()
        checks.append(_live_rpo(name, archived.get(name), problems.get(name), now))
        if ledger is not None:
            checks += _ages(target, ledger, now)
    return checks


def broker(settings: Settings) -> Check:
    where = _host_port(settings.broker.url)
    try:
        problems = topology_problems(settings.broker.url, settings.broker.delivery_limit)
    except (pika.exceptions.AMQPError, OSError) as e:
        return Check(
            "broker",
            FAIL,
            f"RabbitMQ at {where} unreachable ({type(e).__name__})",
            "check [broker] url and that RabbitMQ runs",
        )
    if problems:
        missing = all(p.endswith("is not declared") for p in problems)
        fix = (
            "run `deskvault init`"
            if missing
            else "delete the queues deskvault did not declare (once drained), then `deskvault init`"
        )
        return Check("broker", FAIL, f"RabbitMQ at {where}: {'; '.join(problems[:3])}", fix)
    return Check("broker", OK, f"RabbitMQ at {where}, every pool's queues declared as expected")


def control_db(settings: Settings) -> Check:
    try:
        version = open_ledger(settings).schema_version()
    except LedgerError as e:  # says what to check
        return Check("control database", FAIL, str(e))
    if version < SCHEMA_VERSION:
        return Check(
            "control database",
            FAIL,
            f"schema version {version}, this deskvault needs {SCHEMA_VERSION}",
            "run `deskvault init` (or `deskvault migrate`)",
        )
    if version > SCHEMA_VERSION:
        return Check(
            "control database",
            FAIL,
            f"schema version {version} is newer than this deskvault's ({SCHEMA_VERSION})",
            "upgrade deskvault on this host",
        )
    return Check("control database", OK, f"schema version {version}")


def key_file(settings: Settings) -> Check:
    path = Path(settings.repository.key_file)
    if not path.exists():
        return Check(
            "key file", FAIL, f"{path} does not exist", "run `deskvault init` (or `deskvault keys create`)"
        )
    try:
        keyring = Keyring.load(path)
        probe = uuid.uuid4().bytes * 2
        if keyring.unwrap(*keyring.wrap(probe)) != probe:
            raise DeskvaultError("a key wrapped and unwrapped gave something else back")
    except KeyFileError as e:  # its message says what to run
        return Check("key file", FAIL, str(e))
    except DeskvaultError as e:
        return Check("key file", FAIL, str(e), "see ops/runbooks/rotate-keys.md")
    return Check(
        "key file", OK, f"{path}: {len(keyring.key_ids)} key(s), active {keyring.active_id}, mode 0600"
    )


def bucket(settings: Settings) -> list[Check]:
    r = settings.repository
    where = f"s3://{r.bucket}/{r.prefix}"
    try:
        store = open_store(settings)
        if not store.bucket_exists():
            return [Check("bucket", FAIL, f"{where}: the bucket does not exist", "run `deskvault init`")]
    except DeskvaultError as e:
        return [Check("bucket", FAIL, str(e), "check [repository] endpoint, bucket and credentials")]
    probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        store.put_bytes(probe, b"deskvault check: may be deleted")
        store.delete_every_version(probe)
    except DeskvaultError as e:
        return [
            Check(
                "bucket",
                FAIL,
                f"{where} is not writable: {e}",
                "the credentials need s3:PutObject, s3:GetObject, s3:ListBucket, s3:DeleteObject (and "
                "s3:DeleteObjectVersion where versioning is on)",
            )
        ]
    versioning, lock = store.protection()
    return [
        Check("bucket", OK, f"{where} reachable and writable (a probe object written and removed)"),
        Check("bucket protection", OK, f"versioning {versioning}, object lock {lock}"),
    ]


def _live_rpo(name: str, archived: float | None, problem: str | None, now: datetime) -> Check:
    what = f"target {name}: live RPO"
    if problem:
        return Check(what, FAIL, f"stuck: {problem}", "see the `deskvault wal-stream` log")
    if archived is None:
        return Check(
            what,
            WARN,
            "unknown: no `deskvault wal-stream` metrics answer here (and no Prometheus has them)",
            "start `deskvault wal-stream`, or pass --prometheus URL",
        )
    rpo = max(0, int(now.timestamp() - archived))
    if rpo > RPO_FAIL_SECONDS:
        return Check(what, FAIL, f"{rpo} s: the WAL is not reaching the bucket", "see the wal-stream log")
    if rpo > RPO_WARN_SECONDS:
        return Check(
            what, WARN, f"{rpo} s (the alert fires past {RPO_WARN_SECONDS} s)", "see the wal-stream log"
        )
    return Check(what, OK, f"{rpo} s")


def _ages(target: TargetSettings, ledger: Ledger, now: datetime) -> list[Check]:
    newest = ledger.newest_backups()
    checks = []
    for kind in ("full", "diff", "log"):
        checks.append(
            _against_schedule(
                f"target {target.name}: newest {kind}",
                newest.get((target.name, kind)),
                getattr(target.schedule, kind),
                now,
                f"`deskvault publish backup-due --target {target.name} --kind {kind} --slot {NOW_SHELL}`",
            )
        )
    drill = ledger.newest_drills().get(target.name)
    what = f"target {target.name}: restore drill"
    if drill is not None and not drill["succeeded"]:
        checks.append(
            Check(
                what,
                FAIL,
                f"the newest drill, at {drill['finished_at']:%Y-%m-%d %H:%M}Z, failed",
                f"run `deskvault backups verify --target {target.name}` (ops/runbooks/alerts.md)",
            )
        )
    else:
        checks.append(
            _against_schedule(
                what,
                drill["passed_at"] if drill else None,
                target.schedule.drill,
                now,
                f"`deskvault publish restore-drill --target {target.name} --slot {NOW_SHELL}`",
            )
        )
    return checks


def _against_schedule(what: str, newest: datetime | None, schedule: str, now: datetime, run: str) -> Check:
    """OK while the newest run is no older than the slot before the latest (which may still be running),
    WARN one slot missed, FAIL two or more."""
    if newest is None:
        return Check(what, WARN, f"none yet (schedule {schedule!r})", f"wait for the scheduler, or run {run}")
    cron = Cron.parse(schedule)
    latest = cron.latest_at_or_before(now)
    previous = cron.latest_at_or_before(latest - timedelta(seconds=1))
    age = f"{newest:%Y-%m-%d %H:%M}Z"
    if newest >= previous:
        return Check(what, OK, f"{age} (schedule {schedule!r})")
    before = cron.latest_at_or_before(previous - timedelta(seconds=1))
    level = WARN if newest >= before else FAIL
    return Check(
        what, level, f"{age}: older than its schedule {schedule!r} allows", f"is the pool running? {run}"
    )


def _host_port(url: str) -> str:
    """The broker's address without its credentials."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"
