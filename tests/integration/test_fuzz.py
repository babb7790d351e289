"""Hostile input through real pools: hypothesis generates bytes, JSON, envelopes with junk events and
valid events with one field broken; sent to every pool with valid events between them. No worker
crashes, every bad message is dead-lettered with a reason, and the valid events around them are done."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest
from dramatiq import Worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from support import wait_for, worker_context

from messages.envelope import MAX_MESSAGE_BYTES, wrap
from messages.events import AccountExpired, BackupDue, Event, ExportRequested, RestoreDrill, SnapshotDue
from messages.topology import EVENT_POOL, POOLS, actor_name, dead_letter_queue, delay_queue
from producers.publisher import Publisher
from workers import context
from workers.actors import build_broker
from workers.broker import REASON_HEADER

pytestmark = pytest.mark.integration

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=12,
)


class Pools:
    """Every pool running in one in-process dramatiq worker, with a tenant, a server and jobs of its own."""

    def __init__(self, make_settings, directory: Path) -> None:
        self.tenant = f"t{uuid.uuid4().hex[:10]}"
        self.server = f"s{uuid.uuid4().hex[:8]}"
        (directory / "files").mkdir()
        self.settings = make_settings(
            extra=(
                f'[tenants.{self.tenant}]\nplan = "paid"\ndatabase = "{self.tenant}"\ntarget = "main"\n'
                f'[servers.{self.server}]\ndriver = "files"\npaths = ["{directory / "files"}"]\n'
            )
        )
        self.ctx = worker_context(self.settings)
        context.configure(self.ctx)
        with Publisher(self.settings.broker.url, delivery_limit=self.settings.broker.delivery_limit) as p:
            p._open()
        self.connection = pika.BlockingConnection(pika.URLParameters(self.settings.broker.url))
        self.channel = self.connection.channel()
        for pool in POOLS:
            for queue in (pool, delay_queue(pool), dead_letter_queue(pool)):
                self.channel.queue_purge(queue)
        self.channel.confirm_delivery()
        self.broker, _ = build_broker(self.settings)
        self.worker = Worker(self.broker, worker_threads=4, worker_timeout=100)
        self.worker.start()
        self.sequence = 0

    def valid(self, pool: str) -> Event:
        """A cheap valid event for `pool` (a duplicate of a done job for the costly kinds)."""
        self.sequence += 1
        now = datetime.now(UTC).replace(microsecond=0)
        key = f"fuzz-{uuid.uuid4().hex}"
        if pool == "backup":  # a log backup of a target with no full: handled, "not done"
            return BackupDue.new(target="main", kind="log", slot=now, idempotency_key=key)
        if pool == "lifecycle":
            expired = now - timedelta(days=1, seconds=self.sequence)
            return AccountExpired.new(
                tenant=self.tenant, plan="paid", expired_at=expired, idempotency_key=key
            )
        if pool == "snapshot":
            return SnapshotDue.new(server=self.server, slot=now, idempotency_key=key)
        event = (
            ExportRequested.new(
                tenant=self.tenant, request_id=uuid.uuid4().hex, requested_by="ops@example.com"
            )
            if pool == "export"
            else RestoreDrill.new(target="main", slot=now, idempotency_key=key)
        )
        self.ctx.ledger.claim(
            event.idempotency_key, pool=pool, event_type=event.type, event_id=event.event_id, owner="fuzz"
        )
        self.ctx.ledger.complete(event.idempotency_key, "fuzz", "done by an earlier delivery")
        return event

    def send(self, pool: str, body: bytes) -> None:
        self.channel.basic_publish("", pool, body, pika.BasicProperties(delivery_mode=2), mandatory=True)

    def close(self) -> None:
        self.worker.stop(timeout=10_000)
        self.broker.close()
        self.connection.close()


@pytest.fixture
def fuzz_pools(make_settings, tmp_path):
    """Set up once per test function, so shared by all of hypothesis's examples."""
    pools = Pools(make_settings, tmp_path)
    yield pools
    pools.close()


def _envelope(pool: str, args: object, actor: str | None = None) -> bytes:
    return json.dumps(
        {
            "queue_name": pool,
            "actor_name": actor or next(actor_name(t) for t, p in EVENT_POOL.items() if p == pool),
            "args": args,
            "kwargs": {},
            "options": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
        }
    ).encode()


def _junk(pool: str) -> st.SearchStrategy[bytes]:
    """Messages no pool can ever accept."""
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.lists(json_values, max_size=2).map(lambda args: _envelope(pool, args)),
        st.dictionaries(st.text(max_size=12), json_values, max_size=6).map(lambda d: _envelope(pool, [d])),
        st.text(max_size=20).map(lambda actor: _envelope(pool, [{}], actor=actor)),
        st.just(b"{" + b" " * MAX_MESSAGE_BYTES + b"}"),
    )


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_hostile_messages_are_dead_lettered_and_valid_ones_around_them_are_done(fuzz_pools, data) -> None:
    pools: Pools = fuzz_pools
    before = _counted()
    sent_valid: list[Event] = []
    surely_bad = maybe_bad = 0
    # Given 30 hostile messages across the pools, each followed by a valid event of the same pool
    for _ in range(30):
        pool = data.draw(st.sampled_from(POOLS))
        kind = data.draw(st.sampled_from(["junk", "broken field"]))
        if kind == "junk":
            body = data.draw(_junk(pool))
            surely_bad += 1
        else:  # a valid event with one field replaced or removed: by chance it may still be valid
            fields = pools.valid(pool).to_dict()
            name = data.draw(st.sampled_from(sorted(fields)))
            if data.draw(st.booleans()):
                fields[name] = data.draw(json_values)
            else:
                del fields[name]
            body = _envelope(pool, [fields])
            maybe_bad += 1
        pools.send(pool, body)
        event = pools.valid(pool)
        pools.send(pool, wrap(event))
        sent_valid.append(event)

    # Then every valid event is done, and every message is accounted for: handled or dead-lettered
    for event in sent_valid:
        wait_for(
            lambda e=event: (job := pools.ctx.ledger.job(e.idempotency_key)) and job.state == "done",
            timeout=120,
            what=f"{event.type} {event.idempotency_key} to be done",
        )
    total = len(sent_valid) + surely_bad + maybe_bad
    wait_for(
        lambda: sum(_counted().values()) - sum(before.values()) >= total, timeout=60, what="all to finish"
    )
    grown = {k: v - before[k] for k, v in _counted().items()}
    assert grown["handled"] + grown["dead"] == total
    assert surely_bad <= grown["dead"] <= surely_bad + maybe_bad
    # And each dead letter carries a reason
    reasons = _drain_dead_letters(pools)
    assert len(reasons) == grown["dead"]
    assert all(reason for reason in reasons)
    assert pools.worker.worker_threads == 4 and all(t.is_alive() for t in pools.worker.workers)


def _counted() -> dict[str, float]:
    def total(name: str) -> float:
        return sum(s.value for metric in REGISTRY.collect() for s in metric.samples if s.name == name)

    return {
        "handled": total("deskvault_events_handled_total"),
        "dead": total("deskvault_events_dead_lettered_total"),
    }


def _drain_dead_letters(pools: Pools) -> list[str]:
    reasons = []
    for pool in POOLS:
        while True:
            method, properties, _ = pools.channel.basic_get(dead_letter_queue(pool), auto_ack=True)
            if method is None:
                break
            reasons.append((properties.headers or {}).get(REASON_HEADER, ""))
    return reasons


def test_options_that_would_steer_the_worker_are_dead_lettered_and_never_run(fuzz_pools) -> None:
    pools: Pools = fuzz_pools
    before = _counted()
    # A valid event, carrying a pipeline to another actor, a callback and a time limit from the wire
    event = pools.valid("lifecycle")
    steered = json.loads(wrap(event))
    purge = _envelope("lifecycle", [{"tenant": pools.tenant}], actor="purge_due")
    steered["options"] = {"pipe_target": json.loads(purge), "on_success": "purge_due", "time_limit": 1}
    pools.send("lifecycle", json.dumps(steered).encode())
    wait_for(lambda: _counted()["dead"] - before["dead"] >= 1, timeout=60, what="the dead letter")
    (reason,) = _drain_dead_letters(pools)
    assert "envelope.options." in reason and "not accepted from a message" in reason
    assert pools.ctx.ledger.job(event.idempotency_key) is None  # the event itself never ran either
    assert pools.ctx.ledger.account(pools.tenant) is None  # nor anything piped after it
