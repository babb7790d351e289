"""One tenant restored to a moment on its live target, side by side and in its place, while the other
tenants' databases stay exactly as they were; and every request that cannot be served refused before
anything is downloaded or created.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pika
import pytest
from dramatiq import Worker
from support import (
    OutboundListener,
    build_settings,
    run_cli,
    take_backup,
    tenants_cluster,
    wait_for,
    wal_streaming,
    worker_context,
)

from deskvault.local.demo_data import TABLES, table_fingerprint_sql
from messages.envelope import wrap
from messages.events import TenantRestoreRequested
from messages.schema_files import SCHEMA_DIR
from messages.topology import dead_letter_queue
from producers.publisher import Publisher
from workers import context
from workers.actors import build_broker
from workers.broker import REASON_HEADER
from workers.context import WorkerContext
from workers.engines.base import EngineError
from workers.engines.postgresql import copyin
from workers.engines.postgresql.cluster import PgCluster
from workers.engines.postgresql.restore import plan_restore
from workers.errors import PermanentError
from workers.repository.keyring import Keyring
from workers.tenants.registry import UnknownTenant
from workers.tenants.restore import REPLACE, TenantRestoreRequest, derived_name, restore_tenant

pytestmark = pytest.mark.integration

TENANTS = ("tr_alpha", "tr_beta", "tr_gamma")
# tr_gone: a tenant purged (in the ledger), its config entry not yet removed
CONFIG = "".join(
    f'[tenants.{t}]\nplan = "company"\ndatabase = "{t}"\ntarget = "main"\n' for t in (*TENANTS, "tr_gone")
)


@pytest.fixture(scope="module")
def cluster(scratch_dir: Path) -> Iterator[PgCluster]:
    source = tenants_cluster(scratch_dir, "tenant-restore", TENANTS)
    source.psql("CHECKPOINT")
    time.sleep(2)  # files older than the full's start (see support.marks_cluster)
    yield source
    source.destroy()


def _fingerprint(cluster: PgCluster, database: str) -> dict[str, str]:
    return {t: cluster.psql(table_fingerprint_sql(t), database).strip() for t in TABLES}


def _databases(cluster: PgCluster) -> set[str]:
    return set(cluster.psql("SELECT datname FROM pg_database").split())


@pytest.fixture(scope="module")
def history(cluster: PgCluster, tmp_path_factory, s3_endpoint, rabbit_url, control_db_odbc) -> Iterator[dict]:
    """Full, changes to every tenant, moment T, then half of tr_beta's tickets deleted and more changes."""
    directory = tmp_path_factory.mktemp("tenant-restore")
    key_file = directory / "keys.json"
    Keyring.create(key_file)
    settings = build_settings(
        directory, key_file, s3_endpoint, rabbit_url, control_db_odbc, cluster, extra=CONFIG
    )
    ctx = worker_context(settings)
    with wal_streaming(ctx, connected=cluster):
        take_backup(ctx, "full")
        for tenant in TENANTS:
            cluster.psql("UPDATE tickets SET subject = subject || ' (seen)' WHERE id % 4 = 0", tenant)
        expected = _fingerprint(cluster, "tr_beta")
        time.sleep(1.1)
        moment = datetime.now(UTC)
        time.sleep(1.1)
        cluster.psql("DELETE FROM replies WHERE ticket_id % 2 = 0", "tr_beta")
        cluster.psql("DELETE FROM attachments WHERE ticket_id % 2 = 0", "tr_beta")
        cluster.psql("DELETE FROM tickets WHERE id % 2 = 0", "tr_beta")
        cluster.psql("UPDATE tickets SET status = 'closed'", "tr_alpha")
        last = int(cluster.psql("SELECT txid_current()").strip())
        cluster.psql("SELECT pg_switch_wal()")

        def archived() -> bool:
            commit = plan_restore(ctx.repository, "main", None).stop.commit
            return commit is not None and commit.xid == last

        wait_for(archived, timeout=60, what="the last commit to reach the archive")
    yield {"ctx": ctx, "at": moment, "expected": expected, "after": _fingerprint(cluster, "tr_beta")}


def _others(cluster: PgCluster) -> dict[str, dict[str, str]]:
    return {t: _fingerprint(cluster, t) for t in TENANTS if t != "tr_beta"}


def _request(**fields) -> TenantRestoreRequest:
    return TenantRestoreRequest(request_id=f"req-{uuid.uuid4().hex[:8]}", requested_by="test", **fields)


def test_side_by_side_gives_the_tenants_rows_as_of_the_moment_and_touches_nothing_else(
    cluster: PgCluster, history: dict
) -> None:
    ctx: WorkerContext = history["ctx"]
    others, databases = _others(cluster), _databases(cluster)
    said: list[str] = []
    request = _request(tenant="tr_beta", at=history["at"])

    result = restore_tenant(ctx, request, said.append)

    name = derived_name("tr_beta", "restored", history["at"])
    assert result.restored_as == name and result.put_aside_as is None
    assert _fingerprint(cluster, name) == history["expected"]
    assert _fingerprint(cluster, "tr_beta") == history["after"]  # the original untouched
    assert _others(cluster) == others and _databases(cluster) == databases | {name}
    assert result.reached_at is not None and result.reached_at <= history["at"]
    assert result.reached_xid is not None and str(result.reached_xid) in result.stop
    assert any("database tr_beta alone" in line for line in said), said
    assert any(line.startswith("copied: ") for line in said), said
    (recorded,) = [r for r in ctx.ledger.tenant_restores("tr_beta") if r["request_id"] == request.request_id]
    assert recorded["restored_as"] == name and recorded["requested_by"] == "test"
    note = cluster.psql(
        f"SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '{name}'"
    )
    assert request.request_id in note and note.strip().endswith("complete")

    # The same request again (a redelivery): nothing is made twice
    again = restore_tenant(ctx, request)
    assert again.restored_as == name and again.dump_bytes == 0
    assert _databases(cluster) == databases | {name}
    cluster.psql(f'DROP DATABASE "{name}"')


def test_replace_puts_the_restored_copy_in_place_and_keeps_the_current_aside(
    cluster: PgCluster, history: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx: WorkerContext = history["ctx"]
    others, databases = _others(cluster), _databases(cluster)
    asked = datetime.now(UTC)
    request = _request(tenant="tr_beta", at=history["at"], mode=REPLACE, requested_at=asked)

    # A session on the database refuses the replace before anything is downloaded
    with _session_on(cluster, "tr_beta"):
        fetched = _data_downloads(ctx, monkeypatch)
        with pytest.raises(PermanentError, match="mode: database tr_beta has 1 session"):
            restore_tenant(ctx, request)
        assert fetched() == 0 and _databases(cluster) == databases

        # --force ends it
        result = restore_tenant(ctx, TenantRestoreRequest(**{**request.__dict__, "force": True}))
    aside = derived_name("tr_beta", "before_restore", asked)
    assert result.restored_as == "tr_beta" and result.put_aside_as == aside
    assert _fingerprint(cluster, "tr_beta") == history["expected"]
    assert _fingerprint(cluster, aside) == history["after"]
    assert _others(cluster) == others and _databases(cluster) == databases | {aside}

    # A redelivery after the swap: done already, nothing renamed again
    again = restore_tenant(ctx, TenantRestoreRequest(**{**request.__dict__, "force": True}))
    assert again.put_aside_as == aside and _databases(cluster) == databases | {aside}
    assert _fingerprint(cluster, "tr_beta") == history["expected"]


@contextmanager
def _session_on(cluster: PgCluster, database: str) -> Iterator[None]:
    """An application's session on `database` (psql sleeping) while the block runs."""
    holder = subprocess.Popen(
        ["psql", "-X", "-d", f"{cluster.conninfo} dbname={database}", "-c", "SELECT pg_sleep(60)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _sessions(cluster, database), what=f"psql's session on {database}")
        yield
    finally:
        holder.kill()
        holder.wait()


def _sessions(cluster: PgCluster, database: str) -> bool:
    return cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'").strip() == "1"


def _data_downloads(ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch):
    """Counts the downloads of backed-up data from here on: parts of backups and WAL segments (the
    catalog's manifests and commit indexes, which plans read, are not data)."""
    calls = []
    get_stream = ctx.repository.get_stream

    def counted(key: str, **kwargs):
        segment = key.startswith("targets/main/wal/") and not key.endswith(".history.dv")
        if segment or "/part-" in key or key.endswith(("/folders.dv", "/wal.dv")):
            calls.append(key)
        return get_stream(key, **kwargs)

    monkeypatch.setattr(ctx.repository, "get_stream", counted)
    return lambda: len(calls)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"tenant": "nobody"}, UnknownTenant, "tenant: 'nobody' is not a known tenant"),
        ({"at": datetime(2020, 1, 1, tzinfo=UTC)}, PermanentError, "at: .* is before the oldest full backup"),
        ({"at_offset": timedelta(days=1)}, PermanentError, "at: .* is after the newest archived WAL"),
        ({"as_name": "tr_gamma"}, PermanentError, "as: 'tr_gamma' is the database of tenant tr_gamma"),
        ({"as_name": "postgres"}, PermanentError, "as: 'postgres' is the server's own"),
        ({"as_name": "taken"}, PermanentError, "as: database taken already exists"),
        ({"as_name": "x" * 64}, PermanentError, "as: .* is not a database name"),
        ({"mode": "sideways"}, PermanentError, "mode: 'sideways' is not one of"),
        ({"tenant": "tr_gone"}, PermanentError, "tenant: tr_gone was purged"),
    ],
)
def test_what_cannot_be_served_is_refused_before_anything_is_downloaded_or_made(
    cluster: PgCluster,
    history: dict,
    monkeypatch: pytest.MonkeyPatch,
    fields: dict,
    error: type,
    match: str,
) -> None:
    ctx: WorkerContext = history["ctx"]
    ctx.ledger.record_account_event(
        tenant="tr_gone",
        event_type="account-expired",
        event_id=str(uuid.uuid4()),
        occurred_at=datetime.now(UTC),
        plan="company",
        status="purged",
        expired_at=datetime.now(UTC),
        trial_started_at=None,
        purge_after=datetime.now(UTC),
        allowed_from=("purged",),
        detail="test",
    )
    if fields.get("as_name") == "taken":
        cluster.psql("CREATE DATABASE taken")
    at = history["at"] + fields.pop("at_offset", timedelta(0))
    fields = {"tenant": "tr_beta", "at": at, **fields}
    databases = _databases(cluster)
    fetched = _data_downloads(ctx, monkeypatch)
    try:
        with pytest.raises(error, match=match):
            restore_tenant(ctx, _request(**fields))
        assert fetched() == 0 and _databases(cluster) == databases
    finally:
        cluster.psql("DROP DATABASE IF EXISTS taken")


@pytest.fixture
def export_pool(history: dict) -> Iterator[WorkerContext]:
    """The export pool (which handles tenant restores) running in-process against RabbitMQ."""
    ctx: WorkerContext = history["ctx"]
    settings = ctx.settings
    context.configure(ctx)
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher._open()  # declares the topology
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker.url))
    for queue in ("export", dead_letter_queue("export")):
        connection.channel().queue_purge(queue)
    connection.close()
    broker, _ = build_broker(settings)
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    yield ctx
    worker.stop(timeout=10_000)
    broker.close()


def _publish(ctx: WorkerContext, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(ctx.settings.broker.url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", "export", body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    connection.close()


def _dead_letter(ctx: WorkerContext) -> tuple[bytes, dict]:
    connection = pika.BlockingConnection(pika.URLParameters(ctx.settings.broker.url))
    channel = connection.channel()

    def get():
        method, properties, body = channel.basic_get(dead_letter_queue("export"), auto_ack=True)
        return (body, properties.headers or {}) if method else None

    try:
        return wait_for(get, timeout=60, what="a dead letter in export.XQ")
    finally:
        connection.close()


def test_the_event_restores_once_and_answers_with_tenant_restored(
    cluster: PgCluster, history: dict, export_pool: WorkerContext
) -> None:
    ctx = export_pool
    others, databases = _others(cluster), _databases(cluster)
    event = TenantRestoreRequested.new(
        tenant="tr_beta", at=history["at"], request_id=f"RST-{uuid.uuid4().hex[:8]}", requested_by="Zoë"
    )
    listener = OutboundListener(ctx.settings.broker.url, "tenant-restored")
    try:
        _publish(ctx, wrap(event))
        _publish(ctx, wrap(event))  # published twice (at least once delivery): restored once
        told = wait_for(listener.messages, timeout=300, what="tenant-restored")
        job = wait_for(lambda: (j := ctx.ledger.job(event.idempotency_key)) and j.state == "done" and j)
        time.sleep(2)  # the second copy, handled as a duplicate, tells nothing new
        told += listener.messages()
    finally:
        listener.close()
    name = derived_name("tr_beta", "restored", history["at"])
    assert [m["restored_as"] for m in told] == [name] and job.outcome.startswith("tenant tr_beta restored")
    schema = json_schema("tenant-restored")
    jsonschema.validate(told[0], schema)
    assert told[0]["request_id"] == event.request_id and told[0]["reached_xid"] is not None
    assert _fingerprint(cluster, name) == history["expected"]
    assert _others(cluster) == others and _databases(cluster) == databases | {name}
    cluster.psql(f'DROP DATABASE "{name}"')


def json_schema(outbound: str) -> dict:
    return json.loads((SCHEMA_DIR / "outbound" / f"{outbound}.v1.schema.json").read_text())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mode": "sideways"}, "mode: must be one of side-by-side, replace"),
        ({"force": True}, "force: only applies when mode is replace"),
        ({"mode": "replace", "as_name": "x"}, "as_name: must be absent or null when mode is replace"),
        ({"as_name": "drop table"}, "as_name: must be 1-63 of"),
        ({"at": "2020-01-01T00:00:00Z"}, "at: 2020-01-01"),
        ({"tenant": "nobody"}, "tenant: 'nobody' is not a known tenant"),
        ({"at": None}, "at: expected string, got null"),
    ],
    ids=["mode", "force-side-by-side", "as-with-replace", "as-not-a-name", "outside", "unknown", "no-at"],
)
def test_a_request_that_cannot_be_served_is_dead_lettered_with_the_reason_and_makes_nothing(
    cluster: PgCluster, history: dict, export_pool: WorkerContext, change: dict, reason: str
) -> None:
    ctx = export_pool
    databases = _databases(cluster)
    event = TenantRestoreRequested.new(
        tenant="tr_beta", at=history["at"], request_id=f"RST-{uuid.uuid4().hex[:8]}", requested_by="ann"
    )
    envelope = json.loads(wrap(event))
    envelope["args"][0].update(change)
    body = json.dumps(envelope).encode()
    _publish(ctx, body)
    dead_body, headers = _dead_letter(ctx)
    assert dead_body == body
    assert reason in headers[REASON_HEADER], headers[REASON_HEADER]
    assert ctx.ledger.job(event.idempotency_key) is None  # refused before any work was claimed
    assert _databases(cluster) == databases


def test_the_command_restores_under_the_name_given_and_prints_where_it_stopped(
    cluster: PgCluster, history: dict
) -> None:
    ctx: WorkerContext = history["ctx"]
    others = _others(cluster)
    at = f"{history['at']:%Y-%m-%dT%H:%M:%S.%fZ}"
    done = run_cli(ctx.settings, "tenants", "restore", "--tenant", "tr_beta", "--at", at, "--as", "beta_then")
    assert done.returncode == 0, done.stderr
    assert "database tr_beta alone" in done.stdout and "copied: " in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("tenant tr_beta restored to the commit of transaction "), last
    assert _fingerprint(cluster, "beta_then") == history["expected"] and _others(cluster) == others

    # The name taken now: refused, naming the option and what to do, with nothing made
    databases = _databases(cluster)
    again = run_cli(
        ctx.settings, "tenants", "restore", "--tenant", "tr_beta", "--at", at, "--as", "beta_then", "--json"
    )
    assert again.returncode != 0 and again.stdout == ""
    assert "as: database beta_then already exists on target main; choose another name" in again.stderr
    assert _databases(cluster) == databases
    cluster.psql("DROP DATABASE beta_then")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--at", "yesterday"), "--at: expected an RFC 3339 timestamp"),
        (("--at", "2026-11-27T10:14:00"), "--at: timestamp '2026-11-27T10:14:00' has no UTC offset"),
        (("--at", "2026-11-27T10:14:00Z", "--force"), "--force: only with --replace"),
    ],
)
def test_the_command_refuses_bad_options_naming_them(history: dict, args: tuple, error: str) -> None:
    done = run_cli(history["ctx"].settings, "tenants", "restore", "--tenant", "tr_beta", *args)
    assert done.returncode == 2 and error in done.stderr, done.stderr


def _scratch_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("deskvault-tenant-tr_beta-*")}


def test_a_copy_that_fails_midway_leaves_the_live_target_as_it_was(
    cluster: PgCluster, history: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx: WorkerContext = history["ctx"]
    databases, scratches = _databases(cluster), _scratch_folders()
    before = _fingerprint(cluster, "tr_beta")
    real = copyin.dump_stream

    def dies_midway(*args, **kwargs):
        chunks = real(*args, **kwargs)
        yield next(chunks)
        raise EngineError("pg_dump of database tr_beta failed (exit 1): the server closed the connection")

    monkeypatch.setattr(copyin, "dump_stream", dies_midway)
    request = _request(tenant="tr_beta", at=history["at"])
    with pytest.raises(EngineError, match="the server closed the connection"):
        restore_tenant(ctx, request)
    assert _databases(cluster) == databases and _fingerprint(cluster, "tr_beta") == before
    assert _scratch_folders() == scratches  # the scratch copy is gone too
    assert not [r for r in ctx.ledger.tenant_restores("tr_beta") if r["request_id"] == request.request_id]


def test_a_session_that_slips_in_before_the_swap_renames_nothing(
    cluster: PgCluster, history: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx: WorkerContext = history["ctx"]
    databases, before = _databases(cluster), _fingerprint(cluster, "tr_beta")
    with _session_on(cluster, "tr_beta"):
        # The refusal up front does not see it (it connected just after), the rename does
        monkeypatch.setattr(copyin, "sessions", lambda server, database: 0)
        with pytest.raises(EngineError, match="nothing was renamed"):
            restore_tenant(ctx, _request(tenant="tr_beta", at=history["at"], mode=REPLACE))
    assert _databases(cluster) == databases and _fingerprint(cluster, "tr_beta") == before
