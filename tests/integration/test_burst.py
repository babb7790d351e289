"""10,000 events through every pool of a running `deskvault worker`: the counters it serves add up to
what was sent, and every gauge is back at rest once the queues drain.

The events are cheap on purpose, so the test measures bookkeeping, not backups: hourly log backups of a
target that has no full yet (a real handler run: it lists the repository and records its outcome),
account expiries, duplicates of snapshots, exports and drills already done, events for an unknown
target, and garbage.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, start_deskvault, worker_context

from messages.envelope import wrap
from messages.events import AccountExpired, BackupDue, Event, ExportRequested, RestoreDrill, SnapshotDue
from messages.topology import EVENT_POOL, POOLS, dead_letter_queue, delay_queue
from producers.publisher import Publisher

pytestmark = pytest.mark.integration

PER_POOL = 2_000
GARBAGE_PER_POOL = 100
UNKNOWN_TARGET = 100


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by_pool_and_type(metrics: dict, name: str) -> Counter:
    totals: Counter = Counter()
    for (sample, labels), value in metrics.items():
        if sample == name:
            label = dict(labels)
            totals[(label["pool"], label["type"])] += int(value)
    return totals


def per_pool(metrics: dict, name: str) -> dict[str, float]:
    return {dict(labels)["pool"]: value for (sample, labels), value in metrics.items() if sample == name}


def test_a_burst_of_10000_events_adds_up_and_leaves_every_gauge_at_rest(
    make_settings, tmp_path: Path
) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    server = f"s{uuid.uuid4().hex[:8]}"
    (tmp_path / "files").mkdir()
    settings = make_settings(
        lease_seconds=30,
        extra=(
            f'[tenants.{tenant}]\nplan = "paid"\ndatabase = "{tenant}"\ntarget = "main"\n'
            f'[servers.{server}]\ndriver = "files"\npaths = ["{tmp_path / "files"}"]\n'
        ),
    )
    ctx = worker_context(settings)
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker.url))
    channel = connection.channel()
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher._open()  # declares the topology
    for pool in POOLS:
        for queue in (pool, delay_queue(pool), dead_letter_queue(pool)):
            channel.queue_purge(queue)

    # Given a snapshot, an export and a drill already done (as an earlier delivery would have left them)
    now = datetime.now(UTC).replace(microsecond=0)
    done_before = [
        SnapshotDue.new(server=server, slot=now),
        ExportRequested.new(tenant=tenant, request_id=uuid.uuid4().hex, requested_by="ops@example.com"),
        RestoreDrill.new(target="main", slot=now, idempotency_key=f"burst-drill-{uuid.uuid4().hex}"),
    ]
    for event in done_before:
        ctx.ledger.claim(
            event.idempotency_key,
            pool=EVENT_POOL[event.type],
            event_type=event.type,
            event_id=event.event_id,
            owner="burst-test",
        )
        ctx.ledger.complete(event.idempotency_key, "burst-test", "done by an earlier delivery")

    # And the 10,000 messages: per pool 1,900 events and 100 garbage bodies
    events: dict[str, list[Event]] = {pool: [] for pool in POOLS}
    useful = PER_POOL - GARBAGE_PER_POOL
    unique = uuid.uuid4().hex  # the control database is shared by the session: no slot-based keys
    events["backup"] = [
        BackupDue.new(
            target="main", kind="log", slot=now - timedelta(minutes=i), idempotency_key=f"burst-{unique}-{i}"
        )
        for i in range(useful - UNKNOWN_TARGET)
    ] + [
        BackupDue.new(target="nowhere", kind="full", slot=now - timedelta(minutes=i))
        for i in range(UNKNOWN_TARGET)
    ]
    events["lifecycle"] = [
        AccountExpired.new(tenant=tenant, plan="paid", expired_at=now - timedelta(days=1, seconds=i))
        for i in range(useful)
    ]
    for event in done_before:
        events[EVENT_POOL[event.type]] = [event] * useful
    assert sum(map(len, events.values())) + GARBAGE_PER_POOL * len(POOLS) == 10_000

    port = free_port()
    worker_args = ("worker", "--processes", "2", "--threads", "4", "--metrics-port", str(port))
    worker = start_deskvault(settings, tmp_path / "worker.log", "--log-level", "WARNING", *worker_args)
    try:
        # When they are all published (confirmed), interleaved across the pools, while the workers consume
        channel.confirm_delivery()
        started = time.monotonic()
        for i in range(PER_POOL):
            for pool in POOLS:
                body = wrap(events[pool][i]) if i < useful else b"\x00not json" + str(i).encode()
                channel.basic_publish("", pool, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
        published = time.monotonic() - started

        def finished() -> dict | None:
            metrics = scrape(port)
            handled = sum(by_pool_and_type(metrics, "deskvault_events_handled_total").values())
            dead = sum(by_pool_and_type(metrics, "deskvault_events_dead_lettered_total").values())
            return metrics if handled + dead >= 10_000 else None

        deadline = time.monotonic() + 600
        while (metrics := _try(finished)) is None:
            assert worker.poll() is None, f"the worker exited: see {tmp_path / 'worker.log'}"
            assert time.monotonic() < deadline, "the burst was not drained within 10 minutes"
            time.sleep(1)
        drained = time.monotonic() - started
        print(f"\n10,000 messages published in {published:.1f} s, all handled after {drained:.1f} s")

        # Then handled, duplicates, failures and dead letters add up to what was sent, per pool and type
        handled = by_pool_and_type(metrics, "deskvault_events_handled_total")
        duplicates = by_pool_and_type(metrics, "deskvault_events_duplicate_total")
        failed = by_pool_and_type(metrics, "deskvault_events_failed_total")
        retried = by_pool_and_type(metrics, "deskvault_events_retried_total")
        dead = by_pool_and_type(metrics, "deskvault_events_dead_lettered_total")
        logs = useful - UNKNOWN_TARGET
        assert +handled == {
            ("backup", "backup-due"): logs,
            ("lifecycle", "account-expired"): useful,
            ("snapshot", "snapshot-due"): useful,
            ("export", "export-requested"): useful,
            ("verify", "restore-drill"): useful,
        }
        assert +duplicates == {
            ("snapshot", "snapshot-due"): useful,
            ("export", "export-requested"): useful,
            ("verify", "restore-drill"): useful,
        }
        assert +failed == {("backup", "backup-due"): UNKNOWN_TARGET}  # refused for good, not retried
        assert +retried == {}
        assert +dead == {
            ("backup", "backup-due"): UNKNOWN_TARGET,
            **{(pool, "unknown"): GARBAGE_PER_POOL for pool in POOLS},
        }
        # And every event a worker started, it finished
        waits = by_pool_and_type(metrics, "deskvault_event_wait_seconds_count")
        durations = by_pool_and_type(metrics, "deskvault_handler_duration_seconds_count")
        assert waits == durations == handled + failed
        # And the ledger agrees: one job per distinct log backup and expiry, all done
        assert ctx.ledger.job(events["backup"][0].idempotency_key).state == "done"

        # And once the state gauges are read again, every one of them is at rest, the dead letters waiting
        # with their count for an operator to look at. The counters move when a worker rejects a
        # message; RabbitMQ moves it to the dead-letter queue once the consumer's reject reaches it, a
        # moment later: a reading may catch the last few on their way.
        dead_letters = {
            pool: GARBAGE_PER_POOL + (UNKNOWN_TARGET if pool == "backup" else 0) for pool in POOLS
        }

        def at_rest() -> dict | None:
            m = scrape(port)
            resting = (
                set(per_pool(m, "deskvault_queue_ready_messages").values()) == {0}
                and set(per_pool(m, "deskvault_queue_oldest_ready_age_seconds").values()) == {0}
                and set(per_pool(m, "deskvault_jobs_running").values()) == {0}
                and m[("deskvault_exports_pending", ())] == 0
                and per_pool(m, "deskvault_queue_dead_letters") == dead_letters
            )
            return m if resting else None

        deadline = time.monotonic() + 30
        while (rest := _try(at_rest)) is None:
            assert time.monotonic() < deadline, f"gauges not at rest: {scrape(port)}"
            time.sleep(1)
        assert per_pool(rest, "deskvault_queue_consumers") == {pool: 2 for pool in POOLS}
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        for pool in POOLS:
            channel.queue_purge(dead_letter_queue(pool))
        connection.close()


def _try(probe):
    try:
        return probe()
    except OSError:  # the worker's metrics port is not up yet
        return None
