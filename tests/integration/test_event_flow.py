"""Events through real RabbitMQ into dramatiq workers: topology, idempotency, dead letters with reasons."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from urllib.parse import unquote, urlparse

import pika
import pytest
from dramatiq import Worker
from prometheus_client import REGISTRY
from support import run_cli, wait_for, worker_context

from messages.envelope import wrap
from messages.events import AccountExpired, AccountReactivated, BackupDue, ExportRequested, SnapshotDue
from messages.schema_files import load_schema
from messages.topology import POOLS, dead_letter_queue, delay_queue
from producers.publisher import Publisher
from workers import context
from workers.actors import build_broker
from workers.broker import REASON_HEADER
from workers.repository import catalog

pytestmark = pytest.mark.integration


@pytest.fixture
def pools(make_settings):
    """Given all four pools running in-process (2 threads) against RabbitMQ, PostgreSQL and SeaweedFS."""
    # A short lease, so a duplicate that finds its job busy looks again within seconds.
    # `down` is a target whose database never answers (nothing listens on port 1).
    down = '[targets.down]\nengine = "postgresql"\nconninfo = "host=127.0.0.1 port=1 user=postgres"\n'
    settings = make_settings(servers={"app1": "0 3 * * *"}, lease_seconds=4, extra=down)
    ctx = worker_context(settings)
    context.configure(ctx)
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher._open()  # declares the topology
    _purge_all(settings.broker.url)
    broker, _ = build_broker(settings)
    worker = Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    yield settings, ctx
    worker.stop(timeout=10_000)
    broker.close()


def _channel(url: str):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    return connection, connection.channel()


def _purge_all(url: str) -> None:
    connection, channel = _channel(url)
    for pool in POOLS:
        for queue in (pool, delay_queue(pool), dead_letter_queue(pool)):
            channel.queue_purge(queue)
    connection.close()


def publish_raw(url: str, queue: str, body: bytes) -> None:
    """What a service in another language does: plain AMQP, no dramatiq, publisher confirms."""
    connection, channel = _channel(url)
    channel.confirm_delivery()
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    connection.close()


def next_dead_letter(url: str, pool: str, timeout: float = 30.0) -> tuple[bytes, dict]:
    connection, channel = _channel(url)
    try:

        def get():
            method, properties, body = channel.basic_get(dead_letter_queue(pool), auto_ack=True)
            return (body, properties.headers or {}) if method else None

        return wait_for(get, timeout=timeout, what=f"a dead letter in {dead_letter_queue(pool)}")
    finally:
        connection.close()


def job_done(ctx, key: str):
    return wait_for(lambda: (j := ctx.ledger.job(key)) and j.state == "done" and j, what=f"job {key} done")


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_pool_queues_are_quorum_queues_with_a_delivery_limit_and_dead_letter_queue(pools) -> None:
    settings, _ = pools
    vhost = unquote(urlparse(settings.broker.url).path[1:])
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--formatter", "json", "name", "type", "arguments"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    queues = {q["name"]: q for q in json.loads(listing.stdout)}
    for pool in POOLS:
        # rabbitmqctl lists arguments as [name, AMQP type, value] triples
        args = {name: value for name, _type, value in queues[pool]["arguments"]}
        assert queues[pool]["type"] == "quorum"
        assert args["x-delivery-limit"] == settings.broker.delivery_limit
        assert args["x-dead-letter-routing-key"] == dead_letter_queue(pool)
        assert queues[dead_letter_queue(pool)]["type"] == "quorum"


def test_the_same_backup_due_published_twice_gives_one_backup(pools) -> None:
    settings, ctx = pools
    slot = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)
    event = BackupDue.new(target="main", kind="full", slot=slot, idempotency_key=f"dup-{uuid.uuid4().hex}")
    before = counter("deskvault_events_duplicate_total", pool="backup", type="backup-due")

    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)
        publisher.publish(
            BackupDue.new(target="main", kind="full", slot=slot, idempotency_key=event.idempotency_key)
        )

    job = job_done(ctx, event.idempotency_key)
    wait_for(
        lambda: counter("deskvault_events_duplicate_total", pool="backup", type="backup-due") == before + 1,
        what="the second delivery to be skipped as a duplicate",
    )
    assert job.attempts == 1
    assert job.outcome.startswith("full backup ")
    assert [m["backup_id"] for m in catalog.list_manifests(ctx.repository, "main")] == [
        catalog.backup_id_for("full", slot)
    ]


def test_a_database_that_stays_down_is_retried_with_backoff_then_dead_lettered(pools) -> None:
    settings, ctx = pools
    labels = {"pool": "backup", "type": "backup-due"}
    before = {
        name: counter(name, **labels)
        for name in (
            "deskvault_events_failed_total",
            "deskvault_events_retried_total",
            "deskvault_events_dead_lettered_total",
        )
    }
    event = BackupDue.new(target="down", kind="full", slot=datetime.now(UTC).replace(microsecond=0))

    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)

    # Then after the first attempt and max_retries (2) retries, it is dead-lettered saying why
    body, headers = next_dead_letter(settings.broker.url, "backup")
    assert json.loads(body)["args"][0]["idempotency_key"] == event.idempotency_key
    assert headers[REASON_HEADER].startswith("after 3 attempts: EngineError: target down: ")
    grown = {name: counter(name, **labels) - value for name, value in before.items()}
    assert grown == {
        "deskvault_events_failed_total": 3,
        "deskvault_events_retried_total": 2,
        "deskvault_events_dead_lettered_total": 1,
    }
    job = ctx.ledger.job(event.idempotency_key)
    assert job.state == "failed" and job.attempts == 3


def test_garbage_is_dead_lettered_with_a_reason_and_the_worker_goes_on(pools) -> None:
    settings, ctx = pools
    garbage = b"\x00this is not json{"
    publish_raw(settings.broker.url, "lifecycle", garbage)

    body, headers = next_dead_letter(settings.broker.url, "lifecycle")
    assert body == garbage  # kept byte for byte for inspection and replay
    assert "not a dramatiq message" in headers[REASON_HEADER]

    event = AccountExpired.new(tenant="acme", plan="paid", expired_at=datetime(2026, 11, 1, tzinfo=UTC))
    publish_raw(settings.broker.url, "lifecycle", wrap(event))
    assert job_done(ctx, event.idempotency_key).outcome.startswith("recorded: tenant acme (paid)")
    assert ctx.ledger.account("acme")["status"] == "expired"


def test_an_expiry_for_an_unknown_tenant_is_dead_lettered_with_the_reason(pools) -> None:
    settings, ctx = pools
    event = AccountExpired.new(tenant="nobody", plan="paid", expired_at=datetime(2026, 11, 1, tzinfo=UTC))
    publish_raw(settings.broker.url, "lifecycle", wrap(event))
    body, headers = next_dead_letter(settings.broker.url, "lifecycle")
    assert json.loads(body)["args"][0]["event_id"] == event.event_id
    assert "tenant: 'nobody' is not a known tenant" in headers[REASON_HEADER]
    assert ctx.ledger.account("nobody") is None


def test_an_export_outside_the_restorable_window_is_dead_lettered_with_the_reason(pools) -> None:
    settings, ctx = pools
    as_of = datetime(2020, 1, 1, tzinfo=UTC)
    event = ExportRequested.new(tenant="acme", request_id=uuid.uuid4().hex, requested_by="ann", as_of=as_of)
    publish_raw(settings.broker.url, "export", wrap(event))
    body, headers = next_dead_letter(settings.broker.url, "export")
    assert json.loads(body)["args"][0]["event_id"] == event.event_id
    assert "as_of: " in headers[REASON_HEADER]
    assert ctx.ledger.job(event.idempotency_key) is None  # refused before any work was claimed


def _envelope_with(event_fields: dict, **envelope: object) -> bytes:
    message = {
        "queue_name": "backup",
        "actor_name": "backup_due",
        "args": [event_fields],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1764300000000,
    }
    message.update(envelope)
    return json.dumps(message).encode()


def _valid_backup_fields() -> dict:
    return BackupDue.new(target="main", kind="full", slot=datetime(2026, 1, 4, 1, 0, tzinfo=UTC)).to_dict()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f.pop("kind"), "kind"),
        (lambda f: f.update(version=2), "version"),
        (lambda f: f.update(type="backup-overdue"), "type"),
        (lambda f: f.update(kind=3), "kind"),
        (lambda f: f.update(slot="yesterday"), "slot"),
        (lambda f: f.update(colour="blue"), "colour"),
        (lambda f: f.update(target="nowhere"), "target: 'nowhere' is not configured"),
        (lambda f: f.update(target="x" * 70_000), "(payload)"),
    ],
    ids=[
        "missing",
        "version",
        "unknown-type",
        "wrong-type",
        "bad-timestamp",
        "extra",
        "unknown-target",
        "oversized",
    ],
)
def test_bad_events_are_dead_lettered_naming_the_field_without_side_effects(pools, mutate, reason) -> None:
    settings, ctx = pools
    fields = _valid_backup_fields()
    mutate(fields)
    body = _envelope_with(fields)
    publish_raw(settings.broker.url, "backup", body)

    dead_body, headers = next_dead_letter(settings.broker.url, "backup")

    assert dead_body == body
    assert reason in headers[REASON_HEADER]
    assert ctx.ledger.job(fields.get("idempotency_key", "")) is None  # nothing half-done
    assert catalog.list_manifests(ctx.repository, "main") == []


def test_an_envelope_for_another_pool_is_dead_lettered(pools) -> None:
    settings, _ = pools
    body = _envelope_with(_valid_backup_fields(), actor_name="export_requested")
    publish_raw(settings.broker.url, "backup", body)
    _, headers = next_dead_letter(settings.broker.url, "backup")
    assert "envelope.actor_name" in headers[REASON_HEADER]


def test_each_pool_handles_its_events_honestly(pools) -> None:
    settings, ctx = pools
    snapshot = SnapshotDue.new(server="app1", slot=datetime(2026, 11, 28, 3, 0, tzinfo=UTC))
    export = ExportRequested.new(
        tenant="acme", request_id=uuid.uuid4().hex, requested_by="admin@acme.example"
    )
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(snapshot)
        publisher.publish(export)
    # app1 has no snapshot driver configured: refused with the reason, not pretended
    _, headers = next_dead_letter(settings.broker.url, "snapshot")
    assert "servers.app1.driver: not set" in headers[REASON_HEADER]
    outcome = job_done(ctx, export.idempotency_key).outcome
    assert outcome.startswith("export ") and " of tenant acme ready: " in outcome


def test_a_worker_process_in_burst_mode_handles_a_cli_published_event_and_exits(make_settings) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    tenant_config = f'[tenants.{tenant}]\nplan = "trial"\ndatabase = "{tenant}"\ntarget = "main"\n'
    settings = make_settings(extra=tenant_config)
    worker_context(settings)  # migrated control database and bucket
    base = [sys.executable, "-m", "deskvault.cli", "--config", str(settings.source)]
    published = subprocess.run(
        [
            *base,
            "publish",
            "account-expired",
            "--tenant",
            tenant,
            "--plan",
            "trial",
            "--expired-at",
            "2026-11-01T00:00:00Z",
            "--trial-started-at",
            "2026-10-01T00:00:00Z",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert published.returncode == 0, published.stderr
    key = json.loads(published.stdout)["idempotency_key"]

    worker = subprocess.run(
        [*base, "worker", "--pool", "lifecycle", "--burst", "--no-metrics"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert worker.returncode == 0, worker.stderr[-2000:]
    job = worker_context(settings).ledger.job(key)
    assert job is not None and job.state == "done"


def test_publish_rejects_bad_fields_naming_them(make_settings) -> None:
    settings = make_settings()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deskvault.cli",
            "--config",
            str(settings.source),
            "publish",
            "backup-due",
            "--target",
            "main",
            "--kind",
            "weekly",
            "--slot",
            "2026-11-28T10:00:00Z",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "kind:" in result.stderr


def test_a_job_whose_worker_died_is_finished_by_the_redelivery(make_settings) -> None:
    # Given a worker that claimed an event's job and died (its lease of 2 s is not renewed)
    settings = make_settings(lease_seconds=2)
    ctx = worker_context(settings)
    context.configure(ctx)
    event = AccountExpired.new(
        tenant="acme",
        plan="paid",
        expired_at=datetime(2026, 10, 1, tzinfo=UTC),
        idempotency_key=f"crash-{uuid.uuid4().hex}",
    )
    assert (
        ctx.ledger.claim(
            event.idempotency_key,
            pool="lifecycle",
            event_type=event.type,
            event_id=event.event_id,
            owner="dead-worker",
        ).status
        == "claimed"
    )
    broker, _ = build_broker(settings)
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        # When RabbitMQ redelivers the event
        publish_raw(settings.broker.url, "lifecycle", wrap(event))

        # Then the live worker waits out the dead one's lease, takes the job over and does it once
        job = wait_for(
            lambda: (j := ctx.ledger.job(event.idempotency_key)) and j.state == "done" and j,
            timeout=60,
            what="the job to be taken over",
        )
        assert job.attempts == 2
        assert job.lease_owner is None and job.outcome.startswith("recorded:")
    finally:
        worker.stop(timeout=10_000)
        broker.close()


def test_an_event_built_from_the_published_json_schema_example_is_handled(pools) -> None:
    # Given a service in another language that only read messages/schemas/: its example event, wrapped
    # in the documented envelope by hand, published with plain AMQP
    settings, ctx = pools
    event = dict(load_schema("account-reactivated")["examples"][0])
    event.update(event_id=str(uuid.uuid4()), idempotency_key=f"schema-example-{uuid.uuid4().hex}")
    envelope = {
        "queue_name": "lifecycle",
        "actor_name": "account_reactivated",
        "args": [event],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1764300000000,
    }
    publish_raw(settings.broker.url, "lifecycle", json.dumps(envelope).encode())

    # Then the lifecycle pool handles it
    job = job_done(ctx, event["idempotency_key"])
    # (if an earlier test expired this tenant, the outcome goes on to name the cancelled purge)
    assert job.outcome.startswith(f"recorded: tenant {event['tenant']} reactivated")
    assert ctx.ledger.account(event["tenant"])["status"] == "active"


def test_dead_letters_are_listed_with_reasons_dropped_and_replayed_from_the_cli(pools) -> None:
    settings, ctx = pools
    garbage = b"{not json at all"
    publish_raw(settings.broker.url, "lifecycle", garbage)
    wait_for(
        lambda: json.loads(run_cli(settings, "dlq", "list", "--pool", "lifecycle", "--json").stdout),
        what="the garbage to be dead-lettered",
    )
    (letter,) = json.loads(run_cli(settings, "dlq", "list", "--pool", "lifecycle", "--json").stdout)
    assert letter["message_id"].startswith("sha256:") and "not a dramatiq message" in letter["reason"]
    dropped = run_cli(settings, "dlq", "drop", "--pool", "lifecycle", "--message-id", letter["message_id"])
    assert dropped.returncode == 0 and "dropped 1 dead letter(s)" in dropped.stdout
    assert json.loads(run_cli(settings, "dlq", "list", "--pool", "lifecycle", "--json").stdout) == []

    # A good event that was dead-lettered while something it needs was down is replayed once fixed.
    event = AccountReactivated.new(tenant="acme", idempotency_key=f"replay-{uuid.uuid4().hex}")
    connection, channel = _channel(settings.broker.url)
    channel.basic_publish(
        "",
        dead_letter_queue("lifecycle"),
        wrap(event),
        pika.BasicProperties(delivery_mode=2, headers={REASON_HEADER: "HandlerError: control database down"}),
    )
    connection.close()
    listed = run_cli(settings, "dlq", "list", "--pool", "lifecycle")
    assert "account-reactivated" in listed.stdout and "control database down" in listed.stdout
    replayed = run_cli(settings, "dlq", "replay", "--pool", "lifecycle", "--all")
    assert replayed.returncode == 0 and "replayed 1 dead letter(s)" in replayed.stdout
    assert job_done(ctx, event.idempotency_key).outcome.startswith("recorded: tenant acme reactivated")
    missing = run_cli(settings, "dlq", "drop", "--pool", "lifecycle", "--message-id", "nope")
    assert missing.returncode == 1 and "not found in lifecycle's dead letters: nope" in missing.stderr
    missing = run_cli(settings, "dlq", "drop", "--pool", "lifecycle", "--message-id", "nope", "--json")
    assert missing.returncode == 1 and json.loads(missing.stdout) == {
        "pool": "lifecycle",
        "drop": [],
        "not_found": ["nope"],
    }
