"""The scheduler against real RabbitMQ and the control database: once per slot, across replicas."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pika
import pytest
from support import worker_context

from producers.publisher import Publisher
from producers.scheduler import Scheduler

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def drain(url: str, queue: str) -> list[dict]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    events = []
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        events.append(json.loads(body)["args"][0])
    connection.close()
    return events


@pytest.fixture
def schedulers(make_settings, control_db_odbc):
    settings = make_settings()
    ledger = worker_context(settings).ledger
    # A fresh target name per test keeps the shared control database's schedule marks apart.
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher._open()
        for queue in ("backup", "verify", "export"):
            drain(settings.broker.url, queue)
        yield settings, ledger, publisher


def test_two_replicas_publish_each_slot_once_and_catch_up_only_the_newest(schedulers) -> None:
    settings, ledger, publisher = schedulers
    clock = Clock(datetime(2031, 3, 5, 10, 30, tzinfo=UTC))  # a Wednesday; a time no other test uses
    first = Scheduler(settings, ledger, publisher, clock)
    second = Scheduler(settings, ledger, publisher, clock)

    published = first.tick()
    exports = [e for e in published if e.type == "export-requested"]
    # acme is entitled to downloadable backups: tonight's (02:30) is requested once.
    assert [(e.tenant, e.kind, e.request_id) for e in exports] == [
        ("acme", "scheduled", "scheduled-20310305T0230Z")
    ]
    assert len(drain(settings.broker.url, "export")) == 1
    # (tenants that other tests expired in the shared control database are long due for purging in 2031)
    published = [e for e in published if e.type in ("backup-due", "restore-drill")]
    assert {(e.type, getattr(e, "kind", None), e.slot) for e in published} == {
        ("backup-due", "full", datetime(2031, 3, 2, 1, 0, tzinfo=UTC)),
        ("backup-due", "diff", datetime(2031, 3, 5, 10, 0, tzinfo=UTC)),
        ("backup-due", "log", datetime(2031, 3, 5, 10, 0, tzinfo=UTC)),
        ("restore-drill", None, datetime(2031, 3, 1, 5, 0, tzinfo=UTC)),  # last Saturday 05:00
    }
    assert second.tick() == []  # the other replica sees the slots (and purges) as emitted
    assert len(drain(settings.broker.url, "backup")) == 3
    assert len(drain(settings.broker.url, "verify")) == 1

    # After 9 hours of downtime only the newest missed diff and log slots are emitted, once each.
    clock.now += timedelta(hours=9)
    caught_up = [e for e in second.tick() if e.type == "backup-due"]
    assert sorted((e.kind, e.slot.hour) for e in caught_up) == [("diff", 18), ("log", 19)]
    assert first.tick() == []
    queued = drain(settings.broker.url, "backup")
    assert sorted(e["idempotency_key"] for e in queued) == sorted(e.idempotency_key for e in caught_up)


def test_scheduled_exports_resume_after_a_tick_that_died_midway(make_settings) -> None:
    names = [f"t{uuid.uuid4().hex[:10]}" for _ in range(3)]
    tenants = "".join(
        f'[tenants.{n}]\nplan = "company"\ndatabase = "{n}"\ntarget = "main"\ndownloadable_backups = true\n'
        for n in names
    )
    settings = make_settings(extra=tenants)
    ledger = worker_context(settings).ledger
    now = datetime(2031, 4, 9, 11, 0, tzinfo=UTC)  # a time no other test uses
    slot = datetime(2031, 4, 9, 2, 30, tzinfo=UTC)
    # Given a tick that published and recorded the first tenant's export, then died
    ledger.mark_emitted(f"tenant:{names[0]}", "scheduled-export", slot, "from the tick that died")
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher._open()
        drain(settings.broker.url, "export")
        # When the next tick runs
        exports = [
            e
            for e in Scheduler(settings, ledger, publisher, Clock(now)).tick()
            if e.type == "export-requested"
        ]
    # Then it requests the others (and acme), not the one already requested
    assert sorted(e.tenant for e in exports) == sorted(["acme", *names[1:]])
    assert ledger.emitted_subjects("scheduled-export", slot) >= {f"tenant:{n}" for n in names}
    # And marking a batch that overlaps marks made elsewhere (a second scheduler) is not an error
    ledger.mark_emitted_many("scheduled-export", slot, [(f"tenant:{names[1]}", "k1"), ("tenant:late", "k2")])
    assert "tenant:late" in ledger.emitted_subjects("scheduled-export", slot)
