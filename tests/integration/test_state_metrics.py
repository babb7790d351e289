"""The scrape-time gauges, read from a real RabbitMQ and a real ledger."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pika
import pytest
from support import worker_context

from messages.topology import dead_letter_queue
from producers.publisher import Publisher
from workers.state_metrics import CACHE_SECONDS, StateCollector

pytestmark = pytest.mark.integration

NOW = datetime(2031, 5, 1, 12, 0, tzinfo=UTC)  # later than anything other tests record


class Seconds:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(collector: StateCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


def value(collector: StateCollector, name: str, **labels: str) -> float | None:
    return samples(collector).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def quiet_export_queue(make_settings):
    """The export pool's queues, declared and empty, with no worker consuming them."""
    settings = make_settings()
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher._open()  # declares the topology
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker.url))
    channel = connection.channel()
    for queue in ("export", dead_letter_queue("export")):
        channel.queue_purge(queue)
    yield settings, channel
    for queue in ("export", dead_letter_queue("export")):
        channel.queue_purge(queue)
    connection.close()


def test_queue_depth_dead_letters_and_the_age_estimate(quiet_export_queue) -> None:
    settings, channel = quiet_export_queue
    clock = Seconds(NOW.timestamp())
    collector = StateCollector(settings, ("export",), worker_context(settings).ledger, clock=clock)

    # Given an empty queue, then everything is at rest
    assert value(collector, "deskvault_queue_ready_messages", pool="export") == 0
    assert value(collector, "deskvault_queue_oldest_ready_age_seconds", pool="export") == 0
    assert value(collector, "deskvault_exports_pending") == 0
    assert value(collector, "deskvault_state_source_up", source="rabbitmq") == 1

    # When three events and a dead letter arrive and nobody consumes
    for _ in range(3):
        channel.basic_publish("", "export", b"{}", pika.BasicProperties(delivery_mode=2))
    channel.basic_publish("", dead_letter_queue("export"), b"{}", pika.BasicProperties(delivery_mode=2))
    clock.now += CACHE_SECONDS
    assert value(collector, "deskvault_queue_ready_messages", pool="export") == 3
    assert value(collector, "deskvault_queue_dead_letters", pool="export") == 1
    assert value(collector, "deskvault_queue_consumers", pool="export") == 0
    assert value(collector, "deskvault_exports_pending") == 3
    # Then the estimated age grows from the moment the queue was seen non-empty
    clock.now += 600
    assert value(collector, "deskvault_queue_oldest_ready_age_seconds", pool="export") == 600

    # And within the cache window a second scrape reads nothing new
    channel.queue_purge("export")
    clock.now += 1
    assert value(collector, "deskvault_queue_ready_messages", pool="export") == 3
    # And after the queue drains, the age is back at 0
    clock.now += CACHE_SECONDS
    assert value(collector, "deskvault_queue_ready_messages", pool="export") == 0
    assert value(collector, "deskvault_queue_oldest_ready_age_seconds", pool="export") == 0


def test_backups_drills_and_usage_come_from_the_ledger(make_settings) -> None:
    settings = make_settings()
    ledger = worker_context(settings).ledger
    target = "main"  # the only configured target; other targets in the ledger are left out
    finished = NOW - timedelta(hours=1)
    for name, kind in ((target, "full"), (target, "log"), ("not-configured", "full")):
        ledger.record_backup(
            target=name,
            backup_id=f"{kind}-{uuid.uuid4().hex[:8]}",
            kind=kind,
            manifest_key="k",
            started_at=finished - timedelta(minutes=1),
            finished_at=finished,
            start_lsn=None,
            stop_lsn=None,
            plain_bytes=1,
            stored_bytes=1,
        )
    ledger.record_usage(target, "wal", 7, 7 * 2**20)
    collector = StateCollector(settings, ("backup", "verify"), ledger, clock=Seconds(NOW.timestamp()))

    for kind in ("full", "log"):
        assert value(
            collector, "deskvault_backup_last_success_timestamp_seconds", target=target, kind=kind
        ) == (finished.timestamp())
    names = {name for name, _ in samples(collector)}
    assert "deskvault_tenants_pending_purge" not in names  # the lifecycle pool's, not these pools'
    assert all(dict(labels).get("target") != "not-configured" for _, labels in samples(collector))
    assert value(collector, "deskvault_repository_stored_bytes", target=target, area="wal") == 7 * 2**20
    assert value(collector, "deskvault_repository_objects", target=target, area="wal") == 7

    # A failed drill after a passed one: verified keeps the passed time, last_passed drops to 0
    for drill_at, succeeded in ((NOW - timedelta(minutes=30), True), (NOW - timedelta(minutes=10), False)):
        ledger._clock = lambda at=drill_at: at  # record_drill stamps finished_at from the ledger's clock
        ledger.record_drill(
            target=target,
            drill_id=uuid.uuid4().hex,
            point_in_time=drill_at,
            succeeded=succeeded,
            duration_seconds=3,
            detail="test",
        )
    collector = StateCollector(settings, ("verify",), ledger, clock=Seconds(NOW.timestamp()))
    assert value(collector, "deskvault_restore_drill_last_passed", target=target) == 0
    assert value(collector, "deskvault_restore_verified_timestamp_seconds", target=target) == (
        (NOW - timedelta(minutes=30)).timestamp()
    )


def test_purge_state_counts_waiting_held_and_overdue_tenants(make_settings) -> None:
    settings = make_settings()
    ledger = worker_context(settings).ledger
    clock = Seconds(NOW.timestamp())
    collector = StateCollector(settings, ("lifecycle",), ledger, clock=clock)
    before = samples(collector)

    def expire(tenant: str, purge_after: datetime) -> None:
        ledger.record_account_event(
            tenant=tenant,
            event_type="account-expired",
            event_id=uuid.uuid4().hex,
            occurred_at=NOW - timedelta(days=200),
            plan="paid",
            status="expired",
            expired_at=NOW - timedelta(days=200),
            trial_started_at=None,
            purge_after=purge_after,
            allowed_from=("active", "expired"),
            detail="test",
        )

    suffix = uuid.uuid4().hex[:8]
    # Given one tenant kept until next month, one held, and one whose purge date passed 2 hours ago
    expire(f"waiting-{suffix}", NOW + timedelta(days=30))
    expire(f"held-{suffix}", NOW - timedelta(days=1))
    ledger.set_legal_hold(f"held-{suffix}", True)
    expire(f"late-{suffix}", NOW - timedelta(hours=2))

    clock.now += CACHE_SECONDS
    after = samples(collector)

    def grew(name: str) -> float:
        return after[(name, ())] - before[(name, ())]

    assert grew("deskvault_tenants_pending_purge") == 1
    assert grew("deskvault_tenants_on_legal_hold") == 1
    assert grew("deskvault_purges_due") == 1
    # Other tests' tenants may be overdue for longer (their dates are older), never for less
    assert after[("deskvault_purge_overdue_seconds", ())] >= 2 * 3600


def test_an_unreachable_broker_is_reported_and_the_ledger_still_read(make_settings) -> None:
    settings = make_settings()
    settings = replace(settings, broker=replace(settings.broker, url="amqp://guest:guest@127.0.0.1:1/"))
    collector = StateCollector(settings, ("backup",), worker_context(settings).ledger)
    assert value(collector, "deskvault_state_source_up", source="rabbitmq") == 0
    assert value(collector, "deskvault_state_source_up", source="ledger") == 1
    assert value(collector, "deskvault_queue_ready_messages", pool="backup") is None
    assert value(collector, "deskvault_jobs_running", pool="backup") is not None
