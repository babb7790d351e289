"""Purge against real PostgreSQL (the tenant's database and the control database), SeaweedFS and RabbitMQ.

The clock is injected: the account expires at NOW and the purge runs once its window has passed.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import jsonschema
import pika
import pytest
from support import OutboundListener, clocked_context, raw_s3, wait_for

from messages.events import AccountExpired, AccountReactivated, PurgeDue
from messages.schema_files import SCHEMA_DIR
from messages.topology import POOLS
from producers.publisher import Publisher
from producers.scheduler import Scheduler
from workers.errors import PermanentError
from workers.handlers.lifecycle import handle_account_expired, handle_account_reactivated
from workers.handlers.purge import handle_purge_due
from workers.repository.errors import KeyNotFound
from workers.tenants.keys import TenantKeyDestroyed, tenant_prefix, tenant_repository

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
PURGE_AFTER = datetime(2027, 4, 2, 12, 0, tzinfo=UTC)  # paid: four months after expiry


@pytest.fixture
def purge_case(make_settings, pg_target):
    """An expired paid tenant with a database on the target and two exports under its own key."""
    tenant = f"p{uuid.uuid4().hex[:10]}"
    extra = f'[tenants.{tenant}]\nplan = "company"\ndatabase = "{tenant}"\ntarget = "main"\n'
    settings = make_settings(extra=extra)
    ctx, clock = clocked_context(settings, NOW)
    pg_target.psql(f"CREATE DATABASE {tenant}")
    pg_target.psql(
        "CREATE TABLE tickets (id int PRIMARY KEY, subject text); INSERT INTO tickets VALUES (1, 'hi')",
        tenant,
    )
    repo = tenant_repository(ctx, tenant, create=True)
    for name in ("exports/e1.dump.dv", "exports/e2.dump.dv"):
        repo.put_json(tenant_prefix(tenant) + name, {"export": name})
    handle_account_expired(ctx, AccountExpired.new(tenant=tenant, plan="paid", expired_at=NOW))
    return ctx, clock, tenant, pg_target


def _database_exists(cluster, name: str) -> bool:
    return cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'").strip() == "1"


def _drain_queues(url: str) -> None:
    """The scheduler's tick also publishes backup events; keep them from later tests' workers."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for pool in POOLS:
        channel.queue_purge(pool)
    connection.close()


def test_the_sweeper_emits_the_purge_once_the_window_has_passed(purge_case) -> None:
    ctx, clock, tenant, _ = purge_case
    settings = ctx.settings
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        scheduler = Scheduler(settings, ctx.ledger, publisher, clock)
        clock.now = PURGE_AFTER - timedelta(minutes=1)
        early = [e for e in scheduler.tick() if isinstance(e, PurgeDue) and e.tenant == tenant]
        clock.now = PURGE_AFTER + timedelta(minutes=1)
        due = [e for e in scheduler.tick() if isinstance(e, PurgeDue) and e.tenant == tenant]
        again = [e for e in scheduler.tick() if isinstance(e, PurgeDue) and e.tenant == tenant]
    _drain_queues(settings.broker.url)
    assert early == []
    assert [(e.tenant, e.purge_after) for e in due] == [(tenant, PURGE_AFTER)]
    assert again == []  # emitted once; the worker's ledger deduplicates a re-emission anyway


def test_a_purge_removes_the_database_the_exports_and_the_key_and_is_audited(purge_case) -> None:
    ctx, clock, tenant, cluster = purge_case
    key = tenant_prefix(tenant) + "exports/e1.dump.dv"
    s3 = raw_s3(ctx.settings)
    full_key = ctx.repository.store.full_key(key)
    kept_copy = s3.get_object(Bucket=ctx.settings.repository.bucket, Key=full_key)["Body"].read()

    clock.now = PURGE_AFTER + timedelta(hours=1)
    event = PurgeDue.new(tenant=tenant, purge_after=PURGE_AFTER)
    outcome = handle_purge_due(ctx, event)

    assert outcome.startswith(f"purged tenant {tenant}: database main/{tenant} dropped, 2 object version(s)")
    assert not _database_exists(cluster, tenant)
    assert list(ctx.repository.list_keys(tenant_prefix(tenant))) == []
    with pytest.raises(TenantKeyDestroyed):
        tenant_repository(ctx, tenant)
    # A copy of the ciphertext that survived somewhere is unreadable: its key no longer exists.
    s3.put_object(Bucket=ctx.settings.repository.bucket, Key=full_key, Body=kept_copy)
    with pytest.raises(KeyNotFound):
        ctx.repository.get_json(key)
    ctx.repository.delete(key)

    account = ctx.ledger.account(tenant)
    assert (account["status"], account["purged_at"]) == ("purged", clock.now)
    audit = ctx.ledger.purge_audit(tenant)
    assert audit["event_id"] == event.event_id and audit["purge_after"] == PURGE_AFTER
    assert json.loads(audit["detail"]) == {
        "database": f"main/{tenant}",
        "database_dropped": True,
        "uploads_aborted": 0,
        "objects_deleted": 2,
        "tenant_key_destroyed": True,
        "resumed": False,
    }
    # Redelivered: one effect.
    assert handle_purge_due(ctx, event) is None


def test_a_purge_killed_midway_completes_on_redelivery(purge_case, monkeypatch) -> None:
    ctx, clock, tenant, cluster = purge_case
    clock.now = PURGE_AFTER + timedelta(hours=1)
    event = PurgeDue.new(tenant=tenant, purge_after=PURGE_AFTER)
    store = ctx.repository.store
    real_delete = store.delete_everything

    def crash(prefix: str) -> int:
        raise ConnectionError("storage went away mid-purge")

    monkeypatch.setattr(store, "delete_everything", crash)
    with pytest.raises(ConnectionError):
        handle_purge_due(ctx, event)
    assert not _database_exists(cluster, tenant)  # step 2 was done
    assert ctx.ledger.account(tenant)["status"] == "purging"

    monkeypatch.setattr(store, "delete_everything", real_delete)
    outcome = handle_purge_due(ctx, event)
    assert "already gone, 2 object version(s) deleted, data key destroyed" in outcome
    assert ctx.ledger.account(tenant)["status"] == "purged"
    assert json.loads(ctx.ledger.purge_audit(tenant)["detail"])["resumed"] is True


def test_a_legal_hold_blocks_the_purge_until_released(purge_case) -> None:
    ctx, clock, tenant, cluster = purge_case
    ctx.ledger.set_legal_hold(tenant, True)
    clock.now = PURGE_AFTER + timedelta(days=30)
    assert tenant not in [t for t, _ in ctx.ledger.due_purges(clock.now)]
    event = PurgeDue.new(tenant=tenant, purge_after=PURGE_AFTER)
    with pytest.raises(PermanentError, match=rf"tenant: {tenant} is under a legal hold"):
        handle_purge_due(ctx, event)
    assert _database_exists(cluster, tenant)
    assert ctx.ledger.account(tenant)["status"] == "expired"

    ctx.ledger.set_legal_hold(tenant, False)
    assert (tenant, PURGE_AFTER) in ctx.ledger.due_purges(clock.now)
    assert handle_purge_due(ctx, event).startswith(f"purged tenant {tenant}")


def test_a_purge_that_is_not_due_or_was_cancelled_is_refused(purge_case) -> None:
    ctx, clock, tenant, cluster = purge_case
    early = PurgeDue.new(tenant=tenant, purge_after=PURGE_AFTER)
    with pytest.raises(PermanentError, match=r"purge_after: 2027-04-02T12:00:00Z has not come yet"):
        handle_purge_due(ctx, early)

    clock.now = NOW + timedelta(days=10)
    handle_account_reactivated(ctx, AccountReactivated.new(tenant=tenant, occurred_at=clock.now))
    clock.now = PURGE_AFTER + timedelta(days=1)
    late = PurgeDue.new(tenant=tenant, purge_after=PURGE_AFTER, idempotency_key=f"late-{uuid.uuid4().hex}")
    with pytest.raises(PermanentError, match=rf"tenant: {tenant} is active again"):
        handle_purge_due(ctx, late)
    assert _database_exists(cluster, tenant)
    assert len(list(ctx.repository.list_keys(tenant_prefix(tenant)))) == 2


def test_the_saas_is_told_a_week_before_a_purge_once(purge_case) -> None:
    ctx, clock, tenant, _ = purge_case
    settings = ctx.settings
    listener = OutboundListener(settings.broker.url, "purge-upcoming")
    try:
        with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
            scheduler = Scheduler(settings, ctx.ledger, publisher, clock)
            clock.now = PURGE_AFTER - timedelta(days=8)
            scheduler.tick()
            clock.now = PURGE_AFTER - timedelta(days=6)
            scheduler.tick()
            scheduler.tick()
        _drain_queues(settings.broker.url)
        told = [m for m in wait_for(listener.messages, what="purge-upcoming") if m["tenant"] == tenant]
    finally:
        listener.close()
    assert [m["purge_after"] for m in told] == ["2027-04-02T12:00:00Z"]
    schema = json.loads((SCHEMA_DIR / "outbound" / "purge-upcoming.v1.schema.json").read_text())
    jsonschema.validate(told[0], schema)
